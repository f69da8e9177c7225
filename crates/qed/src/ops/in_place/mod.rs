//! Converting an image between qcow2, QED and raw in the file it is in.
//!
//! All three formats keep guest data in whole clusters at cluster-aligned file offsets,
//! so only the metadata has to change. A conversion:
//!
//! 1. surveys the source's tables and refuses, before writing anything, what the target
//!    cannot express or what it cannot trust (a corrupt or unclean image);
//! 2. writes the target's metadata (and the clusters that must move: compressed qcow2
//!    clusters decompressed, the cluster under a new QED header) past the old end of the
//!    file, where the source format does not look, then flushes;
//! 3. writes the first 512-byte sector of the file, which names the target format, in
//!    one write, and flushes. A sector is the unit a disk writes whole, so a crash leaves
//!    the old header with the old metadata intact or the new header with the new
//!    metadata complete;
//! 4. gives back what the source's metadata used: a QED image compacts it away (QED has
//!    no free-space map, so an unreferenced cluster is a leak); in qcow2 it is free space
//!    (refcount 0), punched.
//!
//! A failure before step 3 cuts the file back to its old length.

mod entries;
mod qcow2_source;
mod qed_source;
mod raw_source;
mod to_qcow2;
mod to_qed;

use crate::block::Format;
use crate::error::{Error, IoContext, Result};
use crate::format::geometry::DEFAULT_CLUSTER_SIZE;
use crate::storage::Storage;
use entries::GuestTables;
use qcow2_source::Qcow2Source;
use qed_source::QedSource;
use raw_source::RawSource;
use std::sync::Arc;

/// What to convert to, and how.
#[derive(Debug, Clone, Copy)]
pub struct InPlaceOptions {
    /// The format of the file now.
    pub source: Format,
    /// The format it is converted to: QED (from qcow2 or raw) or qcow2 (from QED).
    pub target: Format,
    /// Only survey and plan: nothing is written.
    pub dry_run: bool,
    /// The format of a QED image's backing file, where the QED header does not record it
    /// (QED records only raw): qcow2's header names it. `None` leaves it unrecorded.
    pub backing_format: Option<Format>,
    /// The cluster size of a QED image made from a raw file (default 64 KiB). From qcow2
    /// or QED the cluster size is kept, and a different one is refused.
    pub cluster_size: Option<u64>,
}

/// What a conversion writes, or would write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPlacePlan {
    /// The source format.
    pub source: Format,
    /// The target format.
    pub target: Format,
    /// Cluster size, the same in both.
    pub cluster_size: u64,
    /// Virtual size, the same in both.
    pub virtual_size: u64,
    /// The file's length before the conversion.
    pub file_length: u64,
    /// Bytes of new metadata (tables, and refcounts for qcow2).
    pub metadata_bytes: u64,
    /// Compressed qcow2 clusters that become ordinary clusters.
    pub decompressed_clusters: u64,
    /// Bytes those clusters take.
    pub decompressed_bytes: u64,
    /// Clusters that move for another reason (a raw file's first cluster, under QED's
    /// header).
    pub moved_bytes: u64,
    /// The most the file grows during the conversion.
    pub extra_bytes: u64,
    /// The file's length afterwards.
    pub final_length: u64,
}

/// Converts the image in `storage` (named `name` in messages) in place, or only plans it
/// (`opts.dry_run`). Every refusal comes before the first write. `progress` is called
/// with (work done, work in all).
pub fn convert_in_place(
    storage: Arc<dyn Storage>,
    name: &str,
    opts: &InPlaceOptions,
    progress: super::Progress<'_>,
) -> Result<InPlacePlan> {
    let keep = |cs: u64| match opts.cluster_size {
        Some(want) if want != cs => Err(Error::invalid_argument(format!(
            "{name}: its clusters are {cs} bytes, and in place they stay that size: drop \
             -o cluster_size={want}, or copy it (qed convert SRC DST)"
        ))),
        _ => Ok(()),
    };
    match (opts.source, opts.target) {
        (Format::Qcow2, Format::Qed) => {
            let src = Qcow2Source::open(&*storage, name)?;
            keep(src.cluster_size())?;
            to_qed::convert(storage.clone(), &src, opts, progress)
        }
        (Format::Raw, Format::Qed) => {
            let cs = opts.cluster_size.unwrap_or(u64::from(DEFAULT_CLUSTER_SIZE));
            let src = RawSource::open(&*storage, name, cs)?;
            to_qed::convert(storage.clone(), &src, opts, progress)
        }
        (Format::Qed, Format::Qcow2) => {
            let src = QedSource::open(&*storage, name)?;
            keep(src.cluster_size())?;
            to_qcow2::convert(&*storage, &src, opts, progress)
        }
        (s, t) if s == t => Err(Error::invalid_argument(format!(
            "{name} is already a {s} image: nothing to convert"
        ))),
        (s, t) => Err(Error::invalid_argument(format!(
            "{name}: converting {s} to {t} in place is not supported: in place, qcow2 and \
             raw convert to qed, and qed to qcow2 (use qed convert SRC DST to copy)"
        ))),
    }
}

/// The new metadata of a conversion, past the old end of the file, and the switch.
struct Commit<'a> {
    storage: &'a dyn Storage,
    name: &'a str,
    /// The file's length before anything was written: what a failure cuts back to.
    old_len: u64,
}

impl<'a> Commit<'a> {
    fn new(storage: &'a dyn Storage, name: &'a str) -> Result<Self> {
        let old_len = storage
            .len()
            .context(|| format!("reading the length of {name}"))?;
        Ok(Self {
            storage,
            name,
            old_len,
        })
    }

    fn write(&self, buf: &[u8], at: u64, what: &str) -> Result<()> {
        self.storage
            .write_at(buf, at)
            .context(|| format!("writing {what} at {at} of {}", self.name))
    }

    fn read(&self, buf: &mut [u8], at: u64, what: &str) -> Result<()> {
        self.storage
            .read_at(buf, at)
            .context(|| format!("reading {what} at {at} of {}", self.name))
    }

    fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .context(|| format!("flushing {}", self.name))
    }

    /// Runs `stage` (which writes only past the old end of the file and into parts of
    /// the first cluster the source does not use), flushes, then writes `sector` at
    /// offset 0 and flushes again. A failure before the switch cuts the file back to
    /// its old length; after it, the file is valid as either format.
    fn run(&self, stage: impl FnOnce() -> Result<()>, sector: &[u8; 512]) -> Result<()> {
        if let Err(e) = stage().and_then(|()| self.flush()) {
            // Best effort: what was appended is unreferenced either way.
            let _ = self.storage.set_len(self.old_len);
            return Err(e);
        }
        self.storage.write_at(sector, 0).map_err(|e| {
            Error::invalid_argument(format!(
                "{}: writing the new header failed ({e}); the file holds either the old \
                 format or the new one, each with the same guest data: check it with \
                 qemu-img check",
                self.name
            ))
        })?;
        self.flush()
    }
}

/// `n` rounded up to a multiple of `to` (a power of two).
fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}
