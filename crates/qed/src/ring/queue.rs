//! The loop over io_uring: begin a read or write on the device, hand it to the kernel,
//! reap it, and finish it (let go of a read's hold, settle a write's allocation), with
//! the caller's tag for each request carried through. Generic over the tag, so a
//! request costs no allocation or dynamic call here beyond what the device does.

use super::uring::{Ring, Waker, SERVER_POLL};
use crate::block::{BlockDevice, DirectExtent, DirectRead, PendingWrite};
use crate::error::Result;
use crate::storage::AlignedBuf;
use std::ops::Range;
use std::os::fd::RawFd;

/// `user_data` of the wait for a descriptor to be writable.
const WRITABLE: u64 = u64::MAX - 1;
/// `user_data` of the wait for a descriptor to be readable.
const READABLE: u64 = u64::MAX - 2;

/// Reads and writes going straight to an image's file through one io_uring, owned by
/// one thread; other threads hand it work and wake it with its [`Waker`].
///
/// A request carries a tag of the caller's (`T`): what it needs to answer the request
/// once it completes. A request the queue cannot take (the device hands out no extent
/// for it, or not one direct I/O can use) is handed back untouched, to run on the
/// device's own path.
pub struct DirectQueue<'d, T> {
    /// First, so that it is drained before the buffers it may still use are dropped.
    ring: Ring,
    /// Requests in the kernel, by slot (the ring's `user_data`).
    flight: Vec<Option<Flight<'d, T>>>,
    /// Slots of `flight` free for reuse.
    free: Vec<usize>,
    in_flight: usize,
}

/// A request in the kernel.
struct Flight<'d, T> {
    tag: T,
    buf: AlignedBuf,
    len: usize,
    hold: Hold<'d>,
}

/// What a request holds on the device until it completes.
enum Hold<'d> {
    /// The hold on the extent read, let go once the read completed.
    Read(#[allow(dead_code)] DirectRead<'d>),
    /// The allocation (or block hold) to settle once the write completed.
    Write(PendingWrite<'d>),
}

/// What [`DirectQueue::reap`] found.
#[derive(Debug)]
pub enum DirectEvent<T> {
    /// A read or write completed, and was finished.
    Done(DirectDone<T>),
    /// A [`DirectQueue::poll_readable`] wait ended, with its result (negative: an errno).
    Readable(i32),
    /// A [`DirectQueue::poll_writable`] wait ended, with its result.
    Writable(i32),
}

/// A read or write the kernel completed. Its hold on the device is let go already, and a
/// write's allocation settled (`settled`), so the caller only answers it.
#[derive(Debug)]
pub struct DirectDone<T> {
    /// The caller's tag.
    pub tag: T,
    /// The buffer: the data read, or the payload written.
    pub buf: AlignedBuf,
    /// The bytes asked for.
    pub len: usize,
    /// The completion's result: the bytes transferred, or a negated errno.
    pub result: i32,
    /// For a write, how settling its allocation went (always `Ok` for a read).
    pub settled: Result<()>,
}

impl<T> DirectDone<T> {
    /// Whether all the bytes asked for were transferred.
    pub fn whole(&self) -> bool {
        usize::try_from(self.result).is_ok_and(|r| r == self.len)
    }
}

impl<T> std::fmt::Debug for DirectQueue<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectQueue")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl<'d, T> DirectQueue<'d, T> {
    /// A queue for about `depth` requests in flight; `None` where io_uring is missing.
    pub fn new(depth: usize) -> Option<Self> {
        let entries = u32::try_from(depth).unwrap_or(u32::MAX / 2);
        Some(Self {
            ring: Ring::new(entries)?,
            flight: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    /// Makes [`DirectQueue::park`] look for work a while before it sleeps, for an owner
    /// serving clients: long enough to span the gaps between a fast disk's completions
    /// and a client's next requests, which a wake-up would otherwise add to every round
    /// trip.
    pub fn serve_clients(&mut self) {
        self.ring.set_max_poll(SERVER_POLL);
    }

    /// A handle other threads wake this queue's owner with.
    pub fn waker(&self) -> Waker {
        self.ring.waker()
    }

    /// Reads and writes in the kernel.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Entries in the kernel: reads, writes and waits for descriptors.
    pub fn in_kernel(&self) -> usize {
        self.ring.in_kernel()
    }

    /// Starts reading `len` bytes at `offset` of `dev` into the buffer `buf` makes (made
    /// only once the read can go to the kernel; at least `len` bytes). Hands `tag` back
    /// when the read cannot go straight to a file.
    pub fn read(
        &mut self,
        dev: &'d dyn BlockDevice,
        offset: u64,
        len: usize,
        tag: T,
        buf: impl FnOnce() -> AlignedBuf,
    ) -> std::result::Result<(), T> {
        let Ok(n) = u32::try_from(len) else {
            return Err(tag);
        };
        let read = (n > 0)
            .then(|| dev.begin_read(offset, len as u64))
            .flatten()
            .filter(|r| usable(&r.extent, len));
        let Some(read) = read else {
            return Err(tag);
        };
        let extent = read.extent;
        let buf = buf();
        if buf.len() < len {
            return Err(tag);
        }
        let f = Flight {
            tag,
            buf,
            len,
            hold: Hold::Read(read),
        };
        self.push(f, extent).map_err(|(tag, _)| tag)
    }

    /// Starts writing `buf` at `offset` of `dev`, where the device places it without
    /// help (holding what it claimed until the write completes). Hands the tag and the
    /// payload back when the write cannot go straight to a file; whatever the device set
    /// aside for it is given back then.
    pub fn write(
        &mut self,
        dev: &'d dyn BlockDevice,
        offset: u64,
        buf: AlignedBuf,
        tag: T,
    ) -> std::result::Result<(), (T, AlignedBuf)> {
        let len = buf.len();
        let Ok(n) = u32::try_from(len) else {
            return Err((tag, buf));
        };
        // A write that cannot be used is dropped, which gives its space back.
        let write = (n > 0)
            .then(|| dev.begin_write(offset, len as u64))
            .flatten()
            .filter(|w| usable(&w.extent, len));
        let Some(write) = write else {
            return Err((tag, buf));
        };
        let extent = write.extent;
        let f = Flight {
            tag,
            buf,
            len,
            hold: Hold::Write(write),
        };
        self.push(f, extent)
    }

    /// The guest ranges the writes in flight have claimed: a request touching one would
    /// wait for it on the device's own path.
    pub fn claims(&self) -> impl Iterator<Item = &Range<u64>> {
        self.flight.iter().flatten().filter_map(|f| match &f.hold {
            Hold::Write(w) => Some(&w.claimed),
            Hold::Read(_) => None,
        })
    }

    /// Queues a one-shot wait for `fd` to have something to read (or to be closed),
    /// reaped as [`DirectEvent::Readable`]; false if the ring would not take it. The
    /// descriptor must stay open until then (or until [`DirectQueue::drain`]).
    pub fn poll_readable(&mut self, fd: RawFd) -> bool {
        self.ring.poll_readable(fd, READABLE).is_ok()
    }

    /// Queues a one-shot wait for `fd` to take more, reaped as
    /// [`DirectEvent::Writable`]; as [`DirectQueue::poll_readable`].
    pub fn poll_writable(&mut self, fd: RawFd) -> bool {
        self.ring.poll_writable(fd, WRITABLE).is_ok()
    }

    /// Submits what is queued without waiting (no system call when nothing is).
    pub fn submit(&mut self) -> Result<()> {
        self.ring.submit()
    }

    /// Submits what is queued and sleeps until at least one completion or a
    /// [`Waker::wake`], unless `has_work` finds something to do. It asks `has_work`
    /// once more after wakers know the owner is about to sleep, so that nothing handed
    /// over before is missed.
    pub fn park(&mut self, has_work: impl FnMut() -> bool) -> Result<()> {
        self.ring.park(has_work)
    }

    /// Finishes what the kernel completed and tells `each` about it, in completion
    /// order; returns whether anything completed.
    pub fn reap(&mut self, mut each: impl FnMut(DirectEvent<T>)) -> Result<bool> {
        let done = self.ring.reap()?;
        let any = !done.is_empty();
        for (user_data, result) in done {
            let event = match user_data {
                READABLE => DirectEvent::Readable(result),
                WRITABLE => DirectEvent::Writable(result),
                slot => {
                    let slot = slot as usize;
                    let Some(f) = self.flight.get_mut(slot).and_then(Option::take) else {
                        continue;
                    };
                    self.free.push(slot);
                    self.in_flight -= 1;
                    DirectEvent::Done(finish(f, result))
                }
            };
            each(event);
        }
        Ok(any)
    }

    /// Waits for everything still in the kernel, so that no buffer or descriptor is in
    /// its hands after this; what it reaps is dropped.
    pub fn drain(&mut self) {
        self.ring.drain();
    }

    /// Queues a request begun on the device at `extent`; hands it back (a write's hold
    /// given up unused, so the range reads as before) if the ring would not take it.
    fn push(
        &mut self,
        mut f: Flight<'d, T>,
        extent: DirectExtent,
    ) -> std::result::Result<(), (T, AlignedBuf)> {
        let ptr = f.buf.as_mut_ptr();
        // Both callers checked that the length fits.
        let n = f.len as u32;
        let is_write = matches!(f.hold, Hold::Write(_));
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.flight.push(None);
                self.flight.len() - 1
            }
        };
        self.flight[slot] = Some(f);
        // SAFETY: the buffer lives in `flight` (its heap block never moves, and a write's
        // payload is not touched) until this request is reaped, and the ring is drained
        // before `flight` is dropped.
        let pushed = unsafe {
            if is_write {
                self.ring
                    .write(extent.fd, ptr, n, extent.offset, slot as u64)
            } else {
                self.ring
                    .read(extent.fd, ptr, n, extent.offset, slot as u64)
            }
        };
        let taken_back = match pushed {
            Ok(()) => None,
            Err(_) => self.flight[slot].take(),
        };
        let Some(f) = taken_back else {
            self.in_flight += 1;
            return Ok(());
        };
        self.free.push(slot);
        Err((f.tag, f.buf))
    }
}

/// Lets go of what a completed request held, settling a write's allocation by whether
/// it was written whole.
fn finish<T>(f: Flight<'_, T>, result: i32) -> DirectDone<T> {
    let mut done = DirectDone {
        tag: f.tag,
        buf: f.buf,
        len: f.len,
        result,
        settled: Ok(()),
    };
    if let Hold::Write(w) = f.hold {
        done.settled = w.finish(done.whole());
    }
    done
}

/// Whether direct I/O on the file can take the extent and length as they are (the
/// buffers are aligned already).
fn usable(x: &DirectExtent, len: usize) -> bool {
    x.offset % x.align == 0 && len as u64 % x.align == 0
}
