//! File clusters that stopped being mapped while the image is open (a discard freed
//! them, or a move left them behind), on their way back to allocations.
//!
//! A freed cluster may be handed out again only when
//! 1. the entry that dropped it is durable: otherwise a crash could leave the old entry
//!    and the new owner's entry on one cluster;
//! 2. every request that could still be using the old mapping has finished (its epoch
//!    has passed, see `epochs.rs`);
//! 3. it reads as zeros, durably, as space at the frontier does: allocations write only
//!    the bytes they are given, and a crash must not expose what the cluster held.
//!
//! Flushes move clusters along: those freed before a flush are durably dropped after it
//! (`durable`); a later flush punches those whose epoch has passed, and after it they
//! are `ready`. A cluster a discard freed needs only one flush when its epoch has passed
//! by then: the flush punches it before it writes the drop back, and after it both are
//! durable. Its bytes were the guest's to lose (a crash that keeps the old entry reads
//! zeros there, which a discard allows). A cluster a move left keeps the data its old
//! entry names until the new entry is durable, so it is never punched before. Nothing here is written to the file: the format has no free list, so a
//! process that dies leaves its freed clusters as leaks, which the check reclaims.

use super::epochs::Epochs;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Ready runs looked at, at most, for one allocation of several clusters: past that the
/// allocation goes to the frontier rather than search a fragmented set.
const SEARCH_RUNS: usize = 64;

/// A run of freed file clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Freed {
    /// File offset of the first cluster.
    pub(super) at: u64,
    /// Bytes.
    pub(super) len: u64,
    /// The epoch in which the last entry naming it was dropped.
    pub(super) epoch: u64,
    /// Its bytes were punched (they read as zeros) before the drop became durable.
    pub(super) punched: bool,
    /// The guest offset whose entry named it (the first cluster's), for a discard: a
    /// close parks what was not reused back there (see [`FreeSet::take_to_park`]).
    pub(super) guest: Option<u64>,
}

/// The clusters on their way back.
#[derive(Debug, Default)]
pub(super) struct FreeSet {
    state: Mutex<FreeState>,
    /// Bytes ready to hand out: allocations look at nothing else while it is 0.
    ready_bytes: AtomicU64,
    /// Bytes freed and not handed out again, in every state.
    freed_bytes: AtomicU64,
    /// A job that moves clusters takes every ready cluster for itself while it runs.
    held_for_job: AtomicBool,
    /// Signalled when a flush gives back the runs it took along.
    flush_ended: Condvar,
}

/// What [`FreeSet::reclaim`] answers for the first bytes of a request's clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reclaim {
    /// No discard freed any of them: allocate anywhere.
    Nothing,
    /// The first `len` bytes are back at `at`, the clusters a discard freed from them.
    Taken { at: u64, len: u64 },
    /// The first `len` bytes own nothing; those after them do.
    Elsewhere { len: u64 },
    /// The first cluster's run is in the hands of a flush under way: wait for it.
    Busy,
}

#[derive(Debug, Default)]
struct FreeState {
    /// Dropped in memory; the drop may not be on disk yet.
    pending: Vec<Freed>,
    /// Dropped durably; waiting for their epoch to pass, or for their punch to be
    /// durable.
    durable: Vec<Freed>,
    /// Ready to hand out: start -> length, runs merged.
    ready: BTreeMap<u64, u64>,
    /// Runs a discard freed and nobody took since, with the guest offsets that named them.
    owners: Owners,
    /// Runs a flush has taken along (in its [`FlushStage`]) and not given back yet: free,
    /// and nobody's to use meanwhile.
    staged: Vec<(u64, u64)>,
}

impl FreeState {
    /// Whether any of `[at, at + len)` is held in any state.
    fn holds(&self, at: u64, len: u64) -> bool {
        let overlaps = |a: u64, l: u64| a < at + len && at < a + l;
        self.pending
            .iter()
            .chain(&self.durable)
            .any(|f| overlaps(f.at, f.len))
            || self.staged.iter().any(|&(a, l)| overlaps(a, l))
            || self.ready.iter().any(|(&a, &l)| overlaps(a, l))
    }
}

/// Freed runs and the guest offsets whose entries named them, looked up both ways.
#[derive(Debug, Default)]
struct Owners {
    /// File offset -> (guest offset, length).
    by_file: BTreeMap<u64, (u64, u64)>,
    /// Guest offset -> file offset.
    by_guest: BTreeMap<u64, u64>,
}

impl Owners {
    fn insert(&mut self, at: u64, guest: u64, len: u64) {
        self.by_file.insert(at, (guest, len));
        self.by_guest.insert(guest, at);
    }

    /// Which of the `len` guest bytes at `guest` a freed run names, from the start.
    fn lookup(&self, guest: u64, len: u64) -> Owned {
        if let Some((&g, &at)) = self.by_guest.range(..=guest).next_back() {
            if let Some(&(_, run)) = self.by_file.get(&at) {
                if guest < g + run {
                    return Owned::Here {
                        at: at + (guest - g),
                        len: len.min(g + run - guest),
                    };
                }
            }
        }
        match self.by_guest.range(guest..guest + len).next() {
            Some((&g, _)) => Owned::From(g),
            None => Owned::No,
        }
    }

    /// Forgets the bytes `[at, at + len)`: they were handed out. What is left of a run
    /// keeps its guest offsets.
    fn forget(&mut self, at: u64, len: u64) {
        let end = at + len;
        let hit: Vec<(u64, (u64, u64))> = self
            .by_file
            .range(..end)
            .rev()
            .take_while(|(&start, &(_, l))| start + l > at)
            .map(|(&start, &v)| (start, v))
            .collect();
        for (start, (guest, l)) in hit {
            self.by_file.remove(&start);
            self.by_guest.remove(&guest);
            if start < at {
                self.insert(start, guest, at - start);
            }
            if end < start + l {
                self.insert(end, guest + (end - start), start + l - end);
            }
        }
    }
}

/// How the start of a guest range stands with the freed runs (see [`Owners::lookup`]).
enum Owned {
    /// No freed run names any of it.
    No,
    /// The first `len` bytes were at `at`.
    Here { at: u64, len: u64 },
    /// A freed run names the bytes from this guest offset on, and none before.
    From(u64),
}

/// What one flush moves along: taken before the flush writes anything, settled after it.
#[derive(Debug, Default)]
pub(super) struct FlushStage {
    /// Freed before the flush and still in their epoch: durably dropped once it
    /// succeeds.
    sealed: Vec<Freed>,
    /// Past their epoch: the flush punches those not punched yet, and they are ready once
    /// it succeeds, their drop durable by then too. The first `undropped` were freed by a
    /// discard before this flush (their drop is made durable by it); the rest were
    /// durably dropped by an earlier one.
    pub(super) settling: Vec<Freed>,
    undropped: usize,
}

impl FlushStage {
    /// Whether the flush moves nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.sealed.is_empty() && self.settling.is_empty()
    }
}

impl FreeSet {
    fn lock(&self) -> MutexGuard<'_, FreeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records clusters whose entries were just dropped in memory.
    pub(super) fn release(&self, freed: Freed) {
        self.freed_bytes.fetch_add(freed.len, Ordering::Relaxed);
        let mut st = self.lock();
        debug_assert!(
            !st.holds(freed.at, freed.len),
            "freed twice: {freed:?} in {st:?}"
        );
        if let Some(guest) = freed.guest {
            st.owners.insert(freed.at, guest, freed.len);
        }
        st.pending.push(freed);
    }

    /// Bytes freed and not handed out again.
    pub(super) fn freed_bytes(&self) -> u64 {
        self.freed_bytes.load(Ordering::Relaxed)
    }

    /// Bytes ready to be handed out.
    pub(super) fn ready_bytes(&self) -> u64 {
        self.ready_bytes.load(Ordering::Acquire)
    }

    /// Starts a flush: takes what it will move along.
    pub(super) fn begin_flush(&self, epochs: &Epochs) -> FlushStage {
        let mut st = self.lock();
        if st.pending.is_empty() && st.durable.is_empty() {
            return FlushStage::default();
        }
        // Advance as far as the requests in flight allow (it never waits), so that
        // clusters a discard freed before an idle moment are ready after this one flush.
        epochs.try_advance();
        let (mut settling, sealed): (Vec<Freed>, Vec<Freed>) = std::mem::take(&mut st.pending)
            .into_iter()
            .partition(|f| f.guest.is_some() && epochs.has_passed(f.epoch));
        let undropped = settling.len();
        let (passed, waiting): (Vec<Freed>, Vec<Freed>) = std::mem::take(&mut st.durable)
            .into_iter()
            .partition(|f| epochs.has_passed(f.epoch));
        settling.extend(passed);
        st.durable = waiting;
        let stage = FlushStage {
            sealed,
            settling,
            undropped,
        };
        st.staged.extend(
            stage
                .sealed
                .iter()
                .chain(&stage.settling)
                .map(|f| (f.at, f.len)),
        );
        stage
    }

    /// Ends a flush: on success its sealed clusters are durably dropped and its settling
    /// ones (punched by now) ready; on failure everything goes back where it was, except
    /// that punches done count (the next flush makes them durable).
    pub(super) fn end_flush(&self, stage: FlushStage, ok: bool) {
        if stage.is_empty() {
            return;
        }
        let mut st = self.lock();
        // Runs never overlap, so a run's start names it among those of every flush.
        let ours: HashSet<u64> = stage
            .sealed
            .iter()
            .chain(&stage.settling)
            .map(|f| f.at)
            .collect();
        st.staged.retain(|&(at, _)| !ours.contains(&at));
        self.flush_ended.notify_all();
        if ok {
            st.durable.extend(stage.sealed);
            let mut added = 0;
            for f in stage.settling {
                added += f.len;
                insert_run(&mut st.ready, f.at, f.len);
            }
            self.ready_bytes.fetch_add(added, Ordering::Release);
        } else {
            st.pending.extend(stage.sealed);
            // Those it punched are marked so: the next flush makes the punches durable.
            // Those freed before it may not be durably dropped: they start over.
            let mut settling = stage.settling;
            let dropped = settling.split_off(stage.undropped);
            st.pending.extend(settling);
            st.durable.extend(dropped);
        }
    }

    /// Hands out `len` contiguous ready bytes, the lowest run that fits. `None` when no
    /// run of that size is ready (or none is found among the first few).
    pub(super) fn take(&self, len: u64) -> Option<u64> {
        if self.ready_bytes() < len || self.held_for_job.load(Ordering::Acquire) {
            return None;
        }
        let mut st = self.lock();
        let (&at, &run) = st
            .ready
            .iter()
            .take(SEARCH_RUNS)
            .find(|(_, &run)| run >= len)?;
        st.ready.remove(&at);
        if run > len {
            st.ready.insert(at + len, run - len);
        }
        st.owners.forget(at, len);
        self.ready_bytes.fetch_sub(len, Ordering::Release);
        self.freed_bytes.fetch_sub(len, Ordering::Relaxed);
        Some(at)
    }

    /// While `held`, allocations get nothing: a job that moves clusters takes what
    /// becomes ready (it must own every place it writes to).
    pub(super) fn hold_for_job(&self, held: bool) {
        self.held_for_job.store(held, Ordering::Release);
    }

    /// Takes every ready run (for a job that will overwrite them whole).
    pub(super) fn take_all_ready(&self) -> Vec<(u64, u64)> {
        let mut st = self.lock();
        let runs: Vec<(u64, u64)> = std::mem::take(&mut st.ready).into_iter().collect();
        for &(at, len) in &runs {
            st.owners.forget(at, len);
        }
        let bytes: u64 = runs.iter().map(|r| r.1).sum();
        self.ready_bytes.fetch_sub(bytes, Ordering::Release);
        self.freed_bytes.fetch_sub(bytes, Ordering::Relaxed);
        runs
    }

    /// Every run the free set holds, in any state (taken along by a flush under way
    /// included): free, but not a job's to take except through the set.
    pub(super) fn held(&self) -> Vec<(u64, u64)> {
        let st = self.lock();
        st.pending
            .iter()
            .chain(&st.durable)
            .map(|f| (f.at, f.len))
            .chain(st.staged.iter().copied())
            .chain(st.ready.iter().map(|(&at, &len)| (at, len)))
            .collect()
    }

    /// Gives back runs a job took and did not use. They may hold old bytes, so they are
    /// punched and made durable by the next flushes before they are handed out again.
    pub(super) fn give_back(&self, runs: &[(u64, u64)], epoch: u64) {
        let mut st = self.lock();
        for &(at, len) in runs {
            debug_assert!(!st.holds(at, len), "given back twice: {at:#x}+{len:#x}");
            self.freed_bytes.fetch_add(len, Ordering::Relaxed);
            st.durable.push(Freed {
                at,
                len,
                epoch,
                punched: false,
                guest: None,
            });
        }
    }

    /// Removes the runs that end the file at `end`, one after another, and returns where
    /// the file can end now: ready runs, and runs durably dropped whose epoch has passed
    /// even if they are not punched yet (cut off, their bytes go with the file's tail,
    /// so there is nothing to punch). `more(end)` may take clusters the set does not
    /// hold (a job's own) and return the new end.
    pub(super) fn cut_tail(
        &self,
        mut end: u64,
        epochs: &Epochs,
        mut more: impl FnMut(u64) -> u64,
    ) -> u64 {
        let mut st = self.lock();
        let st = &mut *st;
        let (mut passed, waiting): (Vec<Freed>, Vec<Freed>) = std::mem::take(&mut st.durable)
            .into_iter()
            .partition(|f| epochs.has_passed(f.epoch));
        st.durable = waiting;
        // Runs never overlap: the one that ends at `end`, if any, is the highest left.
        passed.sort_unstable_by_key(|f| f.at);
        loop {
            let before = end;
            if let Some((&at, &len)) = st.ready.range(..end).next_back() {
                if at + len == end {
                    st.ready.remove(&at);
                    self.ready_bytes.fetch_sub(len, Ordering::Release);
                    self.forget_cut(st, at, len);
                    end = at;
                }
            }
            if let Some(f) = passed.last().copied() {
                if f.at + f.len == end {
                    passed.pop();
                    self.forget_cut(st, f.at, f.len);
                    end = f.at;
                }
            }
            end = more(end);
            if end == before {
                break;
            }
        }
        st.durable.extend(passed);
        end
    }

    fn forget_cut(&self, st: &mut FreeState, at: u64, len: u64) {
        st.owners.forget(at, len);
        self.freed_bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Takes the ready runs a discard freed, with the guest offset that named each, for
    /// a close to park them back there; what else is ready stays.
    pub(super) fn take_to_park(&self) -> Vec<(u64, u64, u64)> {
        let mut st = self.lock();
        let owners = std::mem::take(&mut st.owners);
        let mut out = Vec::new();
        for (at, (guest, len)) in owners.by_file {
            if !take_range(&mut st.ready, at, len) {
                // Not ready (or partly taken): leave it to the check.
                continue;
            }
            self.ready_bytes.fetch_sub(len, Ordering::Release);
            self.freed_bytes.fetch_sub(len, Ordering::Relaxed);
            out.push((at, guest, len));
        }
        out
    }

    /// Takes back, for the guest clusters from `guest` (at most `len` bytes), the
    /// clusters a discard freed from them, in whatever state they are: a cluster that
    /// goes back to the entry that named it can never end up named twice, and a request
    /// still following that entry meets the guest's own new data. Only a prefix may be
    /// answered for (see [`Reclaim`]); the caller allocates that much and comes back for
    /// the rest.
    pub(super) fn reclaim(&self, guest: u64, len: u64) -> Reclaim {
        if self.freed_bytes() == 0 {
            return Reclaim::Nothing;
        }
        let mut st = self.lock();
        let (at, mut take) = match st.owners.lookup(guest, len) {
            Owned::No => return Reclaim::Nothing,
            Owned::From(g) => return Reclaim::Elsewhere { len: g - guest },
            Owned::Here { at, len } => (at, len),
        };
        let st = &mut *st;
        for &(a, l) in &st.staged {
            if a <= at && at < a + l {
                return Reclaim::Busy;
            }
            if at < a && a < at + take {
                take = a - at;
            }
        }
        let in_runs = |runs: &[Freed]| {
            runs.iter()
                .find(|f| f.at <= at && at < f.at + f.len)
                .map(|f| f.at + f.len - at)
        };
        if let Some(n) = in_runs(&st.pending).or_else(|| in_runs(&st.durable)) {
            take = take.min(n);
            let _ = take_from_runs(&mut st.pending, at, take)
                || take_from_runs(&mut st.durable, at, take);
        } else {
            let Some((&start, &run)) = st.ready.range(..=at).next_back() else {
                return Reclaim::Nothing;
            };
            if start + run <= at {
                return Reclaim::Nothing;
            }
            take = take.min(start + run - at);
            take_range(&mut st.ready, at, take);
            self.ready_bytes.fetch_sub(take, Ordering::Release);
        }
        st.owners.forget(at, take);
        self.freed_bytes.fetch_sub(take, Ordering::Relaxed);
        Reclaim::Taken { at, len: take }
    }

    /// Waits until a flush under way gives back the runs it took along (for
    /// [`Reclaim::Busy`]).
    pub(super) fn wait_flush_end(&self) {
        let st = self.lock();
        if !st.staged.is_empty() {
            let _st = self.flush_ended.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Forgets everything (a repair rewrote the file's layout; what was freed is a leak
    /// it reclaimed).
    pub(super) fn clear(&self) {
        let mut st = self.lock();
        *st = FreeState::default();
        self.ready_bytes.store(0, Ordering::Release);
        self.freed_bytes.store(0, Ordering::Relaxed);
    }
}

/// Removes `[at, at + len)` from the run of `runs` that holds it whole, if one does;
/// returns whether.
fn take_from_runs(runs: &mut Vec<Freed>, at: u64, len: u64) -> bool {
    let Some(i) = runs
        .iter()
        .position(|f| f.at <= at && at + len <= f.at + f.len)
    else {
        return false;
    };
    let f = runs.swap_remove(i);
    if f.at < at {
        runs.push(Freed {
            len: at - f.at,
            ..f
        });
    }
    if at + len < f.at + f.len {
        runs.push(Freed {
            at: at + len,
            len: f.at + f.len - at - len,
            guest: f.guest.map(|g| g + (at + len - f.at)),
            ..f
        });
    }
    true
}

/// Removes `[at, at + len)` from the ready map if it is wholly there; returns whether.
fn take_range(ready: &mut BTreeMap<u64, u64>, at: u64, len: u64) -> bool {
    let Some((&start, &run)) = ready.range(..=at).next_back() else {
        return false;
    };
    if start + run < at + len {
        return false;
    }
    ready.remove(&start);
    if start < at {
        ready.insert(start, at - start);
    }
    if at + len < start + run {
        ready.insert(at + len, start + run - at - len);
    }
    true
}

/// Adds a run to the ready map, merging it with its neighbours.
fn insert_run(ready: &mut BTreeMap<u64, u64>, mut at: u64, mut len: u64) {
    if let Some((&prev, &plen)) = ready.range(..at).next_back() {
        if prev + plen == at {
            ready.remove(&prev);
            at = prev;
            len += plen;
        }
    }
    if let Some(next) = ready.remove(&(at + len)) {
        len += next;
    }
    ready.insert(at, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freed(at: u64, len: u64, epoch: u64) -> Freed {
        Freed {
            at,
            len,
            epoch,
            punched: true,
            guest: None,
        }
    }

    /// Runs flushes until nothing is left to move (as many as it takes).
    fn settle(set: &FreeSet, epochs: &Epochs) {
        for _ in 0..4 {
            let stage = set.begin_flush(epochs);
            set.end_flush(stage, true);
        }
    }

    #[test]
    fn a_freed_cluster_is_handed_out_only_after_a_flush_and_its_epoch() {
        let epochs = Epochs::default();
        let set = FreeSet::default();
        let guard = epochs.enter();
        set.release(freed(0x10000, 0x10000, epochs.current()));
        assert_eq!(set.take(0x10000), None, "the drop is not durable yet");
        settle(&set, &epochs);
        assert_eq!(
            set.take(0x10000),
            None,
            "a request may still use the old mapping"
        );
        drop(guard);
        settle(&set, &epochs);
        assert_eq!(set.take(0x10000), Some(0x10000));
        assert_eq!(set.freed_bytes(), 0);
    }

    #[test]
    fn one_flush_readies_a_discarded_cluster_nobody_can_still_use() {
        let epochs = Epochs::default();
        let set = FreeSet::default();
        let discarded = Freed {
            guest: Some(0x40000),
            ..freed(0x10000, 0x10000, epochs.current())
        };
        set.release(discarded);
        // A move's old place holds the data its old entry names until the new entry is
        // durable: never punched, nor handed out, after one flush.
        set.release(freed(0x20000, 0x10000, epochs.current()));
        let stage = set.begin_flush(&epochs);
        assert_eq!(set.take(0x10000), None, "the flush is not done yet");
        assert_eq!(
            stage.settling.len(),
            1,
            "only the discarded cluster settles"
        );
        set.end_flush(stage, true);
        assert_eq!(set.take(0x10000), Some(0x10000));
        assert_eq!(
            set.take(0x10000),
            None,
            "the moved cluster waits for a second flush"
        );
        let stage = set.begin_flush(&epochs);
        set.end_flush(stage, true);
        assert_eq!(set.take(0x10000), Some(0x20000));
    }

    #[test]
    fn a_failed_flush_keeps_clusters_back() {
        let epochs = Epochs::default();
        let set = FreeSet::default();
        set.release(freed(0x10000, 0x10000, epochs.current()));
        let stage = set.begin_flush(&epochs);
        set.end_flush(stage, false);
        assert_eq!(set.take(0x10000), None);
        settle(&set, &epochs);
        assert_eq!(set.take(0x10000), Some(0x10000));
    }

    #[test]
    fn runs_merge_and_the_lowest_fit_is_taken() {
        let epochs = Epochs::default();
        let set = FreeSet::default();
        for at in [5, 1, 2, 3, 9] {
            set.release(freed(at * 0x1000, 0x1000, epochs.current()));
        }
        settle(&set, &epochs);
        assert_eq!(set.take(0x3000), Some(0x1000));
        assert_eq!(set.take(0x1000), Some(0x5000));
        assert_eq!(set.cut_tail(0xa000, &epochs, |end| end), 0x9000);
        assert_eq!(set.ready_bytes(), 0);
    }

    #[test]
    fn the_tail_is_cut_unpunched_once_durable_and_past_its_epoch() {
        let epochs = Epochs::default();
        let set = FreeSet::default();
        let unpunched = |at| Freed {
            punched: false,
            ..freed(at, 0x1000, epochs.current())
        };
        set.release(unpunched(0x8000));
        set.release(unpunched(0x6000));
        assert_eq!(
            set.cut_tail(0x9000, &epochs, |end| end),
            0x9000,
            "the drops are not durable yet"
        );
        let stage = set.begin_flush(&epochs);
        set.end_flush(stage, true);
        epochs.try_advance();
        epochs.try_advance();
        let request = epochs.enter();
        set.release(unpunched(0x5000));
        let stage = set.begin_flush(&epochs);
        set.end_flush(stage, true);
        // 0x7000 is a job's, taken through `more`; 0x5000 a request may still read.
        let job = |end| if end == 0x8000 { 0x7000 } else { end };
        assert_eq!(set.cut_tail(0x9000, &epochs, job), 0x6000);
        drop(request);
        assert_eq!(set.cut_tail(0x6000, &epochs, |end| end), 0x5000);
        assert_eq!(set.freed_bytes(), 0);
    }
}
