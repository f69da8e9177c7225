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
use crate::block::{BlockDevice, DirectExtent, PendingWrite};
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
            s.spawn(|| {
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
            });
        }
        let result = drive(dev, p, &mut ring, &mut slots, &jobs, &finished);
        drop(jobs);
        result
    });
    ring.drain();
    result.map(|()| true)
}

/// Submits and reaps requests until all `p.count` have completed.
fn drive(
    dev: &dyn BlockDevice,
    p: &BenchParams,
    ring: &mut Ring,
    slots: &mut [AlignedBuf],
    jobs: &mpsc::Sender<(usize, u64)>,
    finished: &Mutex<Vec<Done>>,
) -> Result<()> {
    let dev_size = dev.size();
    let size = p.size as u64;
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    // Writes to finish when their slot's request completes.
    let mut pending: Vec<Option<PendingWrite<'_>>> = (0..slots.len()).map(|_| None).collect();
    // Requests held back because they touch clusters one of ours is allocating: sent
    // elsewhere they would only wait for it.
    let mut deferred: VecDeque<(usize, u64)> = VecDeque::new();
    let mut next = 0u64;
    let mut in_flight = 0usize;
    loop {
        let held = std::mem::take(&mut deferred);
        let fresh = std::iter::from_fn(|| {
            if next >= p.count {
                return None;
            }
            let slot = free.pop()?;
            let off = offset_of(p, next, dev_size);
            next += 1;
            in_flight += 1;
            Some((slot, off))
        });
        // Held-back requests first, in order; a fresh one behind them waits too.
        let batch: Vec<(usize, u64)> = held.into_iter().chain(fresh).collect();
        for (slot, off) in batch {
            let blocked = pending
                .iter()
                .flatten()
                .any(|w| w.claimed.start < off + size && off < w.claimed.end);
            if blocked {
                deferred.push_back((slot, off));
                continue;
            }
            let usable = |x: &DirectExtent| x.offset % x.align == 0 && size % x.align == 0;
            let direct = if p.write {
                // A write that cannot be used is dropped, which gives its space back.
                dev.begin_write(off, size)
                    .filter(|w| usable(&w.extent))
                    .map(|w| {
                        let x = w.extent;
                        pending[slot] = Some(w);
                        x
                    })
            } else {
                dev.direct_extent(off, size, false).filter(usable)
            };
            let Some(x) = direct else {
                let _ = jobs.send((slot, off));
                continue;
            };
            let ptr = slots[slot].as_mut_ptr();
            let len = p.size as u32;
            // SAFETY: the slot's buffer is not touched again until this request is
            // reaped, and `run` drains the ring before the buffers go.
            unsafe {
                if p.write {
                    ring.write(x.fd, ptr, len, x.offset, slot as u64)
                } else {
                    ring.read(x.fd, ptr, len, x.offset, slot as u64)
                }
            }?;
        }
        if in_flight == 0 {
            return Ok(());
        }
        ring.wait()?;
        let mut failure = None;
        for (user_data, res) in ring.reap()? {
            in_flight -= 1;
            let slot = user_data as usize;
            free.push(slot);
            let outcome = if res < 0 {
                Err(std::io::Error::from_raw_os_error(-res))
            } else if res as usize != p.size {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "short transfer",
                ))
            } else {
                Ok(())
            }
            .context(|| "benchmark request".into());
            if let Some(w) = pending[slot].take() {
                if let Err(e) = w.finish(outcome.is_ok()) {
                    failure.get_or_insert(e);
                }
            }
            if let Err(e) = outcome {
                failure.get_or_insert(e);
            }
        }
        let done = std::mem::take(&mut *finished.lock().unwrap_or_else(|e| e.into_inner()));
        for (slot, r) in done {
            in_flight -= 1;
            free.push(slot);
            if let Err(e) = r {
                failure.get_or_insert(e);
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
    }
}
