//! Letting requests in: at most so many requests and so many bytes in flight, and none
//! once the export closes. Whatever the client sends, the memory held for requests is
//! bounded, and a closing export knows when the last request has left the device.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The gate every request that touches the device passes.
pub(crate) struct Admission {
    state: Mutex<State>,
    changed: Condvar,
    max_requests: usize,
    max_bytes: usize,
}

struct State {
    /// The device while the export is open; `None` once it closed.
    device: Option<Arc<dyn qed::BlockDevice>>,
    requests: usize,
    bytes: usize,
    /// Threads waiting on `changed`: a release wakes nobody when there are none.
    waiting: usize,
}

/// A request let in: it holds its share of the bounds, and the device, until dropped.
pub(crate) struct Ticket {
    gate: Arc<Admission>,
    bytes: usize,
    /// The device to run the request on.
    pub(crate) device: Arc<dyn qed::BlockDevice>,
}

impl Admission {
    pub(crate) fn new(
        device: Arc<dyn qed::BlockDevice>,
        max_requests: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                device: Some(device),
                requests: 0,
                bytes: 0,
                waiting: 0,
            }),
            changed: Condvar::new(),
            max_requests: max_requests.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, mut s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        s.waiting += 1;
        s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        s.waiting -= 1;
        s
    }

    /// Lets a request of `bytes` in, waiting while the bounds are reached. `None` once
    /// the export has closed. A request larger than the byte bound is counted as the
    /// whole bound, so it waits for an empty gate instead of forever.
    pub(crate) fn admit(self: &Arc<Self>, bytes: usize) -> Option<Ticket> {
        let bytes = bytes.min(self.max_bytes);
        let mut s = self.lock();
        loop {
            let device = s.device.as_ref()?;
            if s.requests < self.max_requests && s.bytes + bytes <= self.max_bytes {
                let device = device.clone();
                s.requests += 1;
                s.bytes += bytes;
                return Some(Ticket {
                    gate: self.clone(),
                    bytes,
                    device,
                });
            }
            s = self.wait(s);
        }
    }

    /// Lets nothing in from now on, and wakes those waiting to be let in.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.device = None;
        if s.waiting > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits until no request holds a ticket.
    pub(crate) fn wait_idle(&self) {
        let mut s = self.lock();
        while s.requests > 0 {
            s = self.wait(s);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.requests -= 1;
        s.bytes -= self.bytes;
        if s.waiting > 0 {
            self.gate.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn device() -> Arc<dyn qed::BlockDevice> {
        let storage = qed::MemoryStorage::new();
        qed::Image::create_on(&storage, &qed::CreateOptions::new(1 << 20)).unwrap();
        let image = qed::Image::open_storage(
            Box::new(storage),
            std::path::Path::new("memory"),
            &qed::OpenOptions::default(),
        )
        .unwrap();
        Arc::new(image)
    }

    #[test]
    fn bounds_hold_and_release() {
        let gate = Arc::new(Admission::new(device(), 2, 100));
        let a = gate.admit(60).unwrap();
        let b = gate.admit(40).unwrap();
        // Both bounds are reached: a third waits until one leaves.
        let g = gate.clone();
        let t = std::thread::spawn(move || g.admit(1).is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        drop(a);
        assert!(t.join().unwrap());
        drop(b);
        // Larger than the byte bound: let in alone.
        assert!(gate.admit(1000).is_some());
    }

    #[test]
    fn closing_refuses_and_wakes_waiters() {
        let gate = Arc::new(Admission::new(device(), 1, 100));
        let held = gate.admit(1).unwrap();
        let g = gate.clone();
        let t = std::thread::spawn(move || g.admit(1).is_none());
        std::thread::sleep(Duration::from_millis(50));
        gate.close();
        assert!(t.join().unwrap());
        assert!(gate.admit(1).is_none());
        let g = gate.clone();
        let idle = std::thread::spawn(move || g.wait_idle());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!idle.is_finished());
        drop(held);
        idle.join().unwrap();
    }
}
