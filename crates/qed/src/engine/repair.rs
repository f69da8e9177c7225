//! Reclaiming leaked clusters: fill holes with the clusters at the end of the file,
//! truncate, and punch out what cannot be filled.
//!
//! The order keeps every crash state consistent: copies are written only into leaked
//! clusters (which nothing references) and made durable before any entry points at
//! them; the sources stay intact until every reference has moved and been flushed, and
//! only then is the file truncated.

use super::check::{CheckReport, UsedMap, Walk};
use super::Image;
use crate::error::{IoContext, Result};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// One unit moved down the file: a data cluster, or a whole L2 table.
struct Move {
    /// First cluster index of the source.
    src: u64,
    /// First cluster index of the destination.
    dst: u64,
    /// Clusters in the unit.
    len: u64,
    /// For a table, its L1 index.
    l1_index: Option<u64>,
}

/// Lowest run of `len` unused clusters starting at or after `from` and ending at or
/// before `limit`.
fn find_free_run(used: &UsedMap, from: u64, limit: u64, len: u64) -> Option<u64> {
    let mut start = from;
    while start + len <= limit {
        match (start..start + len).find(|&c| used.is_marked(c)) {
            None => return Some(start),
            Some(taken) => start = taken + 1,
        }
    }
    None
}

impl Image {
    /// Reclaims the leaks a walk found. With `moves_allowed` (no corruption left), units
    /// at the end of the file are moved into holes so the file can shrink; leaks that
    /// remain inside the file are punched out.
    pub(super) fn reclaim_leaks(
        &self,
        w: Walk,
        mut report: CheckReport,
        moves_allowed: bool,
    ) -> Result<CheckReport> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let k = u64::from(g.table_size());
        let header = self.header_read().clone();
        let l1_first = header.l1_table_offset / cs;
        let first_data = self.data_start / cs;
        let mut used = w.used;
        let total = used.len();

        let table_by_end: HashMap<u64, (u64, u64)> = w
            .tables
            .iter()
            .map(|&(l1_index, off)| (off / cs + k - 1, (l1_index, off / cs)))
            .collect();

        let mut moves = Vec::new();
        let mut top = total;
        let mut hole = first_data;
        // End of the highest unit moved so far. The file cannot end below it, so moving
        // anything under it gains nothing; and the clusters there are copies already
        // planned, which the scan would otherwise take for units of their own (the upper
        // clusters of a table, for instance, for data clusters).
        let mut placed_end = 0;
        loop {
            if !moves_allowed {
                break;
            }
            while top > first_data && !used.is_marked(top - 1) {
                top -= 1;
            }
            if top <= first_data || top <= placed_end {
                break;
            }
            let last = top - 1;
            if (l1_first..l1_first + k).contains(&last) {
                break;
            }
            let (start, l1_index) = match table_by_end.get(&last) {
                Some(&(i, s)) => (s, Some(i)),
                None => (last, None),
            };
            let len = last - start + 1;
            while hole < start && used.is_marked(hole) {
                hole += 1;
            }
            let Some(dst) = find_free_run(&used, hole, start, len) else {
                break;
            };
            for c in 0..len {
                used.mark(dst + c);
                used.unmark(start + c);
            }
            moves.push(Move {
                src: start,
                dst,
                len,
                l1_index,
            });
            placed_end = placed_end.max(dst + len);
            top = start;
        }

        // 1. Copy every unit into its hole, durably.
        for m in &moves {
            self.copy_within(m.src * cs, m.dst * cs, m.len * cs)?;
        }
        if !moves.is_empty() {
            self.flush_storage()?;
        }

        // 2. Point data entries at the copies, in each table's final location.
        let data_moves: HashMap<u64, u64> = moves
            .iter()
            .filter(|m| m.l1_index.is_none())
            .map(|m| (m.src * cs, m.dst * cs))
            .collect();
        let table_moves: HashMap<u64, u64> = moves
            .iter()
            .filter_map(|m| m.l1_index.map(|i| (i, m.dst * cs)))
            .collect();
        if !data_moves.is_empty() {
            for &(l1_index, off) in &w.tables {
                let table = table_moves.get(&l1_index).copied().unwrap_or(off);
                self.retarget_entries(table, &data_moves)?;
            }
            self.flush_storage()?;
        }

        // 3. Point L1 at the moved tables.
        if !table_moves.is_empty() {
            let mut entry = [0u64; 1];
            for (&l1_index, &to) in &table_moves {
                entry[0] = to;
                let mut sector = [0u64; super::ENTRIES_PER_SECTOR as usize];
                let first = l1_index / super::ENTRIES_PER_SECTOR * super::ENTRIES_PER_SECTOR;
                self.read_entries(header.l1_table_offset, first, &mut sector)
                    .context(|| "reading the L1 table".to_string())?;
                sector[(l1_index - first) as usize] = entry[0];
                self.write_entries(header.l1_table_offset, first, &sector)
                    .context(|| "writing the L1 table".to_string())?;
            }
            self.flush_storage()?;
        }

        // 4. Cut the unused tail.
        let mut end = total;
        while end > first_data && !used.is_marked(end - 1) {
            end -= 1;
        }
        let end = end.max(l1_first + k);
        let mut grow = self.lock_grow();
        let old_len = self
            .storage
            .len()
            .context(|| format!("reading the size of {}", self.name))?;
        if end * cs < old_len {
            self.storage
                .set_len(end * cs)
                .and_then(|_| self.storage.flush())
                .context(|| format!("truncating {}", self.name))?;
            // Space the file had only grown ahead is not the image's to report.
            let used_end = if grow.file_len > self.file_clusters_end() {
                self.file_clusters_end()
            } else {
                old_len
            };
            report.bytes_truncated = used_end.saturating_sub(end * cs);
        }
        grow.file_len = old_len.min(end * cs);
        self.frontier.store(end * cs, Ordering::Release);
        drop(grow);

        // 5. Punch out the leaks that remain inside the file.
        let mut c = first_data;
        while c < end {
            if used.is_marked(c) {
                c += 1;
                continue;
            }
            let run_start = c;
            while c < end && !used.is_marked(c) {
                c += 1;
            }
            report.leaks_punched += c - run_start;
            self.storage
                .zero_range(run_start * cs, (c - run_start) * cs)
                .context(|| format!("releasing leaked clusters of {}", self.name))?;
        }
        report.clusters_moved = moves.iter().map(|m| m.len).sum();
        report.leaks_fixed = report.leaks;
        Ok(report)
    }

    /// Rewrites the entries of the table at `table` that point at a moved cluster.
    fn retarget_entries(&self, table: u64, moved: &HashMap<u64, u64>) -> Result<()> {
        let entries = self.geometry.entries_per_table();
        let chunk_len = entries.min(8192);
        let mut chunk = vec![0u64; chunk_len as usize];
        let mut start = 0;
        while start < entries {
            self.read_entries(table, start, &mut chunk)
                .context(|| format!("reading the L2 table at {table:#x}"))?;
            let mut changed = false;
            for e in chunk.iter_mut() {
                if let Some(&to) = moved.get(e) {
                    *e = to;
                    changed = true;
                }
            }
            if changed {
                self.write_entries(table, start, &chunk)
                    .context(|| format!("writing the L2 table at {table:#x}"))?;
            }
            start += chunk_len;
        }
        Ok(())
    }
}
