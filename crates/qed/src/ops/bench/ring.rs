//! The benchmark's request loop over io_uring: one thread keeps `depth` requests in
//! flight, submitting those that land in one extent of a file straight to the kernel
//! (as qemu-img bench does with `-i io_uring`): reads of mapped data, writes in place,
//! and allocating writes the device sets space aside for ([`BlockDevice::begin_write`]).
//! The rest (new tables, backing data to copy) go to worker threads that take the
//! device's own path.
//!
//! Requests of the workload never overlap while in flight (each has its own offset), so
//! the direct ones cannot race a worker's read-modify-write of the same block.

use super::params::{offset_of, BenchParams};
use crate::block::{BlockDevice, DirectExtent, DirectRead, PendingWrite};
use crate::error::{IoContext, Result};
use crate::ring::{Ring, Waker};
use crate::storage::AlignedBuf;
use std::collections::VecDeque;
use std::sync::{mpsc, Mutex};

/// What a worker reports: the slot it ran for, and how it went.
type Done = (usize, Result<()>);

/// Runs the workload; `Ok(false)` when io_uring is not available here.
pub(super) fn run(dev: &dyn BlockDevice, p: &BenchParams) -> Result<bool> {
    let depth = p.depth.max(1);
    let Some(mut ring) = Ring::new(depth as u32) else {
        return Ok(false);
    };
    let mut slots: Vec<AlignedBuf> = (0..depth)
        .map(|_| AlignedBuf::filled(p.size, p.pattern))
        .collect();
    let (jobs, queue) = mpsc::channel::<(usize, u64)>();
    let queue = Mutex::new(queue);
    let finished: Mutex<Vec<Done>> = Mutex::new(Vec::new());
    let waker: Waker = ring.waker();

    let result = std::thread::scope(|s| {
        for _ in 0..depth {
            s.spawn(|| work(dev, p, &queue, &finished, &waker));
        }
        let mut driver = Driver::new(dev, p, &mut slots, &jobs, &finished);
        let result = driver.drive(&mut ring);
        drop(jobs);
        result
    });
    ring.drain();
    result.map(|()| true)
}

/// A worker: runs the requests handed to it through the device's own path.
fn work(
    dev: &dyn BlockDevice,
    p: &BenchParams,
    queue: &Mutex<mpsc::Receiver<(usize, u64)>>,
    finished: &Mutex<Vec<Done>>,
    waker: &Waker,
) {
    let mut buf = AlignedBuf::filled(p.size, p.pattern);
    loop {
        let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((slot, off)) = job else { break };
        let r = if p.write {
            dev.write_at(&buf, off)
        } else {
            dev.read_at(&mut buf, off)
        };
        finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((slot, r));
        waker.wake();
    }
}

/// The submitting thread's state.
struct Driver<'a, 's> {
    dev: &'a dyn BlockDevice,
    p: &'a BenchParams,
    dev_size: u64,
    slots: &'s mut [AlignedBuf],
    jobs: &'s mpsc::Sender<(usize, u64)>,
    finished: &'s Mutex<Vec<Done>>,
    /// Slots whose buffer is free.
    free: Vec<usize>,
    /// Writes to finish when their slot's request completes.
    pending: Vec<Option<PendingWrite<'a>>>,
    /// Reads whose extent is held until their slot's request completes.
    reading: Vec<Option<DirectRead<'a>>>,
    /// What the writes on workers hold while they allocate, by slot.
    held: Vec<std::ops::Range<u64>>,
    /// Requests held back because they touch clusters one of ours is allocating: sent
    /// to a worker they would only wait there for it, a thread asleep each, and then
    /// write in place, which the ring does better once the allocation is done.
    deferred: VecDeque<(usize, u64)>,
    /// Requests issued so far.
    next: u64,
    in_flight: usize,
}

impl<'a, 's> Driver<'a, 's> {
    fn new(
        dev: &'a dyn BlockDevice,
        p: &'a BenchParams,
        slots: &'s mut [AlignedBuf],
        jobs: &'s mpsc::Sender<(usize, u64)>,
        finished: &'s Mutex<Vec<Done>>,
    ) -> Self {
        Self {
            dev,
            p,
            dev_size: dev.size(),
            free: (0..slots.len()).rev().collect(),
            pending: (0..slots.len()).map(|_| None).collect(),
            reading: (0..slots.len()).map(|_| None).collect(),
            held: (0..slots.len()).map(|_| 0..0).collect(),
            slots,
            jobs,
            finished,
            deferred: VecDeque::new(),
            next: 0,
            in_flight: 0,
        }
    }

    /// Submits and reaps requests until all `p.count` have completed.
    fn drive(&mut self, ring: &mut Ring) -> Result<()> {
        loop {
            self.start_requests(ring)?;
            if self.in_flight == 0 {
                return Ok(());
            }
            let finished = self.finished;
            ring.park(|| {
                !finished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
            })?;
            let mut failure = self.reap_ring(ring)?;
            if let Err(e) = self.reap_workers() {
                failure.get_or_insert(e);
            }
            if let Some(e) = failure {
                return Err(e);
            }
        }
    }

    /// Starts held-back requests (in order; a fresh one behind them waits too), then new
    /// ones while slots are free.
    fn start_requests(&mut self, ring: &mut Ring) -> Result<()> {
        let mut batch: Vec<(usize, u64)> = std::mem::take(&mut self.deferred).into();
        while self.next < self.p.count {
            let Some(slot) = self.free.pop() else { break };
            batch.push((slot, offset_of(self.p, self.next, self.dev_size)));
            self.next += 1;
            self.in_flight += 1;
        }
        for (slot, off) in batch {
            self.start(ring, slot, off)?;
        }
        Ok(())
    }

    /// Starts one request: held back behind an allocation of ours that it touches,
    /// straight to the file where the device hands out an extent, else on a worker.
    fn start(&mut self, ring: &mut Ring, slot: usize, off: u64) -> Result<()> {
        let size = self.p.size as u64;
        let blocked = self
            .pending
            .iter()
            .flatten()
            .map(|w| &w.claimed)
            .chain(&self.held)
            .any(|c| c.start < off + size && off < c.end);
        if blocked {
            self.deferred.push_back((slot, off));
            return Ok(());
        }
        let Some(x) = self.direct_extent(slot, off) else {
            if self.p.write {
                self.held[slot] = self.dev.write_claim(off, size);
            }
            let _ = self.jobs.send((slot, off));
            return Ok(());
        };
        let ptr = self.slots[slot].as_mut_ptr();
        let len = self.p.size as u32;
        // SAFETY: the slot's buffer is not touched again until this request is reaped,
        // and `run` drains the ring before the buffers go.
        unsafe {
            if self.p.write {
                ring.write(x.fd, ptr, len, x.offset, slot as u64)
            } else {
                ring.read(x.fd, ptr, len, x.offset, slot as u64)
            }
        }
    }

    /// Where the request in `slot` at `off` can go straight to a file, if anywhere; a
    /// read's hold on its extent and a write's pending allocation are kept until the
    /// request completes.
    fn direct_extent(&mut self, slot: usize, off: u64) -> Option<DirectExtent> {
        let size = self.p.size as u64;
        let usable = |x: &DirectExtent| x.offset % x.align == 0 && size % x.align == 0;
        if !self.p.write {
            let r = self
                .dev
                .begin_read(off, size)
                .filter(|r| usable(&r.extent))?;
            let x = r.extent;
            self.reading[slot] = Some(r);
            return Some(x);
        }
        // A write that cannot be used is dropped, which gives its space back.
        let w = self
            .dev
            .begin_write(off, size)
            .filter(|w| usable(&w.extent))?;
        let x = w.extent;
        self.pending[slot] = Some(w);
        Some(x)
    }

    /// Finishes the ring's completed requests. Returns the first failure.
    fn reap_ring(&mut self, ring: &mut Ring) -> Result<Option<crate::error::Error>> {
        let mut failure = None;
        for (user_data, res) in ring.reap()? {
            self.in_flight -= 1;
            let slot = user_data as usize;
            self.free.push(slot);
            self.reading[slot] = None;
            let outcome = if res < 0 {
                Err(std::io::Error::from_raw_os_error(-res))
            } else if res as usize != self.p.size {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "short transfer",
                ))
            } else {
                Ok(())
            }
            .context(|| "benchmark request".into());
            if let Some(w) = self.pending[slot].take() {
                if let Err(e) = w.finish(outcome.is_ok()) {
                    failure.get_or_insert(e);
                }
            }
            if let Err(e) = outcome {
                failure.get_or_insert(e);
            }
        }
        Ok(failure)
    }

    /// Takes back the slots workers finished with. Returns the first failure.
    fn reap_workers(&mut self) -> Result<()> {
        let done = std::mem::take(&mut *self.finished.lock().unwrap_or_else(|e| e.into_inner()));
        let mut failure = Ok(());
        for (slot, r) in done {
            self.in_flight -= 1;
            self.free.push(slot);
            self.held[slot] = 0..0;
            if let Err(e) = r {
                if failure.is_ok() {
                    failure = Err(e);
                }
            }
        }
        failure
    }
}
