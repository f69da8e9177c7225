//! The consistency check: every table entry valid, every cluster owned once, and the
//! clusters nobody owns (leaks) counted.

use super::{Image, ENTRIES_PER_SECTOR};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{cluster_offset_is_valid, table_offset_is_valid};
use crate::format::table::{decode_entries, encode_entries, UNALLOCATED, ZERO_CLUSTER};

/// Entries read from disk at a time while walking tables.
const WALK_CHUNK_ENTRIES: u64 = 8192;
/// At most this many corruptions are described one by one; all are counted.
const MAX_LISTED: usize = 1000;

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
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that kept the check from finishing (e.g. unreadable tables).
    pub check_errors: u64,
    /// The first corruptions, described.
    pub details: Vec<Corruption>,
    /// File offsets of leaked clusters, in order (only the first few thousand).
    pub leaked_offsets: Vec<u64>,
}

impl CheckReport {
    /// Corruptions found and not repaired.
    pub fn corruptions_remaining(&self) -> u64 {
        self.corruptions - self.corruptions_fixed
    }

    /// Leaks found and not repaired.
    pub fn leaks_remaining(&self) -> u64 {
        self.leaks - self.leaks_fixed
    }

    fn corrupt(&mut self, c: Corruption, fixed: bool) {
        self.corruptions += 1;
        if fixed {
            self.corruptions_fixed += 1;
        }
        if self.details.len() < MAX_LISTED {
            self.details.push(c);
        }
    }
}

/// Which clusters of the file are referenced.
struct UsedMap {
    bits: Vec<u64>,
    clusters: u64,
}

impl UsedMap {
    fn new(clusters: u64) -> Result<Self> {
        let words = usize::try_from(clusters.div_ceil(64))
            .map_err(|_| Error::Unsupported("image file too large to check".into()))?;
        Ok(Self {
            bits: vec![0; words],
            clusters,
        })
    }

    /// Marks a cluster; returns false if it was marked already.
    fn mark(&mut self, cluster: u64) -> bool {
        if cluster >= self.clusters {
            return true;
        }
        let (w, b) = ((cluster / 64) as usize, cluster % 64);
        let was = self.bits[w] & (1 << b) != 0;
        self.bits[w] |= 1 << b;
        !was
    }

    fn is_marked(&self, cluster: u64) -> bool {
        self.bits[(cluster / 64) as usize] & (1 << (cluster % 64)) != 0
    }
}

impl Image {
    /// Checks the image's metadata without changing anything.
    pub fn check(&self) -> Result<CheckReport> {
        self.check_inner(false)
    }

    /// Checks the metadata and repairs what it can: invalid table entries are cleared
    /// (as QEMU does). On success with nothing left to repair, NEED_CHECK is cleared.
    pub fn repair(&mut self) -> Result<CheckReport> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let report = self.check_inner(true)?;
        Ok(report)
    }

    pub(super) fn check_inner(&self, fix: bool) -> Result<CheckReport> {
        let _st = self.lock_alloc();
        let header = self.header_read().clone();
        let g = self.geometry;
        let cs = g.cluster_size();
        let file_end = self.file_clusters_end();
        let mut report = CheckReport {
            total_clusters: g.clusters_for(header.image_size),
            ..Default::default()
        };
        let mut used = UsedMap::new(file_end / cs)?;
        for i in 0..u64::from(header.table_size) {
            used.mark(header.l1_table_offset / cs + i);
        }

        let entries = g.entries_per_table();
        let mut l1_dirty = false;
        let mut l1_chunk = vec![0u64; WALK_CHUNK_ENTRIES.min(entries) as usize];
        let mut start = 0;
        while start < entries {
            let n = (entries - start).min(WALK_CHUNK_ENTRIES);
            let chunk = &mut l1_chunk[..n as usize];
            self.read_entries(header.l1_table_offset, start, chunk)
                .context(|| "reading the L1 table".to_string())?;
            let mut changed = false;
            for (k, e) in chunk.iter_mut().enumerate() {
                let l2 = *e;
                if l2 == UNALLOCATED {
                    continue;
                }
                let l1_index = start + k as u64;
                if !table_offset_is_valid(&header, &g, file_end, l2) {
                    report.corrupt(
                        Corruption::InvalidL2Offset {
                            l1_index,
                            value: l2,
                        },
                        fix,
                    );
                    if fix {
                        *e = UNALLOCATED;
                        changed = true;
                    }
                    continue;
                }
                let mut double = false;
                for c in 0..u64::from(header.table_size) {
                    double |= !used.mark(l2 / cs + c);
                }
                if double {
                    report.corrupt(Corruption::DoubleReference { offset: l2 }, false);
                    continue;
                }
                match self.check_l2(l2, &header, file_end, fix, &mut used, &mut report) {
                    Ok(()) => {}
                    Err(_) => report.check_errors += 1,
                }
            }
            if changed {
                self.write_entries(header.l1_table_offset, start, chunk)
                    .context(|| "rewriting the L1 table".to_string())?;
                l1_dirty = true;
            }
            start += n;
        }

        if report.check_errors == 0 {
            let first = self.data_start / cs;
            for c in first..file_end / cs {
                if !used.is_marked(c) {
                    report.leaks += 1;
                    if report.leaked_offsets.len() < MAX_LISTED * 8 {
                        report.leaked_offsets.push(c * cs);
                    }
                }
            }
        }

        if fix {
            if l1_dirty || report.corruptions_fixed > 0 {
                self.reload_tables()?;
            }
            if report.corruptions_remaining() == 0 && report.check_errors == 0 {
                self.mark_clean()?;
            }
        }
        Ok(report)
    }

    fn check_l2(
        &self,
        table: u64,
        header: &crate::format::Header,
        file_end: u64,
        fix: bool,
        used: &mut UsedMap,
        report: &mut CheckReport,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let entries = g.entries_per_table();
        let mut buf = vec![0u64; WALK_CHUNK_ENTRIES.min(entries) as usize];
        let mut last_offset = 0u64;
        let mut start = 0;
        while start < entries {
            let n = (entries - start).min(WALK_CHUNK_ENTRIES);
            let chunk = &mut buf[..n as usize];
            self.read_entries(table, start, chunk)
                .context(|| format!("reading the L2 table at {table:#x}"))?;
            let mut changed = false;
            for (k, e) in chunk.iter_mut().enumerate() {
                let off = *e;
                if off == UNALLOCATED || off == ZERO_CLUSTER {
                    continue;
                }
                report.allocated_clusters += 1;
                if last_offset != 0 && last_offset.wrapping_add(cs) != off {
                    report.fragmented_clusters += 1;
                }
                last_offset = off;
                if !cluster_offset_is_valid(header, &g, file_end, off) {
                    report.corrupt(
                        Corruption::InvalidDataOffset {
                            table,
                            index: start + k as u64,
                            value: off,
                        },
                        fix,
                    );
                    if fix {
                        *e = UNALLOCATED;
                        changed = true;
                    }
                    continue;
                }
                if !used.mark(off / cs) {
                    report.corrupt(Corruption::DoubleReference { offset: off }, false);
                }
            }
            if changed {
                self.write_entries(table, start, chunk)
                    .context(|| format!("rewriting the L2 table at {table:#x}"))?;
            }
            start += n;
        }
        Ok(())
    }

    fn read_entries(&self, table: u64, first: u64, out: &mut [u64]) -> std::io::Result<()> {
        let mut bytes = vec![0u8; out.len() * 8];
        self.storage.read_at(&mut bytes, table + first * 8)?;
        decode_entries(&bytes, out);
        Ok(())
    }

    fn write_entries(&self, table: u64, first: u64, entries: &[u64]) -> std::io::Result<()> {
        debug_assert_eq!(first % ENTRIES_PER_SECTOR, 0);
        let mut bytes = vec![0u8; entries.len() * 8];
        encode_entries(entries, &mut bytes);
        self.storage.write_at(&bytes, table + first * 8)
    }

    /// Re-reads L1 and drops cached L2 pages after tables were rewritten on disk.
    fn reload_tables(&self) -> Result<()> {
        let header = self.header_read().clone();
        let mut l1 = self.l1.write().unwrap_or_else(|p| p.into_inner());
        let mut fresh = vec![0u64; l1.len()];
        self.read_entries(header.l1_table_offset, 0, &mut fresh)
            .context(|| "re-reading the L1 table".to_string())?;
        *l1 = fresh;
        self.l2.clear();
        Ok(())
    }

    /// Flushes repairs, then clears NEED_CHECK.
    fn mark_clean(&self) -> Result<()> {
        let mut header = self.header_read().clone();
        if !header.needs_check() {
            return Ok(());
        }
        self.storage
            .flush()
            .context(|| format!("flushing {}", self.name))?;
        header.features &= !crate::format::features::NEED_CHECK;
        self.write_header(&header)?;
        self.storage
            .flush()
            .context(|| format!("flushing {}", self.name))?;
        *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
        Ok(())
    }
}
