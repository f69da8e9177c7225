//! Grace periods for file clusters that stop being mapped while the image is open (freed
//! by a discard, or moved by compaction or defragmentation).
//!
//! A reader or in-place writer looks a guest range up and then does I/O at the file
//! offset it found, without a lock in between, sometimes long after (an io_uring caller
//! holds the extent until its completion). Such a request enters an epoch before it
//! looks up and leaves it when its I/O is done. A cluster unmapped while the epoch was
//! `e` may be reused, or its bytes punched, only once the epoch has advanced to `e + 2`:
//! the epoch advances from `e` to `e + 1` only when nobody is left in `e - 1`, so at
//! `e + 2` every request that entered at or before `e` (and so could have seen the old
//! mapping) has left.
//!
//! Two counters, one for even and one for odd epochs: entering costs two atomic
//! increments on a line the requests share, never a lock or a wait.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Counter(AtomicUsize);

/// The current epoch and how many requests are inside the even and odd ones.
#[derive(Debug, Default)]
pub(crate) struct Epochs {
    current: AtomicU64,
    inside: [Counter; 2],
}

/// A request's presence in an epoch, left on drop. `Send`: an io_uring caller may finish
/// its I/O on another thread.
#[derive(Debug)]
pub(crate) struct EpochGuard<'a> {
    epochs: &'a Epochs,
    slot: usize,
}

impl Drop for EpochGuard<'_> {
    fn drop(&mut self) {
        self.epochs.inside[self.slot].0.fetch_sub(1, SeqCst);
    }
}

impl Epochs {
    /// Enters the current epoch.
    pub(crate) fn enter(&self) -> EpochGuard<'_> {
        loop {
            let e = self.current.load(SeqCst);
            let slot = (e & 1) as usize;
            self.inside[slot].0.fetch_add(1, SeqCst);
            // Counted in the slot of an epoch that has since ended: the slot may belong
            // to a newer epoch already, whose advance did not wait for this request.
            if self.current.load(SeqCst) == e {
                return EpochGuard { epochs: self, slot };
            }
            self.inside[slot].0.fetch_sub(1, SeqCst);
        }
    }

    /// The current epoch: what a cluster unmapped now is tagged with.
    pub(crate) fn current(&self) -> u64 {
        self.current.load(SeqCst)
    }

    /// Advances the epoch if nobody is left in the previous one. Never waits. Returns
    /// the current epoch.
    pub(crate) fn try_advance(&self) -> u64 {
        let e = self.current.load(SeqCst);
        // The previous epoch's slot is the next one's.
        if self.inside[((e + 1) & 1) as usize].0.load(SeqCst) == 0 {
            let _ = self.current.compare_exchange(e, e + 1, SeqCst, SeqCst);
        }
        self.current.load(SeqCst)
    }

    /// Whether every request that could have seen a mapping dropped in epoch `tag` has
    /// finished.
    pub(crate) fn has_passed(&self, tag: u64) -> bool {
        self.try_advance() >= tag + 2
    }

    /// Waits until every request inside an epoch now has left (for a background job
    /// that has just made new requests wait elsewhere, or dropped mappings).
    pub(crate) fn synchronize(&self) {
        let tag = self.current();
        let mut pause = Duration::from_micros(20);
        while !self.has_passed(tag) {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_mapping_dropped_under_a_request_waits_for_it() {
        let epochs = Epochs::default();
        let guard = epochs.enter();
        let tag = epochs.current();
        for _ in 0..10 {
            epochs.try_advance();
        }
        assert!(!epochs.has_passed(tag), "a request is still inside");
        drop(guard);
        assert!(epochs.has_passed(tag));
    }

    #[test]
    fn requests_that_enter_later_do_not_hold_back_older_tags() {
        let epochs = Epochs::default();
        let tag = epochs.current();
        epochs.try_advance();
        // Entered after the drop: it cannot have seen the old mapping.
        let _late = epochs.enter();
        assert!(epochs.has_passed(tag));
    }

    #[test]
    fn synchronize_returns_once_earlier_requests_leave() {
        let epochs = Arc::new(Epochs::default());
        let guard_epochs = epochs.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _g = guard_epochs.enter();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        });
        rx.recv().unwrap();
        let start = std::time::Instant::now();
        epochs.synchronize();
        assert!(start.elapsed() >= Duration::from_millis(30));
        holder.join().unwrap();
    }
}
