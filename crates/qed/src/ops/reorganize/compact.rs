//! Compaction: the clusters past where the file could end move into free space below
//! it, and the file is cut there.

use super::job::{cancelled, ended, finish, start, Owned, ReorganizeEnd, ReorganizeOptions, BATCH};
use crate::engine::{ClusterMove, Image, Layout, Reorganizing};
use crate::error::Result;
use crate::ops::step::Progress;
use std::ops::ControlFlow;

/// Compacts `image`: moves the clusters past where the file could end into free space
/// below it, then cuts the file there. Afterwards the file is the header, L1, the L2
/// tables and the data clusters in use: a table that no free run below takes gets one
/// made for it by moving data aside. (Only tables and L1 packed so that no run of a
/// table's length is free of them could keep a table past the end.) `progress` is called with bytes considered and bytes to consider.
pub fn compact(
    image: &Image,
    opts: &ReorganizeOptions<'_>,
    progress: Progress<'_>,
) -> Result<ReorganizeEnd> {
    let (job, layout) = start(image, opts)?;
    let cs = layout.cluster_size;
    let tb = layout.table_bytes;
    let target = layout.start + layout.used_bytes();
    let mut owned = Owned::holes(image, &layout);
    let mut tables: Vec<(u64, u64)> = layout
        .tables
        .iter()
        .copied()
        .filter(|&(_, at)| at + tb > target)
        .collect();
    tables.sort_by_key(|&(_, at)| std::cmp::Reverse(at));
    let mut data = Vec::new();
    image.data_runs(|guest, file, n| {
        for i in 0..n {
            if file + i * cs >= target {
                data.push((guest + i * cs, file + i * cs));
            }
        }
        ControlFlow::Continue(())
    })?;
    // In file order into holes in file order: clusters that were together stay
    // together, in the order they were.
    data.sort_by_key(|&(_, at)| at);
    let total = tables.len() as u64 * tb + data.len() as u64 * cs;
    let mut done = 0;
    let mut moved = 0;
    progress(0, total);
    let mut stop = false;
    for &(l1_index, at) in &tables {
        if cancelled(opts) {
            stop = true;
            break;
        }
        moved += compact_table(image, &job, &mut owned, &layout, target, l1_index, at)?;
        done += tb;
        progress(done, total);
    }
    for batch in data.chunks(BATCH) {
        if stop || cancelled(opts) {
            stop = true;
            break;
        }
        let mut moves = Vec::with_capacity(batch.len());
        for &(guest, from) in batch {
            match owned.clusters.first() {
                Some(&to) if to < from => {
                    owned.clusters.pop_first();
                    moves.push(ClusterMove { guest, from, to });
                }
                _ => break,
            }
        }
        if moves.is_empty() {
            break;
        }
        let result = image.move_clusters(&moves)?;
        owned.clusters.extend(result.unused);
        moved += result.moved * cs;
        done += batch.len() as u64 * cs;
        progress(done, total);
    }
    let file_len = finish(image, owned)?;
    progress(total, total);
    Ok(ended(stop, moved, file_len))
}

/// Moves the table of `l1_index` from `at` to below `target` if it lies past it: into a
/// free run, or one made by moving data aside. When even that finds no room (the free
/// clusters are fewer than a table's, and the table's own place is needed), the table
/// first goes to the end of the file, which frees its place for the room. Returns bytes
/// moved.
fn compact_table(
    image: &Image,
    job: &Reorganizing<'_>,
    owned: &mut Owned<'_>,
    layout: &Layout,
    target: u64,
    l1_index: u64,
    mut at: u64,
) -> Result<u64> {
    let cs = layout.cluster_size;
    let tb = layout.table_bytes;
    let mut moved = 0;
    for attempt in 0..2 {
        let room = match owned.take_run_below(tb / cs, cs, at.min(target)) {
            Some(to) => Some(to),
            None => clear_room(image, job, owned, layout, target.min(at))?,
        };
        let Some(to) = room else {
            if attempt > 0 {
                break;
            }
            let end = job.reserve_at_end(tb)?;
            if !image.move_table(l1_index, at, end)? {
                owned.clusters.extend((0..tb / cs).map(|i| end + i * cs));
                break;
            }
            moved += tb;
            at = end;
            image.settle_freed()?;
            owned.clusters.extend(job.take_ready());
            continue;
        };
        if image.move_table(l1_index, at, to)? {
            moved += tb;
        } else {
            owned.clusters.extend((0..tb / cs).map(|i| to + i * cs));
        }
        break;
    }
    Ok(moved)
}

/// Makes room below `below` for a table that no run of free clusters takes: the lowest
/// run of a table's length made only of free clusters and data clusters whose data can
/// move to free clusters outside it (below `below` too). The data moves out, and the run
/// is returned, owned whole. `None` when there is no such run (tables and L1 in the
/// way), or the guest changed a cluster of it meanwhile.
fn clear_room(
    image: &Image,
    job: &Reorganizing<'_>,
    owned: &mut Owned<'_>,
    layout: &Layout,
    below: u64,
) -> Result<Option<u64>> {
    let cs = layout.cluster_size;
    let tc = layout.table_bytes / cs;
    // (file offset, guest offset) of the data below, sorted by file offset: built once
    // a call, it is searched a few times for each candidate run, and a vector sorts the
    // hundreds of thousands of clusters of a large image many times faster than a hash
    // map takes them.
    let mut by_file = Vec::new();
    image.data_runs(|guest, file, n| {
        for i in 0..n {
            if file + i * cs < below {
                by_file.push((file + i * cs, guest + i * cs));
            }
        }
        ControlFlow::Continue(())
    })?;
    by_file.sort_unstable();
    let guest_at = |c: &u64| {
        by_file
            .binary_search_by_key(c, |&(f, _)| f)
            .ok()
            .map(|i| by_file[i].1)
    };
    let mut w = layout.start;
    while w + tc * cs <= below {
        let run: Vec<u64> = (0..tc).map(|i| w + i * cs).collect();
        if !run
            .iter()
            .all(|c| owned.clusters.contains(c) || guest_at(c).is_some())
        {
            w += cs;
            continue;
        }
        let data: Vec<(u64, u64)> = run
            .iter()
            .filter_map(|c| guest_at(c).map(|g| (*c, g)))
            .collect();
        let spare: Vec<u64> = owned
            .clusters
            .range(..below)
            .copied()
            .filter(|c| !run.contains(c))
            .take(data.len())
            .collect();
        if spare.len() < data.len() {
            return Ok(None);
        }
        for c in &spare {
            owned.clusters.remove(c);
        }
        let moves: Vec<ClusterMove> = data
            .iter()
            .zip(&spare)
            .map(|(&(from, guest), &to)| ClusterMove { guest, from, to })
            .collect();
        let result = image.move_clusters(&moves)?;
        let complete = result.unused.is_empty();
        owned.clusters.extend(result.unused);
        // The places the data left become free once the swaps are durable.
        image.settle_freed()?;
        owned.clusters.extend(job.take_ready());
        if !complete || !run.iter().all(|c| owned.clusters.contains(c)) {
            return Ok(None);
        }
        for c in &run {
            owned.clusters.remove(c);
        }
        return Ok(Some(w));
    }
    Ok(None)
}
