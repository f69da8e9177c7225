//! Grouped flushes: concurrent requests that each need "everything I wrote is durable"
//! share one flush.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
