//! Defragmentation: the L2 tables together after L1, then the data clusters in guest
//! order, each target cleared of its occupant first.

use super::job::{cancelled, ended, finish, start, Owned, ReorganizeEnd, ReorganizeOptions, BATCH};
use crate::engine::{ClusterMove, Image, Layout, Reorganizing};
use crate::error::Result;
use crate::ops::step::Progress;
use std::collections::HashMap;
use std::ops::ControlFlow;

/// What occupies a cluster of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Unit {
    /// The data of the guest cluster at this offset.
    Data(u64),
    /// The L2 table of this L1 entry (each of its clusters maps to it).
    Table(u64),
}

/// A unit and where defragmentation puts it.
#[derive(Debug, Clone, Copy)]
struct Placement {
    unit: Unit,
    target: u64,
}

/// The file as defragmentation changes it: which unit is where.
struct Places {
    cs: u64,
    tc: u64,
    /// First cluster of each unit's current place.
    at: HashMap<Unit, u64>,
    /// The unit at each cluster.
    by_cluster: HashMap<u64, Unit>,
}

impl Places {
    fn len(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Data(_) => 1,
            Unit::Table(_) => self.tc,
        }
    }

    fn put(&mut self, unit: Unit, at: u64) {
        if let Some(old) = self.at.insert(unit, at) {
            for i in 0..self.len(unit) {
                self.by_cluster.remove(&(old + i * self.cs));
            }
        }
        for i in 0..self.len(unit) {
            self.by_cluster.insert(at + i * self.cs, unit);
        }
    }

    fn forget_cluster(&mut self, at: u64) {
        if let Some(unit) = self.by_cluster.remove(&at) {
            self.at.remove(&unit);
        }
    }
}

/// Defragments `image`: L2 tables together after L1 (in L1 order), then every data
/// cluster in guest order, so that guest-contiguous data is file-contiguous; the file is
/// cut after its last cluster in use. `progress` is called with units placed and units
/// to place, in bytes.
pub fn defrag(
    image: &Image,
    opts: &ReorganizeOptions<'_>,
    progress: Progress<'_>,
) -> Result<ReorganizeEnd> {
    let (job, layout) = start(image, opts)?;
    let cs = layout.cluster_size;
    let header = image.header();
    let l1 = header.l1_table_offset..header.l1_table_offset + layout.table_bytes;
    let mut owned = Owned::holes(image, &layout);
    let (mut places, order) = survey(image, &layout)?;
    let plan = targets(&layout, &places, order, l1);
    let total = plan.len() as u64;
    let mut moved = 0;
    progress(0, total);
    let mut stop = false;
    let mut settled_at = 0;
    let mut i = 0;
    while i < plan.len() {
        if cancelled(opts) {
            stop = true;
            break;
        }
        // A window of units whose targets span at most a batch of clusters.
        let mut j = i;
        let window_start = plan[i].target;
        while j < plan.len() && plan[j].target < window_start + BATCH as u64 * cs {
            j += 1;
        }
        let window_end = plan[j - 1].target + places.len(plan[j - 1].unit) * cs;
        if moved > settled_at {
            // The places the last window's units left may be this one's targets.
            image.settle_freed()?;
            settled_at = moved;
        }
        claim_ready(&job, &mut owned, &mut places);
        let evicted = clear_targets(&plan[i..j], &places, &owned);
        if !evicted.is_empty() {
            moved += evict(image, &job, &evicted, &mut owned, &mut places, window_end)?;
            image.settle_freed()?;
            settled_at = moved;
            claim_ready(&job, &mut owned, &mut places);
        }
        moved += place(image, &plan[i..j], &mut owned, &mut places)?;
        i = j;
        progress(i as u64, total);
    }
    drop(job);
    let file_len = finish(image, owned)?;
    progress(total, total);
    Ok(ended(stop, moved, file_len))
}

/// Where every unit is now, and the order they go in: the tables in L1 order, then the
/// data in guest order.
fn survey(image: &Image, layout: &Layout) -> Result<(Places, Vec<Unit>)> {
    let cs = layout.cluster_size;
    let mut places = Places {
        cs,
        tc: layout.table_bytes / cs,
        at: HashMap::new(),
        by_cluster: HashMap::new(),
    };
    let mut order = Vec::new();
    let mut tables = layout.tables.clone();
    tables.sort_unstable();
    for &(l1_index, at) in &tables {
        places.put(Unit::Table(l1_index), at);
        order.push(Unit::Table(l1_index));
    }
    image.data_runs(|guest, file, n| {
        for i in 0..n {
            let unit = Unit::Data(guest + i * cs);
            places.put(unit, file + i * cs);
            order.push(unit);
        }
        ControlFlow::Continue(())
    })?;
    Ok((places, order))
}

/// Targets for the units in `order`: consecutive from the end of the header area,
/// around L1 (the bytes `l1`).
fn targets(
    layout: &Layout,
    places: &Places,
    order: Vec<Unit>,
    l1: std::ops::Range<u64>,
) -> Vec<Placement> {
    let mut plan = Vec::with_capacity(order.len());
    let mut t = layout.start;
    for unit in order {
        let len = places.len(unit) * layout.cluster_size;
        if t < l1.end && t + len > l1.start {
            t = l1.end;
        }
        plan.push(Placement { unit, target: t });
        t += len;
    }
    plan
}

/// Takes the clusters that became ready into the job's own, forgetting what occupied
/// them (a unit moved away or discarded).
fn claim_ready(job: &Reorganizing<'_>, owned: &mut Owned<'_>, places: &mut Places) {
    for c in job.take_ready() {
        places.forget_cluster(c);
        owned.clusters.insert(c);
    }
}

/// The units that occupy the targets of `window` without belonging there.
fn clear_targets(window: &[Placement], places: &Places, owned: &Owned<'_>) -> Vec<Unit> {
    let cs = places.cs;
    let mut evict = Vec::new();
    for p in window {
        if places.at.get(&p.unit) == Some(&p.target) {
            continue;
        }
        for k in 0..places.len(p.unit) {
            let c = p.target + k * cs;
            if owned.clusters.contains(&c) {
                continue;
            }
            // A table that overlaps its own target moves out of the way too.
            if let Some(&other) = places.by_cluster.get(&c) {
                if !evict.contains(&other) {
                    evict.push(other);
                }
            }
        }
    }
    evict
}

/// Moves `units` out of the way: to owned space past `window_end`, else to new space at
/// the end of the file. Returns bytes moved.
fn evict(
    image: &Image,
    job: &Reorganizing<'_>,
    units: &[Unit],
    owned: &mut Owned<'_>,
    places: &mut Places,
    window_end: u64,
) -> Result<u64> {
    let cs = places.cs;
    let mut moved = 0;
    let mut moves = Vec::new();
    for &unit in units {
        let Some(&from) = places.at.get(&unit) else {
            continue;
        };
        let n = places.len(unit);
        let to = match owned.take_run_from(n, cs, window_end) {
            Some(to) => to,
            None => job.reserve_at_end(n * cs)?,
        };
        match unit {
            Unit::Table(l1_index) => {
                if image.move_table(l1_index, from, to)? {
                    places.put(unit, to);
                    moved += n * cs;
                } else {
                    owned.clusters.extend((0..n).map(|i| to + i * cs));
                }
            }
            Unit::Data(guest) => moves.push(ClusterMove { guest, from, to }),
        }
    }
    moved += move_data(image, &moves, owned, places)?;
    Ok(moved)
}

/// Moves the units of `window` whose targets the job owns into them. Returns bytes
/// moved.
fn place(
    image: &Image,
    window: &[Placement],
    owned: &mut Owned<'_>,
    places: &mut Places,
) -> Result<u64> {
    let cs = places.cs;
    let mut moved = 0;
    let mut moves = Vec::new();
    for p in window {
        let Some(&from) = places.at.get(&p.unit) else {
            continue;
        };
        let n = places.len(p.unit);
        if from == p.target || !(0..n).all(|k| owned.clusters.contains(&(p.target + k * cs))) {
            continue;
        }
        for k in 0..n {
            owned.clusters.remove(&(p.target + k * cs));
        }
        match p.unit {
            Unit::Table(l1_index) => {
                if image.move_table(l1_index, from, p.target)? {
                    places.put(p.unit, p.target);
                    moved += n * cs;
                } else {
                    owned.clusters.extend((0..n).map(|k| p.target + k * cs));
                }
            }
            Unit::Data(guest) => moves.push(ClusterMove {
                guest,
                from,
                to: p.target,
            }),
        }
    }
    moved += move_data(image, &moves, owned, places)?;
    Ok(moved)
}

/// Moves data clusters in batches, recording where they went. Returns bytes moved.
fn move_data(
    image: &Image,
    moves: &[ClusterMove],
    owned: &mut Owned<'_>,
    places: &mut Places,
) -> Result<u64> {
    let mut moved = 0;
    for batch in moves.chunks(BATCH) {
        let result = image.move_clusters(batch)?;
        for m in batch {
            if !result.unused.contains(&m.to) {
                places.put(Unit::Data(m.guest), m.to);
            }
        }
        owned.clusters.extend(result.unused);
        moved += result.moved * places.cs;
    }
    Ok(moved)
}
