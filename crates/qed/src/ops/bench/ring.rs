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
use crate::block::BlockDevice;
use crate::error::{IoContext, Result};
use crate::ring::{DirectEvent, DirectQueue, Waker};
use crate::storage::AlignedBuf;
use std::collections::VecDeque;
use std::sync::{mpsc, Mutex};

/// What a worker reports: the slot it ran for, and how it went.
type Done = (usize, Result<()>);

/// Runs the workload; `Ok(false)` when io_uring is not available here.
pub(super) fn run(dev: &dyn BlockDevice, p: &BenchParams) -> Result<bool> {
    let depth = p.depth.max(1);
    let Some(mut queue) = DirectQueue::new(depth) else {
        return Ok(false);
    };
    let (jobs, work_queue) = mpsc::channel::<(usize, u64)>();
    let work_queue = Mutex::new(work_queue);
    let finished: Mutex<Vec<Done>> = Mutex::new(Vec::new());
    let waker: Waker = queue.waker();

    let result = std::thread::scope(|s| {
        for _ in 0..depth {
            s.spawn(|| work(dev, p, &work_queue, &finished, &waker));
        }
        let mut driver = Driver::new(dev, p, depth, &jobs, &finished);
        let result = driver.drive(&mut queue);
        drop(jobs);
        result
    });
    queue.drain();
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

/// The submitting thread's state. A request's slot (its tag on the queue) bounds how
/// many are in flight and names what a worker's write holds.
struct Driver<'a, 's> {
    dev: &'a dyn BlockDevice,
    p: &'a BenchParams,
    dev_size: u64,
    jobs: &'s mpsc::Sender<(usize, u64)>,
    finished: &'s Mutex<Vec<Done>>,
    /// Slots free for a request.
    free: Vec<usize>,
    /// Buffers not in the kernel: one per slot, made up front, so that requests
    /// allocate nothing.
    spare: Vec<AlignedBuf>,
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
        depth: usize,
        jobs: &'s mpsc::Sender<(usize, u64)>,
        finished: &'s Mutex<Vec<Done>>,
    ) -> Self {
        Self {
            dev,
            p,
            dev_size: dev.size(),
            free: (0..depth).rev().collect(),
            spare: (0..depth)
                .map(|_| AlignedBuf::filled(p.size, p.pattern))
                .collect(),
            held: (0..depth).map(|_| 0..0).collect(),
            jobs,
            finished,
            deferred: VecDeque::new(),
            next: 0,
            in_flight: 0,
        }
    }

    /// Submits and reaps requests until all `p.count` have completed.
    fn drive(&mut self, queue: &mut DirectQueue<'a, usize>) -> Result<()> {
        loop {
            self.start_requests(queue);
            if self.in_flight == 0 {
                return Ok(());
            }
            let finished = self.finished;
            queue.park(|| {
                !finished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
            })?;
            let mut failure = self.reap_ring(queue)?;
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
    fn start_requests(&mut self, queue: &mut DirectQueue<'a, usize>) {
        let mut batch: Vec<(usize, u64)> = std::mem::take(&mut self.deferred).into();
        while self.next < self.p.count {
            let Some(slot) = self.free.pop() else { break };
            batch.push((slot, offset_of(self.p, self.next, self.dev_size)));
            self.next += 1;
            self.in_flight += 1;
        }
        for (slot, off) in batch {
            self.start(queue, slot, off);
        }
    }

    /// Starts one request: held back behind an allocation of ours that it touches,
    /// straight to the file where the device hands out an extent, else on a worker.
    fn start(&mut self, queue: &mut DirectQueue<'a, usize>, slot: usize, off: u64) {
        let size = self.p.size as u64;
        let blocked = queue
            .claims()
            .chain(&self.held)
            .any(|c| c.start < off + size && off < c.end);
        if blocked {
            self.deferred.push_back((slot, off));
            return;
        }
        let (len, pattern) = (self.p.size, self.p.pattern);
        let spare = &mut self.spare;
        let mut buf = || {
            spare
                .pop()
                .unwrap_or_else(|| AlignedBuf::filled(len, pattern))
        };
        if !self.p.write {
            if queue.read(self.dev, off, len, slot, buf).is_err() {
                let _ = self.jobs.send((slot, off));
            }
            return;
        }
        let Err((_, unused)) = queue.write(self.dev, off, buf(), slot) else {
            return;
        };
        self.spare.push(unused);
        self.held[slot] = self.dev.write_claim(off, size);
        let _ = self.jobs.send((slot, off));
    }

    /// Finishes the ring's completed requests. Returns the first failure.
    fn reap_ring(
        &mut self,
        queue: &mut DirectQueue<'a, usize>,
    ) -> Result<Option<crate::error::Error>> {
        let mut failure = None;
        queue.reap(|event| {
            let DirectEvent::Done(done) = event else {
                return;
            };
            self.in_flight -= 1;
            self.free.push(done.tag);
            let outcome = if done.result < 0 {
                Err(std::io::Error::from_raw_os_error(-done.result))
            } else if !done.whole() {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "short transfer",
                ))
            } else {
                Ok(())
            }
            .context(|| "benchmark request".into());
            self.spare.push(done.buf);
            if let Err(e) = done.settled {
                failure.get_or_insert(e);
            }
            if let Err(e) = outcome {
                failure.get_or_insert(e);
            }
        })?;
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
