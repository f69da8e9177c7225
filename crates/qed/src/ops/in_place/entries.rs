//! What both formats say about a guest cluster, and the source side of a conversion.

use crate::error::{Error, Result};
use crate::format::qcow2::CompressedRun;

/// A guest cluster, as the source's tables describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Not allocated: reads from the backing file, or as zeros without one.
    Unallocated,
    /// Reads as zeros, hiding the backing file.
    Zero,
    /// Stored whole at this file offset.
    Data(u64),
    /// Stored compressed (qcow2 only).
    Compressed(CompressedRun),
}

/// The backing file an image names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BackingName {
    /// The name as stored.
    pub name: String,
    /// Its format, where the header records it ("raw", "qcow2", ...).
    pub format: Option<String>,
}

/// What a conversion needs to know of its source besides the tables.
#[derive(Debug, Clone)]
pub(super) struct SourceFacts {
    /// The file, as named in messages.
    pub name: String,
    pub cluster_size: u64,
    pub virtual_size: u64,
    pub file_len: u64,
    pub backing: Option<BackingName>,
    /// Bytes at the start of the first cluster the source's header uses: the target may
    /// write its own header's side data (a backing name) only past them before it
    /// switches.
    pub header_used: u64,
    /// Compressed clusters are zstd frames rather than raw deflate.
    pub zstd: bool,
}

/// The source side of a conversion: its guest clusters, read in runs.
pub(super) trait GuestTables {
    /// The source's facts.
    fn facts(&self) -> &SourceFacts;

    /// The cluster size.
    fn cluster_size(&self) -> u64 {
        self.facts().cluster_size
    }

    /// Fills `out` with the entries of the guest clusters from `first`, `out.len()` of
    /// them (a multiple of the source's own table reach, and aligned to it). `false`
    /// when the whole run is unallocated without a table to read.
    fn read_run(&self, first: u64, out: &mut [Entry]) -> Result<bool>;

    /// File ranges (offset, length) the source's metadata uses, which become free
    /// once the target's header is in place.
    fn old_metadata(&self) -> Vec<(u64, u64)>;
}

/// One bit per cluster of the file: which clusters hold a guest cluster's data, to
/// find a cluster two entries share (corruption, or an internal snapshot's sharing)
/// before anything is written.
pub(super) struct ClusterMap {
    bits: Vec<u64>,
    cluster_bits: u32,
}

impl ClusterMap {
    /// A map for a file of `len` bytes in clusters of `1 << cluster_bits`.
    pub fn new(len: u64, cluster_bits: u32) -> Self {
        let clusters = len.div_ceil(1 << cluster_bits);
        Self {
            bits: vec![0; clusters.div_ceil(64) as usize],
            cluster_bits,
        }
    }

    /// Marks the cluster at `offset` (inside the file). Errors when it is marked
    /// already: `guest` names the entry, `name` the file.
    pub fn mark(&mut self, offset: u64, guest: u64, name: &str) -> Result<()> {
        let i = offset >> self.cluster_bits;
        let (word, bit) = ((i / 64) as usize, i % 64);
        let Some(w) = self.bits.get_mut(word) else {
            return Err(Error::invalid_argument(format!(
                "{name}: the cluster of guest offset {guest} lies at {offset}, past the end \
                 of the file; check the image (qemu-img check)"
            )));
        };
        if *w & (1 << bit) != 0 {
            return Err(Error::invalid_argument(format!(
                "{name}: the cluster at file offset {offset} holds more than one guest \
                 cluster (again at guest offset {guest}); the image is corrupt or shares \
                 clusters: repair it first (qemu-img check -r all)"
            )));
        }
        *w |= 1 << bit;
        Ok(())
    }

    /// Whether cluster `i` (an index, not an offset) is marked.
    pub fn is_set(&self, i: u64) -> bool {
        self.bits
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Counts of a survey of the source's entries.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    /// Runs (of the target's table reach) with at least one entry that is not
    /// unallocated: each needs a table of the target's.
    pub tables: u64,
    /// Data clusters that stay where they are.
    pub data: u64,
    pub compressed: u64,
    /// Data clusters that must move because the target's header takes their place.
    pub moved: u64,
}

/// Reads every run of `run_len` entries, checking each data cluster is used once and
/// counting what the target must write. `moves_below`: data at a file offset below it
/// must move. `progress` is called with the runs done.
pub(super) fn survey(
    src: &dyn GuestTables,
    run_len: u64,
    moves_below: u64,
    map: &mut ClusterMap,
    progress: &mut dyn FnMut(u64),
) -> Result<Counts> {
    let f = src.facts();
    let clusters = f.virtual_size.div_ceil(f.cluster_size);
    let mut counts = Counts::default();
    let mut run = vec![Entry::Unallocated; run_len as usize];
    let mut first = 0;
    while first < clusters {
        if src.read_run(first, &mut run)? {
            let mut any = false;
            for (i, e) in run.iter().enumerate() {
                let guest = (first + i as u64) * f.cluster_size;
                match *e {
                    Entry::Unallocated => continue,
                    Entry::Zero => {}
                    Entry::Data(off) if off < moves_below => counts.moved += 1,
                    Entry::Data(off) => {
                        map.mark(off, guest, &f.name)?;
                        counts.data += 1;
                    }
                    Entry::Compressed(_) => counts.compressed += 1,
                }
                any = true;
            }
            counts.tables += u64::from(any);
        }
        first += run_len;
        progress(first.min(clusters));
    }
    Ok(counts)
}
