//! Where everything lies in the file, for a job that moves clusters (compaction,
//! defragmentation): which clusters are in use, where the tables are, which free
//! clusters the job may fill, and the data clusters in guest order.

use super::check::UsedMap;
use super::image::Image;
use super::l2cache::PAGE_ENTRIES;
use super::mapping::Mapping;
use crate::error::{Error, IoContext, Result};
use std::ops::ControlFlow;

/// The file as a job that moves clusters sees it when it starts.
pub(crate) struct Layout {
    /// Bytes in a cluster.
    pub(crate) cluster_size: u64,
    /// Bytes in an L2 table.
    pub(crate) table_bytes: u64,
    /// Where tables and data may start (the end of the header area).
    pub(crate) start: u64,
    /// The end of the clusters in use or free when the walk ran (the frontier).
    pub(crate) end: u64,
    /// Clusters in use when the walk ran.
    used: UsedMap,
    /// (L1 index, file offset) of every L2 table.
    pub(crate) tables: Vec<(u64, u64)>,
    /// File offsets of free clusters the job owns, ascending: every cluster between
    /// `start` and `end` nothing uses, except those the free set holds. The job fills
    /// them whole or gives them back.
    pub(crate) holes: Vec<u64>,
}

impl Layout {
    /// Bytes of the file in use from `start`: tables (L1 included) and data.
    pub(crate) fn used_bytes(&self) -> u64 {
        let cs = self.cluster_size;
        (self.start / cs..self.end / cs)
            .filter(|&c| self.used.is_marked(c))
            .count() as u64
            * cs
    }
}

/// Walks the tables for a job that will move clusters, and hands it the free
/// clusters it may fill: the ready ones of the free set and the leaks. Refuses an
/// image whose check finds corruption.
pub(super) fn layout(image: &Image) -> Result<Layout> {
    let ready = image.alloc.take_all_ready();
    // What the free set holds is read under the same hold of the gate as the walk:
    // an allocation (which holds the gate shared) could otherwise take back a
    // cluster the walk found unused, and the job would fill it too.
    let exclusive = image.alloc.gate_exclusive();
    let walked = super::check::walk_gated(image, false);
    let held = image.alloc.held();
    drop(exclusive);
    let walk = match walked {
        Ok(w) => w,
        Err(e) => {
            give_back_runs(image, &ready);
            return Err(e);
        }
    };
    let report = &walk.report;
    if report.corruptions_remaining() > 0 || report.check_errors > 0 {
        give_back_runs(image, &ready);
        return Err(Error::Unsupported(format!(
            "{}: the check finds {} corruptions and {} errors; run 'qed check -r all' \
             first",
            image.name,
            report.corruptions_remaining(),
            report.check_errors
        )));
    }
    let cs = image.geometry.cluster_size();
    let start = image.data_start;
    let end = walk.used.len() * cs;
    let mut busy = UsedMap::new(walk.used.len())?;
    // What the free set holds (freed meanwhile, or ready since the job took the
    // ready runs) is the set's to hand out: the job gets it through the set.
    for (at, len) in held {
        for c in at / cs..(at + len) / cs {
            busy.mark(c);
        }
    }
    let holes = (start / cs..end / cs)
        .filter(|&c| !walk.used.is_marked(c) && !busy.is_marked(c))
        .map(|c| c * cs)
        .collect();
    Ok(Layout {
        cluster_size: cs,
        table_bytes: image.geometry.table_bytes(),
        start,
        end,
        used: walk.used,
        tables: walk.tables,
        holes,
    })
}

/// Calls `f(guest, file, clusters)` for every run of data clusters, in guest order,
/// as memory holds them now, until it breaks.
pub(super) fn data_runs(
    image: &Image,
    f: impl FnMut(u64, u64, u64) -> ControlFlow<()>,
) -> Result<()> {
    data_runs_from(image, 0, f)
}

/// [`Image::data_runs`] from the cluster that holds guest offset `from` on.
fn data_runs_from(
    image: &Image,
    from: u64,
    mut f: impl FnMut(u64, u64, u64) -> ControlFlow<()>,
) -> Result<()> {
    let g = image.geometry;
    let cs = g.cluster_size();
    let size = image.header.get().image_size;
    let per_table = g.entries_per_table() * cs;
    let mut pos = from / cs * cs;
    while pos < size {
        if image.l1_entry(g.l1_index(pos))? == 0 {
            pos = (pos / per_table + 1) * per_table;
            continue;
        }
        let page_end = (pos / (PAGE_ENTRIES * cs) + 1) * PAGE_ENTRIES * cs;
        let (mapping, n) = image.lookup(pos, page_end.min(size) - pos)?;
        if let Mapping::Data(off) = mapping {
            if f(pos, off, n.div_ceil(cs)).is_break() {
                return Ok(());
            }
        }
        pos += n;
    }
    Ok(())
}

/// The data clusters (guest offset, file offset) whose bytes are all holes in the
/// file now, for [`Image::free_punched`], from guest offset `from` on. At most `most`,
/// in guest order, so that a caller goes on after the last one it got: the file is
/// asked about holes once per extent, not once per call.
pub(super) fn punched_clusters(image: &Image, from: u64, most: usize) -> Result<Vec<(u64, u64)>> {
    let cs = image.geometry.cluster_size();
    let mut out = Vec::new();
    let mut failed = None;
    data_runs_from(image, from, |guest, file, n| {
        let end = file + n * cs;
        if guest + n * cs <= from {
            return ControlFlow::Continue(());
        }
        let mut at = file + from.saturating_sub(guest);
        while at < end && out.len() < most {
            let (hole, len) = match image.storage.zero_status(at, end - at) {
                Ok(z) => z,
                Err(e) => {
                    failed = Some(e);
                    return ControlFlow::Break(());
                }
            };
            let len = len.max(1);
            if hole {
                // Whole clusters inside the hole.
                let mut c = at.next_multiple_of(cs);
                while c + cs <= at + len && out.len() < most {
                    out.push((guest + (c - file), c));
                    c += cs;
                }
            }
            at += len;
        }
        if out.len() >= most {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    match failed {
        Some(e) => Err(e).context(|| format!("looking for holes in {}", image.name)),
        None => Ok(out),
    }
}

/// Gives back free clusters a job took and did not fill (see [`Image::layout`]).
pub(super) fn give_back_clusters(image: &Image, clusters: &[u64]) {
    let cs = image.geometry.cluster_size();
    let runs: Vec<(u64, u64)> = clusters.iter().map(|&at| (at, cs)).collect();
    give_back_runs(image, &runs);
}

fn give_back_runs(image: &Image, runs: &[(u64, u64)]) {
    image.alloc.give_back(runs);
}

/// Bytes freed while open and not reused yet.
pub(super) fn freed_bytes(image: &Image) -> u64 {
    image.alloc.freed_bytes()
}

/// Makes every cluster freed so far ready to reuse or cut: waits for the requests
/// that could still use them, and flushes twice (see `free_set.rs`).
pub(super) fn settle_freed(image: &Image) -> Result<()> {
    for _ in 0..2 {
        image.alloc.synchronize();
        image.flush_image()?;
    }
    Ok(())
}
