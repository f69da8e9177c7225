//! Claims on what allocations are creating: guest clusters being allocated, and L1
//! entries whose L2 table is being created. A request waits only for claims that
//! overlap its own, so allocations of different clusters run in parallel.
//!
//! Waiting for clusters does not claim them: a writer behind an allocation of the same
//! cluster usually finds it allocated once the claim is released, and then writes in
//! place. Were the claim handed from waiter to waiter, each of them would take it only
//! to find the cluster allocated, one after another. Waiters sleep on the stripe of a
//! cluster they wait for, so that a release wakes only those who may want what it
//! released.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stripes of waiters for clusters (a release wakes the stripes of its clusters).
const STRIPES: usize = 64;

fn stripe(cluster: u64) -> usize {
    (cluster % STRIPES as u64) as usize
}

/// Claimed guest clusters and L1 entries.
#[derive(Debug)]
pub(crate) struct Claims {
    state: Mutex<ClaimState>,
    /// Where waiters for clusters sleep, by [`stripe`].
    released: Vec<Condvar>,
    tables_changed: Condvar,
}

#[derive(Debug)]
struct ClaimState {
    clusters: HashSet<u64>,
    tables: HashSet<u64>,
    /// Waiters asleep on each stripe: a release with none to wake makes no system call.
    waiting: [u32; STRIPES],
}

impl Default for Claims {
    fn default() -> Self {
        Self {
            state: Mutex::new(ClaimState {
                clusters: HashSet::new(),
                tables: HashSet::new(),
                waiting: [0; STRIPES],
            }),
            released: (0..STRIPES).map(|_| Condvar::new()).collect(),
            tables_changed: Condvar::new(),
        }
    }
}

/// A claim on a range of guest clusters, released on drop.
pub(crate) struct ClusterClaim<'a> {
    claims: &'a Claims,
    first: u64,
    count: u64,
}

impl ClusterClaim<'_> {
    /// Gives back the clusters past the first `keep`.
    pub(crate) fn shrink(&mut self, keep: u64) {
        if keep < self.count {
            self.claims.release(self.first + keep, self.count - keep);
            self.count = keep;
        }
    }
}

impl Drop for ClusterClaim<'_> {
    fn drop(&mut self) {
        self.claims.release(self.first, self.count);
    }
}

/// A claim on one L1 entry while its L2 table is created, released on drop.
pub(crate) struct TableClaim<'a> {
    claims: &'a Claims,
    l1_index: u64,
}

impl Drop for TableClaim<'_> {
    fn drop(&mut self) {
        lock(&self.claims.state).tables.remove(&self.l1_index);
        self.claims.tables_changed.notify_all();
    }
}

impl Claims {
    /// Claims clusters `[first, first + count)`, waiting while any of them is claimed.
    pub(crate) fn clusters(&self, first: u64, count: u64) -> ClusterClaim<'_> {
        loop {
            if let Some(claim) = self.try_clusters(first, count) {
                return claim;
            }
            self.wait_released(first, count);
        }
    }

    /// Claims clusters `[first, first + count)` if none of them is claimed; never waits.
    pub(crate) fn try_clusters(&self, first: u64, count: u64) -> Option<ClusterClaim<'_>> {
        let mut st = lock(&self.state);
        if (first..first + count).any(|c| st.clusters.contains(&c)) {
            return None;
        }
        for c in first..first + count {
            st.clusters.insert(c);
        }
        Some(ClusterClaim {
            claims: self,
            first,
            count,
        })
    }

    /// Whether any of clusters `[first, first + count)` is claimed now.
    pub(crate) fn any_claimed(&self, first: u64, count: u64) -> bool {
        let st = lock(&self.state);
        (first..first + count).any(|c| st.clusters.contains(&c))
    }

    /// Waits until none of clusters `[first, first + count)` is claimed, claiming
    /// nothing: by the time the caller looks, someone else may hold them again.
    pub(crate) fn wait_released(&self, first: u64, count: u64) {
        let mut st = lock(&self.state);
        while let Some(c) = (first..first + count).find(|c| st.clusters.contains(c)) {
            let s = stripe(c);
            st.waiting[s] += 1;
            st = self.released[s].wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiting[s] -= 1;
        }
    }

    fn release(&self, first: u64, count: u64) {
        let mut wake = 0u64;
        let mut st = lock(&self.state);
        for c in first..first + count {
            st.clusters.remove(&c);
            if st.waiting[stripe(c)] > 0 {
                wake |= 1 << stripe(c);
            }
        }
        drop(st);
        while wake != 0 {
            self.released[wake.trailing_zeros() as usize].notify_all();
            wake &= wake - 1;
        }
    }

    /// Claims an L1 entry to create its table. Returns `None` after waiting if someone
    /// else was creating it (the caller then looks again).
    pub(crate) fn table(&self, l1_index: u64) -> Option<TableClaim<'_>> {
        let mut st = lock(&self.state);
        if st.tables.contains(&l1_index) {
            while st.tables.contains(&l1_index) {
                st = self
                    .tables_changed
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
            }
            return None;
        }
        st.tables.insert(l1_index);
        Some(TableClaim {
            claims: self,
            l1_index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn overlapping_claims_wait_and_disjoint_ones_do_not() {
        let claims = Arc::new(Claims::default());
        let a = claims.clusters(0, 4);
        // Disjoint: granted at once.
        let b = claims.clusters(4, 4);
        let c2 = claims.clone();
        let waiter = std::thread::spawn(move || {
            let _c = c2.clusters(3, 2);
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished(), "an overlapping claim must wait");
        drop(a);
        drop(b);
        waiter.join().unwrap();
    }

    #[test]
    fn waiting_for_a_release_claims_nothing() {
        let claims = Arc::new(Claims::default());
        let a = claims.clusters(0, 2);
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let c = claims.clone();
                std::thread::spawn(move || c.wait_released(1, 1))
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(waiters.iter().all(|w| !w.is_finished()));
        drop(a);
        for w in waiters {
            w.join().unwrap();
        }
        // Every waiter was woken by the one release, and none of them holds anything.
        assert!(claims.try_clusters(0, 2).is_some());
    }
}
