//! Coordination of concurrent allocating writes.
//!
//! - [`Claims`]: which guest clusters and which L1 entries (new L2 tables) are being
//!   allocated right now. A request waits only for claims that overlap its own.
//! - [`Gate`]: allocations hold it shared from "NEED_CHECK is set" until their metadata
//!   is written; clearing NEED_CHECK, checks and repairs hold it exclusively.
//! - [`FlushGroup`]: concurrent requests that each need "everything I wrote is durable"
//!   share one flush.

use std::collections::HashSet;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

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

/// Shared by allocations, exclusive for NEED_CHECK changes and whole-image walks.
#[derive(Debug, Default)]
pub(crate) struct Gate(RwLock<()>);

impl Gate {
    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Shared, unless that would mean waiting.
    pub(crate) fn try_shared(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.0.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Group flushes: a caller needs a flush that started after its writes completed; one
/// flush serves every caller that arrived before it started.
#[derive(Debug, Default)]
pub(crate) struct FlushGroup {
    state: Mutex<FlushState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct FlushState {
    /// Tickets handed out so far.
    tickets: u64,
    /// A flush is running.
    running: bool,
    /// Every ticket below this is covered by a completed flush.
    covered: u64,
    /// Tickets below this were covered by a flush that failed.
    failed_below: u64,
    failure: Option<(io::ErrorKind, String)>,
}

impl FlushGroup {
    /// Returns once a flush that started after this call has completed.
    pub(crate) fn flush(&self, do_flush: impl Fn() -> io::Result<()>) -> io::Result<()> {
        let mut st = lock(&self.state);
        let ticket = st.tickets;
        st.tickets += 1;
        loop {
            if st.covered > ticket {
                return match &st.failure {
                    Some((kind, msg)) if st.failed_below > ticket => {
                        Err(io::Error::new(*kind, msg.clone()))
                    }
                    _ => Ok(()),
                };
            }
            if st.running {
                st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.running = true;
            let upto = st.tickets;
            drop(st);
            let result = do_flush();
            st = lock(&self.state);
            st.running = false;
            st.covered = st.covered.max(upto);
            if let Err(e) = &result {
                st.failed_below = upto;
                st.failure = Some((e.kind(), e.to_string()));
            }
            self.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
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
    fn one_flush_serves_concurrent_callers() {
        let group = FlushGroup::default();
        let flushes = AtomicU64::new(0);
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    group
                        .flush(|| {
                            flushes.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(())
                        })
                        .unwrap();
                });
            }
        });
        // The first flush serves its caller; everyone arriving during it shares the next.
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..=3).contains(&n), "{n} flushes for 8 concurrent callers");
    }

    #[test]
    fn failed_flush_reports_to_its_callers() {
        let group = FlushGroup::default();
        let e = group
            .flush(|| Err(io::Error::other("disk gone")))
            .unwrap_err();
        assert!(e.to_string().contains("disk gone"));
        assert!(group.flush(|| Ok(())).is_ok());
    }
}
