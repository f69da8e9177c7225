//! What every reorganizing job shares: how it is asked to run and how it ended, the free
//! space it owns while it runs, and its start and end.

use crate::block::BlockDevice;
use crate::engine::{Image, Layout, Reorganizing};
use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

/// Clusters moved in one batch (one freeze, one flush, one swap).
pub(super) const BATCH: usize = 256;

/// How a compaction or defragmentation runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReorganizeOptions<'a> {
    /// Set to stop the job between batches.
    pub cancel: Option<&'a AtomicBool>,
    /// Leave data clusters whose bytes are all holes in the file as they are. By default
    /// a job first frees them (they read as zeros, as the entry that replaces them
    /// does), which asks the file about holes once per run of data; a caller that knows
    /// its free space is elsewhere (converting in place) skips that.
    pub keep_hole_clusters: bool,
}

/// How a compaction or defragmentation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReorganizeEnd {
    /// Finished.
    Done {
        /// Bytes moved.
        moved: u64,
        /// The file's length afterwards.
        file_len: u64,
    },
    /// Cancelled between batches: what moved stays moved, the rest stays where it was,
    /// and the file is cut after its last cluster in use.
    Cancelled {
        /// Bytes moved.
        moved: u64,
        /// The file's length afterwards.
        file_len: u64,
    },
}

/// Free clusters the job owns, handed back to the image when it ends however it ends.
pub(super) struct Owned<'a> {
    image: &'a Image,
    pub(super) clusters: BTreeSet<u64>,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        let left: Vec<u64> = std::mem::take(&mut self.clusters).into_iter().collect();
        self.image.give_back_clusters(&left);
    }
}

impl<'a> Owned<'a> {
    /// The walk's holes, the job's from its start.
    pub(super) fn holes(image: &'a Image, layout: &Layout) -> Self {
        Owned {
            image,
            clusters: layout.holes.iter().copied().collect(),
        }
    }

    /// The lowest run of `n` owned clusters that ends at or before `below`, taken.
    pub(super) fn take_run_below(&mut self, n: u64, cs: u64, below: u64) -> Option<u64> {
        self.take_run(n, cs, 0, below)
    }

    /// A run of `n` owned clusters at or after `from`, taken.
    pub(super) fn take_run_from(&mut self, n: u64, cs: u64, from: u64) -> Option<u64> {
        self.take_run(n, cs, from, u64::MAX)
    }

    /// The lowest run of `n` owned clusters that starts at or after `from` and ends at
    /// or before `below`, taken.
    fn take_run(&mut self, n: u64, cs: u64, from: u64, below: u64) -> Option<u64> {
        let mut run_start = 0;
        let mut run_len = 0;
        let mut found = None;
        for &c in self.clusters.range(from..) {
            if c.saturating_add(cs) > below {
                break;
            }
            if run_len > 0 && c == run_start + run_len * cs {
                run_len += 1;
            } else {
                run_start = c;
                run_len = 1;
            }
            if run_len == n {
                found = Some(run_start);
                break;
            }
        }
        let at = found?;
        for i in 0..n {
            self.clusters.remove(&(at + i * cs));
        }
        Some(at)
    }
}

/// Starts a job: refuses read-only images, settles what was freed before, and walks.
pub(super) fn start<'i>(
    image: &'i Image,
    opts: &ReorganizeOptions<'_>,
) -> Result<(Reorganizing<'i>, Layout)> {
    if image.is_read_only() {
        return Err(Error::ReadOnly);
    }
    let job = image.begin_reorganizing()?;
    // Data clusters that are nothing but holes (parked at a close, or punched by an
    // older discard) read as zeros: freed, they are free space like any other.
    if !opts.keep_hole_clusters {
        free_hole_clusters(image)?;
    }
    image.settle_freed()?;
    let layout = image.layout()?;
    Ok((job, layout))
}

/// Frees the data clusters whose bytes are all holes in the file, in batches.
fn free_hole_clusters(image: &Image) -> Result<()> {
    let mut from = 0;
    loop {
        let punched = image.punched_clusters(from, BATCH)?;
        let Some(&(last, _)) = punched.last() else {
            return Ok(());
        };
        image.free_punched(&punched)?;
        from = last + image.geometry().cluster_size();
    }
}

/// Ends a job: cuts the file after its last cluster in use (the job's own clusters and
/// the places it left go with the tail, unpunched), then gives back what it still owns
/// and settles what is left below the end.
pub(super) fn finish(image: &Image, mut owned: Owned<'_>) -> Result<u64> {
    let end = image.cut_free_tail(&mut owned.clusters)?;
    drop(owned);
    image.settle_freed()?;
    Ok(end)
}

pub(super) fn cancelled(opts: &ReorganizeOptions<'_>) -> bool {
    opts.cancel.is_some_and(|c| c.load(Ordering::Acquire))
}

pub(super) fn ended(cancel: bool, moved: u64, file_len: u64) -> ReorganizeEnd {
    if cancel {
        ReorganizeEnd::Cancelled { moved, file_len }
    } else {
        ReorganizeEnd::Done { moved, file_len }
    }
}
