//! Claims on what allocations are creating: guest clusters being allocated, and L1
//! entries whose L2 table is being created. A request waits only for claims that
//! overlap its own, so allocations of different clusters run in parallel.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Claimed guest clusters and L1 entries.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    state: Mutex<ClaimState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ClaimState {
    clusters: HashSet<u64>,
    tables: HashSet<u64>,
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
            let mut st = lock(&self.claims.state);
            for c in self.first + keep..self.first + self.count {
                st.clusters.remove(&c);
            }
            self.count = keep;
            drop(st);
            self.claims.changed.notify_all();
        }
    }
}

impl Drop for ClusterClaim<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.claims.state);
        for c in self.first..self.first + self.count {
            st.clusters.remove(&c);
        }
        drop(st);
        self.claims.changed.notify_all();
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
        self.claims.changed.notify_all();
    }
}

impl Claims {
    /// Claims clusters `[first, first + count)`, waiting while any of them is claimed.
    pub(crate) fn clusters(&self, first: u64, count: u64) -> ClusterClaim<'_> {
        let mut st = lock(&self.state);
        while (first..first + count).any(|c| st.clusters.contains(&c)) {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        for c in first..first + count {
            st.clusters.insert(c);
        }
        ClusterClaim {
            claims: self,
            first,
            count,
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

    /// Claims an L1 entry to create its table. Returns `None` after waiting if someone
    /// else was creating it (the caller then looks again).
    pub(crate) fn table(&self, l1_index: u64) -> Option<TableClaim<'_>> {
        let mut st = lock(&self.state);
        if st.tables.contains(&l1_index) {
            while st.tables.contains(&l1_index) {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
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
}
