//! A small io_uring wrapper for one owner thread: it pushes entries, submits, and reaps
//! completions. Other threads wake it through a [`Waker`] (an eventfd the ring keeps a
//! read armed on), so it can sleep on the ring alone and still hear of work finished
//! elsewhere. Only [`super::DirectQueue`] uses it.

use crate::error::{Error, IoContext, Result};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `user_data` of the eventfd read; callers must not use it.
pub(crate) const WAKE: u64 = u64::MAX;

/// A poll bound for owners that serve clients ([`Ring::set_max_poll`]): long enough to
/// span the gaps between a fast disk's completions and a client's next requests, which
/// a wake-up would otherwise add to every round trip.
pub(crate) const SERVER_POLL: Duration = Duration::from_micros(200);

/// The shortest poll [`Ring::park`] makes; below it, polling stops.
const MIN_POLL: Duration = Duration::from_micros(4);

/// Wakes the thread that owns a [`super::DirectQueue`] from another thread: the one
/// piece of the ring the threads handing it work need, so it is public.
#[derive(Debug, Clone)]
pub struct Waker {
    fd: Arc<OwnedFd>,
    /// Set while the owner sleeps on the ring (see [`Ring::park`]): a wake-up costs a
    /// system call only then.
    parked: Arc<AtomicBool>,
}

impl Waker {
    /// Wakes the owner if it sleeps on its ring, or is about to: call it after handing
    /// the owner its work (a message sent, say), never before.
    pub fn wake(&self) {
        if self.parked.swap(false, Ordering::SeqCst) {
            self.force();
        }
    }

    /// Makes the ring's pending eventfd read complete (a harmless no-op if it already
    /// did).
    fn force(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a live buffer to an eventfd we keep open.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// An io_uring owned by one thread, with a wake-up eventfd.
pub(crate) struct Ring {
    ring: IoUring,
    /// Entries submitted and not yet reaped (their buffers must stay put).
    in_kernel: usize,
    waker: Waker,
    /// Where the pending eventfd read lands; boxed so that it never moves.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// How long [`Ring::park`] looks for work before it sleeps, and its bound.
    poll: Duration,
    max_poll: Duration,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_kernel", &self.in_kernel)
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// A ring for about `entries` requests in flight; `None` where io_uring is missing.
    pub fn new(entries: u32) -> Option<Ring> {
        let ring = IoUring::new((entries + 1).next_power_of_two()).ok()?;
        // SAFETY: eventfd returns a new descriptor or -1; OwnedFd takes the new one.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return None;
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut ring = Ring {
            ring,
            in_kernel: 0,
            waker: Waker {
                fd: Arc::new(fd),
                parked: Arc::new(AtomicBool::new(false)),
            },
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            poll: Duration::ZERO,
            max_poll: Duration::ZERO,
        };
        ring.arm_wake().ok()?;
        Some(ring)
    }

    /// A handle other threads wake this ring's owner with.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Entries submitted and not yet reaped.
    pub fn in_kernel(&self) -> usize {
        self.in_kernel
    }

    /// Queues a read of `len` bytes at `offset` of `fd` into `buf` (submitted at the next
    /// [`Ring::submit`] or [`Ring::park`]); its completion carries `user_data`.
    ///
    /// # Safety
    /// `buf` must point to `len` writable bytes that stay valid and untouched until the
    /// completion is reaped, and `user_data` must not be [`WAKE`].
    pub unsafe fn read(
        &mut self,
        fd: RawFd,
        buf: *mut u8,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> Result<()> {
        let e = opcode::Read::new(types::Fd(fd), buf, len)
            .offset(offset)
            .build()
            .user_data(user_data);
        // SAFETY: as the caller promises.
        unsafe { self.push(&e) }
    }

    /// Queues a write of the `len` bytes at `buf` to `offset` of `fd`; its completion
    /// carries `user_data`.
    ///
    /// # Safety
    /// As [`Ring::read`]: the bytes stay valid and unchanged until the completion is
    /// reaped, and `user_data` is not [`WAKE`].
    pub unsafe fn write(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> Result<()> {
        let e = opcode::Write::new(types::Fd(fd), buf, len)
            .offset(offset)
            .build()
            .user_data(user_data);
        // SAFETY: as the caller promises.
        unsafe { self.push(&e) }
    }

    /// Queues a one-shot wait for `fd` to become writable; its completion carries
    /// `user_data` (not [`WAKE`]). The descriptor must stay open until it is reaped.
    pub fn poll_writable(&mut self, fd: RawFd, user_data: u64) -> Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(user_data);
        // SAFETY: a poll has no buffer.
        unsafe { self.push(&e) }
    }

    /// Queues a one-shot wait for `fd` to have something to read (or to be closed); its
    /// completion carries `user_data` (not [`WAKE`]). The descriptor must stay open
    /// until it is reaped.
    pub fn poll_readable(&mut self, fd: RawFd, user_data: u64) -> Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(user_data);
        // SAFETY: a poll has no buffer.
        unsafe { self.push(&e) }
    }

    /// # Safety
    /// The entry's buffers must stay valid until its completion is reaped.
    unsafe fn push(&mut self, e: &squeue::Entry) -> Result<()> {
        // SAFETY: as the caller promises.
        unsafe { self.ring.submission().push(e) }
            .map_err(|_| Error::Unsupported("the io_uring submission queue is full".into()))?;
        self.in_kernel += 1;
        Ok(())
    }

    fn arm_wake(&mut self) -> Result<()> {
        let e = opcode::Read::new(
            types::Fd(self.waker.fd.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE);
        // SAFETY: `wake_buf` is boxed and lives until `drain` has reaped this read.
        unsafe { self.ring.submission().push(&e) }
            .map_err(|_| Error::Unsupported("the io_uring submission queue is full".into()))?;
        self.wake_armed = true;
        Ok(())
    }

    /// Submits what is queued without waiting (no system call when nothing is).
    pub fn submit(&mut self) -> Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.ring
            .submit()
            .map(|_| ())
            .context(|| "submitting to io_uring".into())
    }

    /// Lets [`Ring::park`] look for work for up to `max` before it sleeps, adapting how
    /// long to what it finds, as QEMU's event loop polls: a busy owner then hears of
    /// work without a wake-up, which on a virtual machine can cost tens of
    /// microseconds, at the price of the CPU it spends looking. Zero (the default)
    /// turns it off.
    pub fn set_max_poll(&mut self, max: Duration) {
        self.max_poll = if max < MIN_POLL { Duration::ZERO } else { max };
        self.poll = self.poll.min(max);
    }

    /// Submits what is queued and sleeps until at least one completion or a
    /// [`Waker::wake`], unless `has_work` finds something to do. With polling on
    /// ([`Ring::set_max_poll`]) it first looks at the completions and asks `has_work`
    /// for a while; then, once wakers know the owner is about to sleep, it asks
    /// `has_work` once more, so that nothing handed over before is missed.
    pub fn park(&mut self, mut has_work: impl FnMut() -> bool) -> Result<()> {
        let start = Instant::now();
        if !self.poll.is_zero() {
            self.submit()?;
            loop {
                if !self.ring.completion().is_empty() || has_work() {
                    return Ok(());
                }
                if start.elapsed() >= self.poll {
                    break;
                }
                // Between looks the CPU goes to any other thread that can run: the one
                // that will complete the work (an io_uring worker, the client) may be
                // waiting for it. Spinning instead halved buffered writes through the
                // FUSE export on two CPUs.
                std::thread::yield_now();
            }
        }
        self.waker.parked.store(true, Ordering::SeqCst);
        let result = if has_work() { Ok(()) } else { self.wait() };
        self.waker.parked.store(false, Ordering::SeqCst);
        self.adapt_poll(start.elapsed());
        result
    }

    /// After a sleep of `slept` (polling included): longer polls when work came soon
    /// after polling gave up, shorter ones when the owner went idle.
    fn adapt_poll(&mut self, slept: Duration) {
        if self.max_poll.is_zero() || slept <= self.poll {
            return;
        }
        self.poll = if slept > self.max_poll {
            // Idle: looking that long would only have burnt the CPU.
            self.poll / 2
        } else {
            (self.poll * 2).max(MIN_POLL).min(self.max_poll)
        };
        if self.poll < MIN_POLL {
            self.poll = Duration::ZERO;
        }
    }

    /// Submits what is queued and waits until at least one completion. Private: a
    /// waker's wake-up reaches only an owner that parked (see [`Ring::park`]).
    fn wait(&mut self) -> Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e).context(|| "waiting for io_uring completions".into()),
        }
    }

    /// The completions that are ready, wake-ups left out (the eventfd read is armed
    /// again). Returns `(user_data, result)` pairs.
    pub fn reap(&mut self) -> Result<Vec<(u64, i32)>> {
        let mut out = Vec::new();
        let mut rearm = false;
        for cqe in self.ring.completion() {
            let cqe: cqueue::Entry = cqe;
            if cqe.user_data() == WAKE {
                self.wake_armed = false;
                rearm = true;
            } else {
                self.in_kernel -= 1;
                out.push((cqe.user_data(), cqe.result()));
            }
        }
        if rearm {
            self.arm_wake()?;
        }
        Ok(out)
    }

    /// Waits for everything still in the kernel, so that no buffer is in use after
    /// this; what it reaps is dropped.
    pub fn drain(&mut self) {
        if self.wake_armed {
            self.waker.force();
        }
        while self.in_kernel > 0 || self.wake_armed {
            if self.ring.submit_and_wait(1).is_err() {
                // Nothing more can be learned: keep the wake buffer alive rather than
                // risk the kernel writing into freed memory.
                std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
                return;
            }
            for cqe in self.ring.completion() {
                if cqe.user_data() == WAKE {
                    self.wake_armed = false;
                } else {
                    self.in_kernel -= 1;
                }
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Work handed over while the owner runs, just before it parks, or while it sleeps
    /// is never missed; the owner sleeps until then.
    #[test]
    fn a_parked_ring_hears_of_work_handed_over_at_any_moment() {
        hears_work_at_any_moment(Duration::ZERO);
    }

    /// The same with polling: work comes while it polls, just after it gave up, and
    /// long after.
    #[test]
    fn a_polling_ring_hears_of_work_handed_over_at_any_moment() {
        hears_work_at_any_moment(Duration::from_micros(500));
    }

    fn hears_work_at_any_moment(max_poll: Duration) {
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut ring = Ring::new(4).expect("io_uring");
            ring.set_max_poll(max_poll);
            let (tx, rx) = mpsc::channel();
            let waker = ring.waker();
            let sender = std::thread::spawn(move || {
                for (i, pause) in [0u64, 0, 1, 20, 0, 50].into_iter().enumerate() {
                    std::thread::sleep(Duration::from_millis(pause));
                    tx.send(i).unwrap();
                    waker.wake();
                }
            });
            let mut got = Vec::new();
            let mut parks = 0;
            while got.len() < 6 {
                while let Ok(i) = rx.try_recv() {
                    got.push(i);
                }
                if got.len() == 6 {
                    break;
                }
                let mut early = None;
                ring.park(|| {
                    early = rx.try_recv().ok();
                    early.is_some()
                })
                .unwrap();
                ring.reap().unwrap();
                got.extend(early);
                parks += 1;
            }
            sender.join().unwrap();
            done_tx.send((got, parks)).unwrap();
        });
        let (got, parks) = done_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the owner slept through a wake-up");
        assert_eq!(got, (0..6).collect::<Vec<_>>());
        assert!(parks >= 2, "the owner never slept");
    }

    /// Polls grow while work comes soon after a poll gave up, stay put while polls find
    /// it, and shrink away once the owner is idle; never past the bound.
    #[test]
    fn polls_adapt_to_how_soon_work_comes() {
        let mut ring = Ring::new(4).expect("io_uring");
        let max = Duration::from_micros(200);
        ring.adapt_poll(Duration::from_micros(50));
        assert_eq!(ring.poll, Duration::ZERO, "polling is off by default");
        ring.set_max_poll(max);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            ring.adapt_poll(Duration::from_micros(150));
            assert!(ring.poll >= last && ring.poll <= max);
            last = ring.poll;
        }
        assert_eq!(ring.poll, max, "work came within the bound: poll up to it");
        ring.adapt_poll(Duration::from_micros(100));
        assert_eq!(ring.poll, max, "a poll that found its work changes nothing");
        let mut shrinks = 0;
        while !ring.poll.is_zero() {
            ring.adapt_poll(Duration::from_millis(5));
            shrinks += 1;
            assert!(shrinks < 20, "an idle owner kept polling");
        }
        assert!(shrinks > 1, "one long sleep does not end polling at once");
    }
}
