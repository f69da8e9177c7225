//! The consistency check: every table entry valid, every cluster owned once, and the
//! clusters nobody owns (leaks) counted.

use super::image::Image;
use super::report::{CheckReport, Corruption, MAX_LISTED};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{cluster_offset_is_valid, table_offset_is_valid};
use crate::format::table::{UNALLOCATED, ZERO_CLUSTER};
use crate::format::Header;

/// Entries read from disk at a time while walking tables.
const WALK_CHUNK_ENTRIES: u64 = 8192;

/// Which clusters of the file are referenced.
pub(super) struct UsedMap {
    bits: Vec<u64>,
    clusters: u64,
}

impl UsedMap {
    pub(super) fn new(clusters: u64) -> Result<Self> {
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

/// The result of walking every table: the report, which clusters are in use, and
/// where the L2 tables are.
pub(super) struct Walk {
    pub(super) report: CheckReport,
    pub(super) used: UsedMap,
    /// (L1 index, file offset) of every valid, uniquely owned L2 table.
    pub(super) tables: Vec<(u64, u64)>,
}

/// Checks the image's metadata without changing anything.
pub(super) fn check(image: &Image) -> Result<CheckReport> {
    Ok(walk(image, false)?.report)
}

/// Walks every table. With `fix`, invalid entries are cleared and every later owner
/// of a shared cluster or table gets its own copy (appended at the frontier).
pub(super) fn walk(image: &Image, fix: bool) -> Result<Walk> {
    let _exclusive = image.alloc.gate_exclusive();
    walk_gated(image, fix)
}

/// [`Image::walk`] for a caller that holds the allocation gate exclusively.
pub(super) fn walk_gated(image: &Image, fix: bool) -> Result<Walk> {
    // The walk reads tables from the file: it must hold what memory holds.
    image.write_back_tables()?;
    let header = image.header.get().clone();
    let file_end = image.alloc.frontier();
    let mut w = Walk {
        report: CheckReport {
            total_clusters: image.geometry.clusters_for(header.image_size),
            ..Default::default()
        },
        used: UsedMap::new(file_end / image.geometry.cluster_size())?,
        tables: Vec::new(),
    };
    walk_l1(image, &header, file_end, fix, &mut w)?;
    // Every table is marked before any data entry, so a data entry pointing into a
    // table is the one found shared (and copied), never the table.
    let tables = std::mem::take(&mut w.tables);
    for &(l1_index, l2) in &tables {
        match walk_l2(image, l2, &header, file_end, fix, &mut w) {
            Ok(()) => w.tables.push((l1_index, l2)),
            Err(_) => w.report.check_errors += 1,
        }
    }
    if w.report.check_errors == 0 {
        count_leaks(image, file_end, &mut w);
        // Under the gate, so no discard, move or allocation changes it meanwhile.
        w.report.freed = image.alloc.freed_bytes() / image.geometry.cluster_size();
    }
    if fix && w.report.corruptions_fixed > 0 {
        image.flush_storage()?;
    }
    Ok(w)
}

/// Marks the L1 table and every L2 table it points to, listing the tables to walk.
/// With `fix`, an invalid entry is cleared and a second owner of a table gets a copy.
fn walk_l1(image: &Image, header: &Header, file_end: u64, fix: bool, w: &mut Walk) -> Result<()> {
    let g = image.geometry;
    let cs = g.cluster_size();
    for i in 0..u64::from(header.table_size) {
        w.used.mark(header.l1_table_offset / cs + i);
    }
    let entries = g.entries_per_table();
    let mut l1_chunk = vec![0u64; WALK_CHUNK_ENTRIES.min(entries) as usize];
    let mut start = 0;
    while start < entries {
        let n = (entries - start).min(WALK_CHUNK_ENTRIES);
        let chunk = &mut l1_chunk[..n as usize];
        image
            .read_entries(header.l1_table_offset, start, chunk)
            .context(|| "reading the L1 table".to_string())?;
        let mut fixed = 0;
        for (k, e) in chunk.iter_mut().enumerate() {
            if *e != UNALLOCATED
                && walk_l1_entry(image, header, file_end, fix, start + k as u64, e, w)?
            {
                fixed += 1;
            }
        }
        if fixed > 0 {
            image.flush_storage()?;
            image
                .write_entries(header.l1_table_offset, start, chunk)
                .context(|| "rewriting the L1 table".to_string())?;
            w.report.corruptions_fixed += fixed;
        }
        start += n;
    }
    Ok(())
}

/// Checks one L1 entry `e` (not unallocated). Returns whether it was changed.
fn walk_l1_entry(
    image: &Image,
    header: &Header,
    file_end: u64,
    fix: bool,
    l1_index: u64,
    e: &mut u64,
    w: &mut Walk,
) -> Result<bool> {
    let g = image.geometry;
    let cs = g.cluster_size();
    let l2 = *e;
    if !table_offset_is_valid(header, &g, file_end, l2) {
        w.report.corrupt(Corruption::InvalidL2Offset {
            l1_index,
            value: l2,
        });
        if fix {
            *e = UNALLOCATED;
        }
        return Ok(fix);
    }
    let mut double = false;
    for c in 0..u64::from(header.table_size) {
        double |= !w.used.mark(l2 / cs + c);
    }
    if !double {
        w.tables.push((l1_index, l2));
        return Ok(false);
    }
    w.report.corrupt(Corruption::DoubleReference { offset: l2 });
    if !fix {
        return Ok(false);
    }
    // This owner gets its own copy of the table; the entries of the copy then share
    // their clusters with the original and are copied when its table is walked.
    *e = copy_to_frontier(image, l2, g.table_bytes())?;
    w.tables.push((l1_index, *e));
    Ok(true)
}

/// Counts the clusters from the end of the header area to the end of the file that
/// nothing uses.
fn count_leaks(image: &Image, file_end: u64, w: &mut Walk) {
    let cs = image.geometry.cluster_size();
    for c in image.data_start / cs..file_end / cs {
        if !w.used.is_marked(c) {
            w.report.leaks += 1;
            if w.report.leaked_offsets.len() < MAX_LISTED * 8 {
                w.report.leaked_offsets.push(c * cs);
            }
        }
    }
}

fn walk_l2(
    image: &Image,
    table: u64,
    header: &Header,
    file_end: u64,
    fix: bool,
    w: &mut Walk,
) -> Result<()> {
    let g = image.geometry;
    let cs = g.cluster_size();
    let entries = g.entries_per_table();
    let mut buf = vec![0u64; WALK_CHUNK_ENTRIES.min(entries) as usize];
    let mut last_offset = 0u64;
    let mut start = 0;
    while start < entries {
        let n = (entries - start).min(WALK_CHUNK_ENTRIES);
        let chunk = &mut buf[..n as usize];
        image
            .read_entries(table, start, chunk)
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
                    *e = copy_to_frontier(image, off, cs)?;
                    copied += 1;
                    fixed += 1;
                }
            }
        }
        if fixed > 0 {
            // Copies must be durable before the entries that point at them.
            image.flush_storage()?;
            image
                .write_entries(table, start, chunk)
                .context(|| format!("rewriting the L2 table at {table:#x}"))?;
            w.report.corruptions_fixed += fixed;
            w.report.clusters_copied += copied;
        }
        start += n;
    }
    Ok(())
}

/// Appends a copy of `len` bytes at file offset `from` at the frontier.
pub(super) fn copy_to_frontier(image: &Image, from: u64, len: u64) -> Result<u64> {
    let to = image.reserve(len)?;
    copy_within(image, from, to, len)?;
    Ok(to)
}

/// Copies `len` bytes of the file from `from` to `to`, a megabyte at a time.
pub(super) fn copy_within(image: &Image, from: u64, to: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        image
            .storage
            .read_at(&mut buf[..n], from + done)
            .and_then(|_| image.storage.write_at(&buf[..n], to + done))
            .context(|| format!("copying {len} bytes from {from:#x} to {to:#x}"))?;
        done += n as u64;
    }
    Ok(())
}
