//! What a check finds, in `qemu-img check`'s terms, and what a repair may change.

/// At most this many corruptions are described one by one; all are counted.
pub(super) const MAX_LISTED: usize = 1000;

/// One problem the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Corruption {
    /// An L1 entry whose L2 table offset is invalid.
    InvalidL2Offset {
        /// Index in the L1 table.
        l1_index: u64,
        /// The entry.
        value: u64,
    },
    /// An L2 entry whose data cluster offset is invalid.
    InvalidDataOffset {
        /// File offset of the L2 table.
        table: u64,
        /// Index in that table.
        index: u64,
        /// The entry.
        value: u64,
    },
    /// A cluster referenced by more than one entry.
    DoubleReference {
        /// File offset of the cluster.
        offset: u64,
    },
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corruption::InvalidL2Offset { l1_index, value } => {
                write!(
                    f,
                    "L1 entry {l1_index} has an invalid L2 table offset {value:#x}"
                )
            }
            Corruption::InvalidDataOffset {
                table,
                index,
                value,
            } => write!(
                f,
                "L2 table at {table:#x}, entry {index} has an invalid cluster offset {value:#x}"
            ),
            Corruption::DoubleReference { offset } => {
                write!(f, "cluster at {offset:#x} is referenced more than once")
            }
        }
    }
}

/// What a check found, in `qemu-img check`'s terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Data clusters referenced by L2 tables.
    pub allocated_clusters: u64,
    /// Data clusters not right after the previous one of the same table.
    pub fragmented_clusters: u64,
    /// Corruptions found (fixed ones included).
    pub corruptions: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Clusters nobody references.
    pub leaks: u64,
    /// Of the leaks, clusters this open image freed (discards, moves) and holds to
    /// reuse: leaks to any other reader of the file, which a close leaves as such
    /// unless they end the file.
    pub freed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that kept the check from finishing (e.g. unreadable tables).
    pub check_errors: u64,
    /// The first corruptions, described.
    pub details: Vec<Corruption>,
    /// File offsets of leaked clusters, in order (only the first few thousand).
    pub leaked_offsets: Vec<u64>,
    /// Data clusters copied so that no two entries share one (repair only).
    pub clusters_copied: u64,
    /// Clusters moved down the file to fill leaks (repair only).
    pub clusters_moved: u64,
    /// Bytes the file shrank by (repair only).
    pub bytes_truncated: u64,
    /// Leaked clusters that could not be filled and were punched out of the file instead
    /// (repair only). They take no space but are still unreferenced, so a later check,
    /// ours or QEMU's, counts them as leaks again.
    pub leaks_punched: u64,
}

impl CheckReport {
    /// Corruptions found and not repaired.
    pub fn corruptions_remaining(&self) -> u64 {
        self.corruptions.saturating_sub(self.corruptions_fixed)
    }

    /// Leaks found and not repaired.
    pub fn leaks_remaining(&self) -> u64 {
        self.leaks.saturating_sub(self.leaks_fixed)
    }

    /// Counts a corruption; a fix is counted only once it is on disk.
    pub(super) fn corrupt(&mut self, c: Corruption) {
        self.corruptions += 1;
        if self.details.len() < MAX_LISTED {
            self.details.push(c);
        }
    }
}

/// What `check -r` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Reclaim leaked clusters only.
    Leaks,
    /// Fix corruptions too: clear invalid entries, give every owner of a shared cluster
    /// its own copy, then reclaim leaks.
    All,
}
