//! Compaction and defragmentation: jobs that move clusters inside one image while it is
//! in use, through the engine's freeze-and-swap moves (`Image::move_clusters`,
//! `Image::move_table`), so that guest I/O goes on throughout and a crash at any point
//! leaves every cluster at its old place or its new one.
//!
//! - **Compaction** ([`compact`](mod@compact)) moves the clusters that lie past where the
//!   file could end (the header, L1, the tables in use and the live clusters) into free
//!   space below it, then cuts the file.
//! - **Defragmentation** ([`defrag`](mod@defrag)) puts the L2 tables together after L1,
//!   then the data clusters in guest order, so that a sequential read of the disk reads
//!   the file in order. A place is cleared by moving its occupant out of the way first.
//!
//! While a job runs, clusters that become free (its own old places, discards) are the
//! job's to fill: it writes only to space it owns ([`job`]). What it does not use goes
//! back to the free set at the end, and the file is cut after its last cluster in use.

mod compact;
mod defrag;
mod job;

pub use compact::compact;
pub use defrag::defrag;
pub use job::{ReorganizeEnd, ReorganizeOptions};

use super::step::Progress;
use crate::engine::Image;
use crate::error::Result;

/// Which job moves the clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reorganization {
    /// Fill free space from the end of the file, then cut it ([`compact`](fn@compact)).
    Compact,
    /// Tables together, then data in guest order ([`defrag`](fn@defrag)).
    Defrag,
}

impl Reorganization {
    /// The job's name: `compact` or `defrag`.
    pub fn name(self) -> &'static str {
        match self {
            Reorganization::Compact => "compact",
            Reorganization::Defrag => "defrag",
        }
    }

    /// Runs the job on `image` (see [`compact`](fn@compact) and [`defrag`](fn@defrag)).
    pub fn run(
        self,
        image: &Image,
        opts: &ReorganizeOptions<'_>,
        progress: Progress<'_>,
    ) -> Result<ReorganizeEnd> {
        match self {
            Reorganization::Compact => compact(image, opts, progress),
            Reorganization::Defrag => defrag(image, opts, progress),
        }
    }
}
