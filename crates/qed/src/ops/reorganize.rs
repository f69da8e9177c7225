//! Compaction and defragmentation: jobs that move clusters inside one image while it is
//! in use, through the engine's freeze-and-swap moves (`Image::move_clusters`,
//! `Image::move_table`), so that guest I/O goes on throughout and a crash at any point
//! leaves every cluster at its old place or its new one.
//!
//! - **Compaction** moves the clusters that lie past where the file could end (the
//!   header, L1, the tables in use and the live clusters) into free space below it,
//!   then cuts the file.
//! - **Defragmentation** puts the L2 tables together after L1, then the data clusters
//!   in guest order, so that a sequential read of the disk reads the file in order. A
//!   place is cleared by moving its occupant out of the way first.
//!
//! While a job runs, clusters that become free (its own old places, discards) are the
//! job's to fill: it writes only to space it owns. What it does not use goes back to
//! the free set at the end, and the file is cut after its last cluster in use.

use super::step::Progress;
use crate::block::BlockDevice;
use crate::engine::{ClusterMove, Image, Layout, Reorganizing};
use crate::error::{Error, Result};
use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

/// Clusters moved in one batch (one freeze, one flush, one swap).
const BATCH: usize = 256;

/// Which job moves the clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reorganization {
    /// Fill free space from the end of the file, then cut it ([`compact`]).
    Compact,
    /// Tables together, then data in guest order ([`defrag`]).
    Defrag,
}

impl Reorganization {
    /// The job's name: `compact` or `defrag`.
    pub fn name(self) -> &'static str {
        match self {
            Reorganization::Compact => "compact",
            Reorganization::Defrag => "defrag",
        }
    }

    /// Runs the job on `image` (see [`compact`] and [`defrag`]).
    pub fn run(
        self,
        image: &Image,
        opts: &ReorganizeOptions<'_>,
        progress: Progress<'_>,
    ) -> Result<ReorganizeEnd> {
        match self {
            Reorganization::Compact => compact(image, opts, progress),
            Reorganization::Defrag => defrag(image, opts, progress),
        }
    }
}

/// How a compaction or defragmentation runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReorganizeOptions<'a> {
    /// Set to stop the job between batches.
    pub cancel: Option<&'a AtomicBool>,
}

/// How a compaction or defragmentation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReorganizeEnd {
    /// Finished.
    Done {
        /// Bytes moved.
        moved: u64,
        /// The file's length afterwards.
        file_len: u64,
    },
    /// Cancelled between batches: what moved stays moved, the rest stays where it was,
    /// and the file is cut after its last cluster in use.
    Cancelled {
        /// Bytes moved.
        moved: u64,
        /// The file's length afterwards.
        file_len: u64,
    },
}

/// Free clusters the job owns, handed back to the image when it ends however it ends.
struct Owned<'a> {
    image: &'a Image,
    clusters: BTreeSet<u64>,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        let left: Vec<u64> = std::mem::take(&mut self.clusters).into_iter().collect();
        self.image.give_back_clusters(&left);
    }
}

impl Owned<'_> {
    /// The lowest run of `n` owned clusters that ends at or before `below`, taken.
    fn take_run_below(&mut self, n: u64, cs: u64, below: u64) -> Option<u64> {
        let mut run_start = 0;
        let mut run_len = 0;
        let mut found = None;
        for &c in &self.clusters {
            if c + cs > below {
                break;
            }
            if run_len > 0 && c == run_start + run_len * cs {
                run_len += 1;
            } else {
                run_start = c;
                run_len = 1;
            }
            if run_len == n {
                found = Some(run_start);
                break;
            }
        }
        let at = found?;
        for i in 0..n {
            self.clusters.remove(&(at + i * cs));
        }
        Some(at)
    }

    /// A run of `n` owned clusters at or after `from`, taken.
    fn take_run_from(&mut self, n: u64, cs: u64, from: u64) -> Option<u64> {
        let mut run_start = 0;
        let mut run_len = 0;
        let mut found = None;
        for &c in self.clusters.range(from..) {
            if run_len > 0 && c == run_start + run_len * cs {
                run_len += 1;
            } else {
                run_start = c;
                run_len = 1;
            }
            if run_len == n {
                found = Some(run_start);
                break;
            }
        }
        let at = found?;
        for i in 0..n {
            self.clusters.remove(&(at + i * cs));
        }
        Some(at)
    }
}

/// Starts a job: refuses read-only images, settles what was freed before, and walks.
fn start(image: &Image) -> Result<(Reorganizing<'_>, Layout)> {
    if image.is_read_only() {
        return Err(Error::ReadOnly);
    }
    let job = image.begin_reorganizing()?;
    // Data clusters that are nothing but holes (parked at a close, or punched by an
    // older discard) read as zeros: freed, they are free space like any other.
    let mut from = 0;
    loop {
        let punched = image.punched_clusters(from, BATCH)?;
        let Some(&(last, _)) = punched.last() else {
            break;
        };
        image.free_punched(&punched)?;
        from = last + image.geometry().cluster_size();
    }
    image.settle_freed()?;
    let layout = image.layout()?;
    Ok((job, layout))
}

/// Ends a job: cuts the file after its last cluster in use (the job's own clusters and
/// the places it left go with the tail, unpunched), then gives back what it still owns
/// and settles what is left below the end.
fn finish(image: &Image, mut owned: Owned<'_>) -> Result<u64> {
    let end = image.cut_free_tail(&mut owned.clusters)?;
    drop(owned);
    image.settle_freed()?;
    Ok(end)
}

fn cancelled(opts: &ReorganizeOptions<'_>) -> bool {
    opts.cancel.is_some_and(|c| c.load(Ordering::Acquire))
}

fn ended(cancel: bool, moved: u64, file_len: u64) -> ReorganizeEnd {
    if cancel {
        ReorganizeEnd::Cancelled { moved, file_len }
    } else {
        ReorganizeEnd::Done { moved, file_len }
    }
}

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
    let (job, layout) = start(image)?;
    let cs = layout.cluster_size;
    let tb = layout.table_bytes;
    let target = layout.start + layout.used_bytes();
    let mut owned = Owned {
        image,
        clusters: layout.holes.iter().copied().collect(),
    };
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
    let mut guest_of = HashMap::new();
    image.data_runs(|guest, file, n| {
        for i in 0..n {
            if file + i * cs < below {
                guest_of.insert(file + i * cs, guest + i * cs);
            }
        }
        ControlFlow::Continue(())
    })?;
    let mut w = layout.start;
    while w + tc * cs <= below {
        let run: Vec<u64> = (0..tc).map(|i| w + i * cs).collect();
        if !run
            .iter()
            .all(|c| owned.clusters.contains(c) || guest_of.contains_key(c))
        {
            w += cs;
            continue;
        }
        let data: Vec<u64> = run
            .iter()
            .copied()
            .filter(|c| guest_of.contains_key(c))
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
            .map(|(&from, &to)| ClusterMove {
                guest: guest_of[&from],
                from,
                to,
            })
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
    let (job, layout) = start(image)?;
    let cs = layout.cluster_size;
    let tb = layout.table_bytes;
    let tc = tb / cs;
    let header = image.header();
    let l1 = header.l1_table_offset..header.l1_table_offset + tb;
    let mut owned = Owned {
        image,
        clusters: layout.holes.iter().copied().collect(),
    };
    let mut places = Places {
        cs,
        tc,
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
    // Targets: consecutive from the end of the header area, around L1.
    let mut plan = Vec::with_capacity(order.len());
    let mut t = layout.start;
    for unit in order {
        let len = places.len(unit) * cs;
        if t < l1.end && t + len > l1.start {
            t = l1.end;
        }
        plan.push(Placement { unit, target: t });
        t += len;
    }
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
