//! Repairs: `check -r`, with its two parts, fixing corruptions (in the check's walk)
//! and reclaiming leaks: fill holes with the clusters at the end of the file, truncate,
//! and punch out what cannot be filled.
//!
//! The order keeps every crash state consistent: copies are written only into leaked
//! clusters (which nothing references) and made durable before any entry points at
//! them; the sources stay intact until every reference has moved and been flushed, and
//! only then is the file truncated.

use super::check::{UsedMap, Walk};
use super::image::Image;
use super::report::{CheckReport, RepairMode};
use crate::error::{Error, IoContext, Result};
use crate::format::table::ENTRIES_PER_SECTOR;
use std::collections::HashMap;

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

/// Checks the metadata and repairs it (see [`RepairMode`] and docs/design.md). On
/// success, with no corruption left, NEED_CHECK is cleared.
pub(super) fn repair(image: &mut Image, mode: RepairMode) -> Result<CheckReport> {
    if image.read_only {
        return Err(Error::ReadOnly);
    }
    // The repair decides from the file alone: clusters freed while open are leaks
    // to it, reclaimed or left as such.
    image.alloc.forget_freed();
    let result = repair_tables(image, mode);
    if result.is_err() {
        // The repair may have rewritten tables, moved them or truncated the file
        // before it failed: drop what memory holds of them, or later requests would
        // update tables the file no longer uses.
        image.tables.forget_cached();
        if reload_tables(image).is_err() {
            image.tables.mark_l1_stale();
        }
    }
    result
}

fn repair_tables(image: &mut Image, mode: RepairMode) -> Result<CheckReport> {
    let first = super::check::walk(image, mode == RepairMode::All)?;
    let mut report = first.report.clone();
    // Repairs may have appended copies; walk again for an exact picture of leaks.
    let walk = if report.corruptions_fixed > 0 {
        let again = super::check::walk(image, false)?;
        report.leaks = again.report.leaks;
        report.check_errors += again.report.check_errors;
        again
    } else {
        first
    };
    if report.check_errors == 0 && report.leaks > 0 {
        let moves_allowed = walk.report.corruptions == 0;
        report = reclaim_leaks(image, walk, report, moves_allowed)?;
    }
    reload_tables(image)?;
    if report.corruptions_remaining() == 0 && report.check_errors == 0 {
        image.mark_checked()?;
    }
    report.leaked_offsets.clear();
    Ok(report)
}

/// Reclaims leaked clusters (after a shrink): a repair limited to leaks.
pub(super) fn repair_leaks(image: &mut Image) -> Result<()> {
    repair(image, RepairMode::Leaks).map(|_| ())
}

/// Re-reads L1 and drops cached L2 pages after tables were rewritten on disk, and
/// takes the frontier from the file again: space grown ahead (by copies a repair
/// appended) goes first, so that the file's length is the frontier again.
fn reload_tables(image: &Image) -> Result<()> {
    image.load_l1()?;
    image.tables.forget_cached();
    image
        .alloc
        .reload(&*image.storage, &image.geometry, &image.name)
}

/// Reclaims the leaks a walk found. With `moves_allowed` (no corruption left), units
/// at the end of the file are moved into holes so the file can shrink; leaks that
/// remain inside the file are punched out.
fn reclaim_leaks(
    image: &Image,
    w: Walk,
    mut report: CheckReport,
    moves_allowed: bool,
) -> Result<CheckReport> {
    let mut used = w.used;
    let moves = if moves_allowed {
        plan_moves(image, &mut used, &w.tables)
    } else {
        Vec::new()
    };
    copy_units(image, &moves)?;
    retarget_data(image, &moves, &w.tables)?;
    retarget_tables(image, &moves)?;
    let end = used_end(image, &used);
    report.bytes_truncated = image.alloc.cut(&*image.storage, end, &image.name)?;
    report.leaks_punched = punch_leaks(image, &used, end)?;
    report.clusters_moved = moves.iter().map(|m| m.len).sum();
    report.leaks_fixed = report.leaks;
    Ok(report)
}

/// Plans the moves: the units at the end of the file (data clusters, and whole L2
/// tables when a run of free clusters large enough exists), each into the lowest
/// hole that takes it, until a unit finds none. `used` then shows the file after the
/// moves.
fn plan_moves(image: &Image, used: &mut UsedMap, tables: &[(u64, u64)]) -> Vec<Move> {
    let cs = image.geometry.cluster_size();
    let k = u64::from(image.geometry.table_size());
    let l1_first = image.tables.l1_offset() / cs;
    let first_data = image.data_start / cs;
    let table_by_end: HashMap<u64, (u64, u64)> = tables
        .iter()
        .map(|&(l1_index, off)| (off / cs + k - 1, (l1_index, off / cs)))
        .collect();
    let mut moves = Vec::new();
    let mut top = used.len();
    let mut hole = first_data;
    // End of the highest unit moved so far. The file cannot end below it, so moving
    // anything under it gains nothing; and the clusters there are copies already
    // planned, which the scan would otherwise take for units of their own (the upper
    // clusters of a table, for instance, for data clusters).
    let mut placed_end = 0;
    loop {
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
        let Some(dst) = find_free_run(used, hole, start, len) else {
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
    moves
}

/// Step 1: copies every unit into its hole, durably.
fn copy_units(image: &Image, moves: &[Move]) -> Result<()> {
    let cs = image.geometry.cluster_size();
    for m in moves {
        super::check::copy_within(image, m.src * cs, m.dst * cs, m.len * cs)?;
    }
    if !moves.is_empty() {
        image.flush_storage()?;
    }
    Ok(())
}

/// Step 2: points data entries at the copies, in each table's final location.
fn retarget_data(image: &Image, moves: &[Move], tables: &[(u64, u64)]) -> Result<()> {
    let cs = image.geometry.cluster_size();
    let data_moves: HashMap<u64, u64> = moves
        .iter()
        .filter(|m| m.l1_index.is_none())
        .map(|m| (m.src * cs, m.dst * cs))
        .collect();
    if data_moves.is_empty() {
        return Ok(());
    }
    let table_moves: HashMap<u64, u64> = moves
        .iter()
        .filter_map(|m| m.l1_index.map(|i| (i, m.dst * cs)))
        .collect();
    for &(l1_index, off) in tables {
        let table = table_moves.get(&l1_index).copied().unwrap_or(off);
        retarget_entries(image, table, &data_moves)?;
    }
    image.flush_storage()
}

/// Step 3: points L1 at the moved tables.
fn retarget_tables(image: &Image, moves: &[Move]) -> Result<()> {
    let cs = image.geometry.cluster_size();
    let l1 = image.tables.l1_offset();
    let mut any = false;
    for m in moves {
        let Some(l1_index) = m.l1_index else {
            continue;
        };
        let mut sector = [0u64; ENTRIES_PER_SECTOR as usize];
        let first = l1_index / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        image
            .read_entries(l1, first, &mut sector)
            .context(|| "reading the L1 table".to_string())?;
        sector[(l1_index - first) as usize] = m.dst * cs;
        image
            .write_entries(l1, first, &sector)
            .context(|| "writing the L1 table".to_string())?;
        any = true;
    }
    if any {
        image.flush_storage()?;
    }
    Ok(())
}

/// Where the file can end once the moves are done: after its last used cluster, and
/// never inside the L1 table.
fn used_end(image: &Image, used: &UsedMap) -> u64 {
    let cs = image.geometry.cluster_size();
    let first_data = image.data_start / cs;
    let mut end = used.len();
    while end > first_data && !used.is_marked(end - 1) {
        end -= 1;
    }
    end.max(image.tables.l1_offset() / cs + u64::from(image.geometry.table_size())) * cs
}

/// Step 5: punches out the leaks that remain inside the file. Returns how many
/// clusters that was.
fn punch_leaks(image: &Image, used: &UsedMap, end: u64) -> Result<u64> {
    let cs = image.geometry.cluster_size();
    let end = end / cs;
    let mut punched = 0;
    let mut c = image.data_start / cs;
    while c < end {
        if used.is_marked(c) {
            c += 1;
            continue;
        }
        let run_start = c;
        while c < end && !used.is_marked(c) {
            c += 1;
        }
        punched += c - run_start;
        image
            .storage
            .zero_range(run_start * cs, (c - run_start) * cs)
            .context(|| format!("releasing leaked clusters of {}", image.name))?;
    }
    Ok(punched)
}

/// Rewrites the entries of the table at `table` that point at a moved cluster.
fn retarget_entries(image: &Image, table: u64, moved: &HashMap<u64, u64>) -> Result<()> {
    let entries = image.geometry.entries_per_table();
    let chunk_len = entries.min(8192);
    let mut chunk = vec![0u64; chunk_len as usize];
    let mut start = 0;
    while start < entries {
        image
            .read_entries(table, start, &mut chunk)
            .context(|| format!("reading the L2 table at {table:#x}"))?;
        let mut changed = false;
        for e in chunk.iter_mut() {
            if let Some(&to) = moved.get(e) {
                *e = to;
                changed = true;
            }
        }
        if changed {
            image
                .write_entries(table, start, &chunk)
                .context(|| format!("writing the L2 table at {table:#x}"))?;
        }
        start += chunk_len;
    }
    Ok(())
}
