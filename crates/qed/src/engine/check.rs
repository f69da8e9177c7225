//! The consistency check: every table entry valid, every cluster owned once, and the
//! clusters nobody owns (leaks) counted.

use super::{Image, ENTRIES_PER_SECTOR};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{cluster_offset_is_valid, table_offset_is_valid};
use crate::format::table::{decode_entries, encode_entries, UNALLOCATED, ZERO_CLUSTER};
use std::sync::atomic::Ordering;

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
    fn corrupt(&mut self, c: Corruption) {
        self.corruptions += 1;
        if self.details.len() < MAX_LISTED {
            self.details.push(c);
        }
    }
}

/// Which clusters of the file are referenced.
pub(super) struct UsedMap {
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
    pub(super) fn mark(&mut self, cluster: u64) -> bool {
        if cluster >= self.clusters {
            return true;
        }
        let (w, b) = ((cluster / 64) as usize, cluster % 64);
        let was = self.bits[w] & (1 << b) != 0;
        self.bits[w] |= 1 << b;
        !was
    }

    pub(super) fn is_marked(&self, cluster: u64) -> bool {
        cluster < self.clusters && self.bits[(cluster / 64) as usize] & (1 << (cluster % 64)) != 0
    }

    pub(super) fn unmark(&mut self, cluster: u64) {
        if cluster < self.clusters {
            self.bits[(cluster / 64) as usize] &= !(1 << (cluster % 64));
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.clusters
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

/// The result of walking every table: the report, which clusters are in use, and
/// where the L2 tables are.
pub(super) struct Walk {
    pub(super) report: CheckReport,
    pub(super) used: UsedMap,
    /// (L1 index, file offset) of every valid, uniquely owned L2 table.
    pub(super) tables: Vec<(u64, u64)>,
}

impl Image {
    /// Checks the image's metadata without changing anything.
    pub fn check(&self) -> Result<CheckReport> {
        Ok(self.walk(false)?.report)
    }

    /// Checks the metadata and repairs it (see [`RepairMode`] and docs/design.md). On
    /// success, with no corruption left, NEED_CHECK is cleared.
    pub fn repair(&mut self, mode: RepairMode) -> Result<CheckReport> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let result = self.repair_tables(mode);
        if result.is_err() {
            // The repair may have rewritten tables, moved them or truncated the file
            // before it failed: drop what memory holds of them, or later requests would
            // update tables the file no longer uses.
            self.l2.clear();
            if self.reload_tables().is_err() {
                self.l1_stale.store(true, Ordering::Release);
            }
        }
        result
    }

    fn repair_tables(&mut self, mode: RepairMode) -> Result<CheckReport> {
        let first = self.walk(mode == RepairMode::All)?;
        let mut report = first.report.clone();
        // Repairs may have appended copies; walk again for an exact picture of leaks.
        let walk = if report.corruptions_fixed > 0 {
            let again = self.walk(false)?;
            report.leaks = again.report.leaks;
            report.check_errors += again.report.check_errors;
            again
        } else {
            first
        };
        if report.check_errors == 0 && report.leaks > 0 {
            let moves_allowed = walk.report.corruptions == 0;
            report = self.reclaim_leaks(walk, report, moves_allowed)?;
        }
        self.reload_tables()?;
        if report.corruptions_remaining() == 0 && report.check_errors == 0 {
            self.mark_clean()?;
        }
        report.leaked_offsets.clear();
        Ok(report)
    }

    /// Reclaims leaked clusters (after a shrink): a repair limited to leaks.
    pub(super) fn repair_leaks(&mut self) -> Result<()> {
        self.repair(RepairMode::Leaks).map(|_| ())
    }

    /// Walks every table. With `fix`, invalid entries are cleared and every later owner
    /// of a shared cluster or table gets its own copy (appended at the frontier).
    pub(super) fn walk(&self, fix: bool) -> Result<Walk> {
        let _exclusive = self.gate.exclusive();
        // The walk reads tables from the file: it must hold what memory holds.
        self.write_back_tables()?;
        let header = self.header_read().clone();
        let g = self.geometry;
        let cs = g.cluster_size();
        let file_end = self.file_clusters_end();
        let mut w = Walk {
            report: CheckReport {
                total_clusters: g.clusters_for(header.image_size),
                ..Default::default()
            },
            used: UsedMap::new(file_end / cs)?,
            tables: Vec::new(),
        };
        for i in 0..u64::from(header.table_size) {
            w.used.mark(header.l1_table_offset / cs + i);
        }

        let entries = g.entries_per_table();
        let mut l1_chunk = vec![0u64; WALK_CHUNK_ENTRIES.min(entries) as usize];
        let mut start = 0;
        while start < entries {
            let n = (entries - start).min(WALK_CHUNK_ENTRIES);
            let chunk = &mut l1_chunk[..n as usize];
            self.read_entries(header.l1_table_offset, start, chunk)
                .context(|| "reading the L1 table".to_string())?;
            let mut fixed = 0;
            for (k, e) in chunk.iter_mut().enumerate() {
                let mut l2 = *e;
                if l2 == UNALLOCATED {
                    continue;
                }
                let l1_index = start + k as u64;
                if !table_offset_is_valid(&header, &g, file_end, l2) {
                    w.report.corrupt(Corruption::InvalidL2Offset {
                        l1_index,
                        value: l2,
                    });
                    if fix {
                        *e = UNALLOCATED;
                        fixed += 1;
                    }
                    continue;
                }
                let mut double = false;
                for c in 0..u64::from(header.table_size) {
                    double |= !w.used.mark(l2 / cs + c);
                }
                if double {
                    w.report.corrupt(Corruption::DoubleReference { offset: l2 });
                    if !fix {
                        continue;
                    }
                    // This owner gets its own copy of the table; the entries of the copy
                    // then share their clusters with the original and are copied below.
                    l2 = self.copy_to_frontier(l2, g.table_bytes())?;
                    *e = l2;
                    fixed += 1;
                }
                w.tables.push((l1_index, l2));
            }
            if fixed > 0 {
                self.flush_storage()?;
                self.write_entries(header.l1_table_offset, start, chunk)
                    .context(|| "rewriting the L1 table".to_string())?;
                w.report.corruptions_fixed += fixed;
            }
            start += n;
        }

        // Every table is marked before any data entry, so a data entry pointing into a
        // table is the one found shared (and copied), never the table.
        let tables = std::mem::take(&mut w.tables);
        for &(l1_index, l2) in &tables {
            match self.walk_l2(l2, &header, file_end, fix, &mut w) {
                Ok(()) => w.tables.push((l1_index, l2)),
                Err(_) => w.report.check_errors += 1,
            }
        }

        if w.report.check_errors == 0 {
            let first = self.data_start / cs;
            for c in first..file_end / cs {
                if !w.used.is_marked(c) {
                    w.report.leaks += 1;
                    if w.report.leaked_offsets.len() < MAX_LISTED * 8 {
                        w.report.leaked_offsets.push(c * cs);
                    }
                }
            }
        }
        if fix && w.report.corruptions_fixed > 0 {
            self.flush_storage()?;
        }
        Ok(w)
    }

    fn walk_l2(
        &self,
        table: u64,
        header: &crate::format::Header,
        file_end: u64,
        fix: bool,
        w: &mut Walk,
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
            let mut fixed = 0;
            let mut copied = 0;
            for (k, e) in chunk.iter_mut().enumerate() {
                let off = *e;
                if off == UNALLOCATED || off == ZERO_CLUSTER {
                    continue;
                }
                w.report.allocated_clusters += 1;
                if last_offset != 0 && last_offset.wrapping_add(cs) != off {
                    w.report.fragmented_clusters += 1;
                }
                last_offset = off;
                if !cluster_offset_is_valid(header, &g, file_end, off) {
                    w.report.corrupt(Corruption::InvalidDataOffset {
                        table,
                        index: start + k as u64,
                        value: off,
                    });
                    if fix {
                        *e = UNALLOCATED;
                        fixed += 1;
                    }
                    continue;
                }
                if !w.used.mark(off / cs) {
                    w.report
                        .corrupt(Corruption::DoubleReference { offset: off });
                    if fix {
                        *e = self.copy_to_frontier(off, cs)?;
                        copied += 1;
                        fixed += 1;
                    }
                }
            }
            if fixed > 0 {
                // Copies must be durable before the entries that point at them.
                self.flush_storage()?;
                self.write_entries(table, start, chunk)
                    .context(|| format!("rewriting the L2 table at {table:#x}"))?;
                w.report.corruptions_fixed += fixed;
                w.report.clusters_copied += copied;
            }
            start += n;
        }
        Ok(())
    }

    /// Appends a copy of `len` bytes at file offset `from` at the frontier.
    pub(super) fn copy_to_frontier(&self, from: u64, len: u64) -> Result<u64> {
        let to = self.reserve(len)?;
        self.copy_within(from, to, len)?;
        Ok(to)
    }

    /// Copies `len` bytes of the file from `from` to `to`, a megabyte at a time.
    pub(super) fn copy_within(&self, from: u64, to: u64, len: u64) -> Result<()> {
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.storage
                .read_at(&mut buf[..n], from + done)
                .and_then(|_| self.storage.write_at(&buf[..n], to + done))
                .context(|| format!("copying {len} bytes from {from:#x} to {to:#x}"))?;
            done += n as u64;
        }
        Ok(())
    }

    pub(super) fn read_entries(
        &self,
        table: u64,
        first: u64,
        out: &mut [u64],
    ) -> std::io::Result<()> {
        let mut bytes = vec![0u8; out.len() * 8];
        self.storage.read_at(&mut bytes, table + first * 8)?;
        decode_entries(&bytes, out);
        Ok(())
    }

    pub(super) fn write_entries(
        &self,
        table: u64,
        first: u64,
        entries: &[u64],
    ) -> std::io::Result<()> {
        debug_assert_eq!(first % ENTRIES_PER_SECTOR, 0);
        let mut bytes = vec![0u8; entries.len() * 8];
        encode_entries(entries, &mut bytes);
        self.storage.write_at(&bytes, table + first * 8)
    }

    /// Re-reads L1 and drops cached L2 pages after tables were rewritten on disk.
    fn reload_tables(&self) -> Result<()> {
        self.load_l1()?;
        self.l2.clear();
        // Space grown ahead (by copies a repair appended) goes first: the file's length
        // becomes the frontier again.
        self.trim_growth()?;
        let mut grow = self.lock_grow();
        let len = self
            .storage
            .len()
            .context(|| format!("reading the size of {}", self.name))?;
        let frontier = self.geometry.cluster_start(len);
        grow.file_len = len;
        grow.trailing_garbage = len != frontier;
        self.frontier.store(frontier, Ordering::Release);
        Ok(())
    }

    /// Flushes repairs, then clears NEED_CHECK.
    fn mark_clean(&self) -> Result<()> {
        self.unchecked.store(false, Ordering::Release);
        let mut header = self.header_read().clone();
        if !header.needs_check() {
            return Ok(());
        }
        self.flush_storage()?;
        header.features &= !crate::format::features::NEED_CHECK;
        let result = self
            .write_header(&header)
            .and_then(|()| self.flush_storage());
        // Even a failed write may have cleared the bit in the file: the next allocation
        // must set it again rather than trust it is still there.
        *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
        result
    }
}
