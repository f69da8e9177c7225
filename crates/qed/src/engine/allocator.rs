//! The allocator: everything that decides which file clusters are whose while the image
//! is open, behind one type whose methods are the only way in.
//!
//! It owns the frontier (where new clusters go), the claims on guest clusters and L1
//! entries, the allocation gate, the epochs, the free set and the freeze of clusters a
//! job moves. The invariants it keeps, and checks here:
//!
//! - a file cluster is handed out by at most one of the free set and the frontier, and
//!   the free set hands out a cluster only once it is durably unmapped, past its epoch
//!   and reads as zeros (`free_set.rs`): [`Allocator::free`] tags every run with the
//!   epoch it was unmapped in, and the flush stages take that epoch from here;
//! - lock order: cluster claim, then gate (shared), then table claim; nothing waits for
//!   a cluster claim while holding the gate or while inside an epoch;
//! - while a job moves clusters, writes in place ask [`Allocator::is_frozen`], and the
//!   free set holds what becomes ready for that job alone (one job at a time).
//!
//! I/O is the caller's: the methods that touch the file take its storage, its name for
//! messages, and how to flush it.

use super::claims::{Claims, ClusterClaim, TableClaim};
use super::epochs::{EpochGuard, Epochs};
use super::free_set::{FlushStage, FreeSet, Freed, Reclaim};
use super::frontier::Frontier;
use super::gate::{AllocationGate, GateHold};
use crate::error::Result;
use crate::format::Geometry;
use crate::storage::Storage;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, RwLockWriteGuard};

/// Which file clusters are whose: the frontier, claims, gate, epochs, free set and the
/// freeze of moved clusters.
#[derive(Debug)]
pub(super) struct Allocator {
    frontier: Frontier,
    /// Guest clusters and L1 entries being allocated (or frozen by a move).
    claims: Claims,
    gate: AllocationGate,
    /// What requests that use a file offset after looking it up are inside, so that a
    /// cluster unmapped meanwhile is not reused under them.
    epochs: Epochs,
    /// Clusters freed while open, on their way back to allocations.
    free: FreeSet,
    /// Batches of moves in progress: while there are any, writes in place look for the
    /// claim a move holds on their clusters.
    moving: AtomicUsize,
    /// Held by the one job that moves clusters (compaction, defragmentation).
    job: Mutex<()>,
}

/// A batch of moves in progress (see [`Allocator::begin_moves`]).
pub(super) struct Moving<'a>(&'a Allocator);

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        self.0.moving.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The one job that moves clusters: while it lives, clusters that become ready are the
/// job's (see [`Allocator::take_all_ready`]), not allocations'.
pub(super) struct JobHold<'a> {
    alloc: &'a Allocator,
    _one: MutexGuard<'a, ()>,
}

impl Drop for JobHold<'_> {
    fn drop(&mut self) {
        self.alloc.free.hold_for_job(false);
    }
}

impl Allocator {
    /// The allocator of an image whose file is `file_len` bytes long at open.
    pub(super) fn at_open(geometry: &Geometry, file_len: u64) -> Self {
        Self {
            frontier: Frontier::at_open(geometry, file_len),
            claims: Claims::default(),
            gate: AllocationGate::default(),
            epochs: Epochs::default(),
            free: FreeSet::default(),
            moving: AtomicUsize::new(0),
            job: Mutex::new(()),
        }
    }

    // Claims.

    /// Claims guest clusters `[first, first + count)`, waiting while any is claimed.
    #[inline]
    pub(super) fn claim(&self, first: u64, count: u64) -> ClusterClaim<'_> {
        self.claims.clusters(first, count)
    }

    /// Claims guest clusters `[first, first + count)` if none is claimed; never waits.
    #[inline]
    pub(super) fn try_claim(&self, first: u64, count: u64) -> Option<ClusterClaim<'_>> {
        self.claims.try_clusters(first, count)
    }

    /// Waits until none of guest clusters `[first, first + count)` is claimed, claiming
    /// nothing.
    #[inline]
    pub(super) fn wait_released(&self, first: u64, count: u64) {
        self.claims.wait_released(first, count)
    }

    /// Claims L1 entry `l1_index` to create its table (the last lock in the order);
    /// `None` after waiting for someone else who was creating it.
    #[inline]
    pub(super) fn claim_table(&self, l1_index: u64) -> Option<TableClaim<'_>> {
        self.claims.table(l1_index)
    }

    // The gate.

    /// The gate, shared: what an allocation holds from "NEED_CHECK is set" until its
    /// entries are set.
    #[inline]
    pub(super) fn gate_shared(&self) -> GateHold<'_> {
        self.gate.shared()
    }

    /// The gate, shared, unless that would mean waiting.
    #[inline]
    pub(super) fn try_gate_shared(&self) -> Option<GateHold<'_>> {
        self.gate.try_shared()
    }

    /// The gate, exclusive: no allocation's metadata is unwritten while it is held.
    #[inline]
    pub(super) fn gate_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.exclusive()
    }

    // Epochs.

    /// Enters the current epoch, for a request that uses a file offset after looking it
    /// up.
    #[inline]
    pub(super) fn enter(&self) -> EpochGuard<'_> {
        self.epochs.enter()
    }

    /// Waits until every request inside an epoch now has left.
    pub(super) fn synchronize(&self) {
        self.epochs.synchronize()
    }

    // Space.

    /// Where the next allocation at the frontier goes: the end of the clusters in use.
    #[inline]
    pub(super) fn frontier(&self) -> u64 {
        self.frontier.end()
    }

    /// Sets `bytes` aside: freed clusters ready to be reused when a run of them fits
    /// (they read as zeros, as new space does), else at the frontier, growing the file
    /// first. Returns where.
    pub(super) fn reserve(
        &self,
        storage: &dyn Storage,
        bytes: u64,
        name: &str,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<u64> {
        if let Some(at) = self.free.take(bytes) {
            debug_assert!(
                at + bytes <= self.frontier.end(),
                "free space past the frontier"
            );
            // Freed clusters were punched: writes into holes would allocate.
            storage.preallocate(at, bytes);
            return Ok(at);
        }
        self.frontier.reserve(storage, bytes, name, flush)
    }

    /// Sets `bytes` aside at the frontier, for a job to move clusters into.
    pub(super) fn reserve_at_end(
        &self,
        storage: &dyn Storage,
        bytes: u64,
        name: &str,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<u64> {
        self.frontier.reserve(storage, bytes, name, flush)
    }

    /// Gives back the space the file grew ahead of the frontier (at close).
    pub(super) fn trim(&self, storage: &dyn Storage, name: &str) -> Result<()> {
        self.frontier.trim(storage, name)
    }

    /// Trims the growth, then takes the frontier from the file again (after a repair
    /// rewrote, appended or truncated behind it).
    pub(super) fn reload(
        &self,
        storage: &dyn Storage,
        geometry: &Geometry,
        name: &str,
    ) -> Result<()> {
        self.frontier.reload(storage, geometry, name)
    }

    /// Cuts the file at `end` if it is longer, durably, and moves the frontier there.
    /// Returns by how much the used space shrank.
    pub(super) fn cut(&self, storage: &dyn Storage, end: u64, name: &str) -> Result<u64> {
        self.frontier.cut(storage, end, name)
    }

    /// Sets the file's length to `end`, durably, and the frontier with it.
    pub(super) fn reset(&self, storage: &dyn Storage, end: u64, name: &str) -> Result<()> {
        self.frontier.reset(storage, end, name)
    }

    /// Truncates the file after its last cluster that is neither free (ready, or durably
    /// dropped and past its epoch) nor in `owned` (a job's, taken out of it), durably.
    /// Returns the new end.
    pub(super) fn cut_free_tail(
        &self,
        storage: &dyn Storage,
        name: &str,
        cluster_size: u64,
        owned: &mut BTreeSet<u64>,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<u64> {
        let cs = cluster_size;
        self.frontier.cut_free(
            storage,
            name,
            |end| {
                self.free.cut_tail(end, &self.epochs, |mut end| {
                    while end >= cs && owned.remove(&(end - cs)) {
                        end -= cs;
                    }
                    end
                })
            },
            flush,
        )
    }

    // The free set.

    /// Records the `len` bytes at `at` whose entries were just dropped in memory, tagged
    /// with the current epoch. `punched`: they read as zeros already. `guest`: the guest
    /// offset whose entry named them, for a discard.
    pub(super) fn free(&self, at: u64, len: u64, punched: bool, guest: Option<u64>) {
        debug_assert!(at + len <= self.frontier.end(), "freed past the frontier");
        self.free.release(Freed {
            at,
            len,
            epoch: self.epochs.current(),
            punched,
            guest,
        });
    }

    /// Gives back runs a job took and did not use (they are punched on their way).
    pub(super) fn give_back(&self, runs: &[(u64, u64)]) {
        self.free.give_back(runs, self.epochs.current());
    }

    /// Takes back, for the guest clusters from `guest`, the clusters a discard freed
    /// from them (see [`FreeSet::reclaim`]).
    #[inline]
    pub(super) fn reclaim(&self, guest: u64, len: u64) -> Reclaim {
        self.free.reclaim(guest, len)
    }

    /// Waits until a flush under way gives back the runs it took along.
    pub(super) fn wait_flush_end(&self) {
        self.free.wait_flush_end()
    }

    /// Starts a flush: takes the freed runs it will move along.
    pub(super) fn begin_flush(&self) -> FlushStage {
        self.free.begin_flush(&self.epochs)
    }

    /// Ends a flush begun with [`Allocator::begin_flush`].
    pub(super) fn end_flush(&self, stage: FlushStage, ok: bool) {
        self.free.end_flush(stage, ok)
    }

    /// Bytes freed while open and not reused yet.
    #[inline]
    pub(super) fn freed_bytes(&self) -> u64 {
        self.free.freed_bytes()
    }

    /// Takes the ready runs a discard freed, with the guest offsets that named them.
    pub(super) fn take_to_park(&self) -> Vec<(u64, u64, u64)> {
        self.free.take_to_park()
    }

    /// Forgets every freed cluster (a repair decides from the file alone: what was freed
    /// is a leak to it).
    pub(super) fn forget_freed(&self) {
        self.free.clear()
    }

    /// Takes every ready run (for a job that will overwrite them whole).
    pub(super) fn take_all_ready(&self) -> Vec<(u64, u64)> {
        self.free.take_all_ready()
    }

    /// Every run the free set holds, in any state.
    pub(super) fn held(&self) -> Vec<(u64, u64)> {
        self.free.held()
    }

    // Moves.

    /// Starts the one job that moves clusters; `None` while another runs.
    pub(super) fn begin_job(&self) -> Option<JobHold<'_>> {
        let one = match self.job.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        self.free.hold_for_job(true);
        Some(JobHold {
            alloc: self,
            _one: one,
        })
    }

    /// Announces a batch of moves: until it ends, writes in place ask
    /// [`Allocator::is_frozen`].
    pub(super) fn begin_moves(&self) -> Moving<'_> {
        self.moving.fetch_add(1, Ordering::SeqCst);
        Moving(self)
    }

    /// Whether a write in place to guest clusters `[first, first + count)` must wait: a
    /// move holds one of them.
    #[inline]
    pub(super) fn is_frozen(&self, first: u64, count: u64) -> bool {
        self.moving.load(Ordering::SeqCst) != 0 && self.claims.any_claimed(first, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn geometry() -> Geometry {
        Geometry::new(65536, 4).unwrap()
    }

    #[test]
    fn a_freed_cluster_is_reserved_again_only_once_ready() {
        let g = geometry();
        let cs = g.cluster_size();
        let storage = MemoryStorage::new();
        let alloc = Allocator::at_open(&g, 4 * cs);
        let at = alloc.reserve(&storage, cs, "t", || Ok(())).unwrap();
        assert_eq!(at, 4 * cs);
        alloc.free(at, cs, true, Some(0));
        // Not durably dropped yet: the next reservation goes to the frontier.
        assert_eq!(alloc.reserve(&storage, cs, "t", || Ok(())).unwrap(), 5 * cs);
        // Two flushes (the epoch passes meanwhile) make it ready.
        for _ in 0..2 {
            let stage = alloc.begin_flush();
            alloc.end_flush(stage, true);
        }
        assert_eq!(alloc.reserve(&storage, cs, "t", || Ok(())).unwrap(), at);
        assert_eq!(alloc.freed_bytes(), 0);
    }

    #[test]
    fn clusters_are_frozen_only_while_moves_run() {
        let g = geometry();
        let alloc = Allocator::at_open(&g, 4 * g.cluster_size());
        let claim = alloc.claim(3, 1);
        assert!(
            !alloc.is_frozen(3, 1),
            "an allocation's claim freezes nothing"
        );
        let moving = alloc.begin_moves();
        assert!(alloc.is_frozen(3, 1));
        assert!(!alloc.is_frozen(4, 1));
        drop(claim);
        assert!(!alloc.is_frozen(3, 1));
        drop(moving);
    }

    #[test]
    fn one_job_at_a_time_holds_what_becomes_ready() {
        let g = geometry();
        let cs = g.cluster_size();
        let storage = MemoryStorage::new();
        let alloc = Allocator::at_open(&g, 8 * cs);
        let job = alloc.begin_job().unwrap();
        assert!(alloc.begin_job().is_none());
        alloc.free(4 * cs, cs, true, None);
        for _ in 0..3 {
            let stage = alloc.begin_flush();
            alloc.end_flush(stage, true);
        }
        // Ready, but the job's: allocations go to the frontier.
        assert_eq!(alloc.reserve(&storage, cs, "t", || Ok(())).unwrap(), 8 * cs);
        assert_eq!(alloc.take_all_ready(), vec![(4 * cs, cs)]);
        drop(job);
        assert!(alloc.begin_job().is_some());
    }
}
