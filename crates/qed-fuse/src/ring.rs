//! The ring thread. Reads of mapped data and writes in place (or into space the image
//! sets aside) go straight to the image file through one io_uring, submitted in batches
//! as requests come in and answered as they complete; everything else goes to the
//! worker pool. A request then costs no thread hand-off and no blocked worker, and the
//! disk is told of new I/O once a batch rather than once a request: on a machine with
//! few CPUs, those context switches and notifications are most of a request's cost.
//! Of a deep queue, half is held back, so that the next batch is ready the moment the
//! disk completes one (see [`RingThread::disk_share`]).

use crate::admission::Ticket;
use crate::export::MAX_REQUEST;
use crate::ops::Failure;
use crate::replies::{read_and_reply, write_and_reply};
use crate::tally::Tally;
use fuser::{ReplyData, ReplyWrite};
use qed::{AlignedBuf, BlockDevice, DirectDone, DirectEvent, DirectQueue, Waker, WorkerPool};
use std::collections::VecDeque;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The disk is given at least this many requests at once before any is held back.
const RESERVE_FLOOR: usize = 8;

/// A read or write for the ring thread, with what answers it.
pub(crate) enum Io {
    /// Read `len` bytes at `offset`.
    Read {
        offset: u64,
        len: u32,
        reply: ReplyData,
        ticket: Ticket,
    },
    /// Write `data` at `offset`; `sync` flushes afterwards.
    Write {
        offset: u64,
        data: AlignedBuf,
        sync: bool,
        reply: ReplyWrite,
        ticket: Ticket,
    },
    /// Finish what is in flight and end.
    Stop,
}

/// How the readers reach the ring thread.
pub(crate) struct RingLink {
    tx: Sender<Io>,
    waker: Waker,
}

impl RingLink {
    /// Hands `io` to the ring thread, waking it only if it sleeps.
    pub(crate) fn send(&self, io: Io) {
        // The thread outlives every sender (it ends on `Stop`, sent last).
        let _ = self.tx.send(io);
        self.waker.wake();
    }
}

/// Starts the ring thread over `device`, handing what it cannot do to `pool`; `None`
/// where io_uring is missing, and the pool then does everything.
pub(crate) fn start(
    tally: Arc<Tally>,
    pool: Arc<WorkerPool>,
    device: Arc<dyn BlockDevice>,
    capacity: usize,
) -> Option<(RingLink, JoinHandle<()>)> {
    let (tx, rx) = channel();
    // The queue holds the device's extents while requests are in flight, so it cannot
    // move between threads: the ring thread makes it, and hands back its waker.
    let (ready_tx, ready_rx) = sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("fuse-ring".into())
        .spawn(move || {
            let Some(mut ring) = DirectQueue::new(capacity) else {
                let _ = ready_tx.send(None);
                return;
            };
            // The FUSE threads hand requests over one by one: a busy ring thread that
            // looks for them hears of them without a wake-up.
            ring.serve_clients();
            let _ = ready_tx.send(Some(ring.waker()));
            let mut t = RingThread {
                ring,
                dev: &*device,
                tally: &tally,
                pool: &pool,
                rx,
                stopping: false,
                zeros: vec![0; MAX_REQUEST as usize],
                held: VecDeque::new(),
                peak: 0,
            };
            t.run();
        })
        .ok()?;
    let Some(waker) = ready_rx.recv().ok().flatten() else {
        let _ = thread.join();
        return None;
    };
    let link = RingLink { tx, waker };
    Some((link, thread))
}

/// What answers a request in the kernel, and its ticket, given back once it is answered.
struct Tag {
    offset: u64,
    reply: Replier,
    ticket: Ticket,
}

enum Replier {
    Read(ReplyData),
    Write(ReplyWrite),
}

struct RingThread<'a> {
    /// First, so that it is drained before the device it holds extents of goes.
    ring: DirectQueue<'a, Tag>,
    dev: &'a dyn BlockDevice,
    tally: &'a Arc<Tally>,
    pool: &'a Arc<WorkerPool>,
    rx: Receiver<Io>,
    stopping: bool,
    /// The answer to reads of runs known to be zero. Never written, so its pages stay
    /// the kernel's shared zero page and take no memory.
    zeros: Vec<u8>,
    /// Requests held back from the disk, oldest first (see [`RingThread::disk_share`]).
    held: VecDeque<Io>,
    /// The most requests held here at once lately (in the ring and held back).
    peak: usize,
}

impl<'a> RingThread<'a> {
    fn run(&mut self) {
        loop {
            let _ = self.ring.submit();
            let mut progress = self.reap();
            loop {
                match self.rx.try_recv() {
                    Ok(io) => {
                        progress = true;
                        self.hold(io);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.stopping = true;
                        break;
                    }
                }
            }
            if self.stopping && self.ring.in_kernel() == 0 && self.held.is_empty() {
                break;
            }
            if !progress {
                self.sleep();
            }
        }
        self.ring.drain();
    }

    /// Sleeps on the ring until a completion, or a sender's wake-up.
    fn sleep(&mut self) {
        let quiet = self.ring.in_kernel() == 0 && self.held.is_empty();
        let rx = &self.rx;
        let mut got = None;
        let mut gone = false;
        // A message sent before the ring was parked found nobody to wake: look once more.
        let parked = self.ring.park(|| match rx.try_recv() {
            Ok(io) => {
                got = Some(io);
                true
            }
            // Nothing more will come: sleep only for completions still due.
            Err(TryRecvError::Disconnected) => {
                gone = true;
                quiet
            }
            Err(TryRecvError::Empty) => false,
        });
        if gone {
            self.stopping = true;
        }
        if let Some(io) = got {
            self.hold(io);
        }
        if parked.is_err() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// How many requests the disk is given at once. A disk that completes what it has
    /// as one batch (a virtual disk whose host works through its queue before it
    /// signals, say) would otherwise get all the client's requests together, and sit
    /// idle while the answers travel back through the kernel and the next requests
    /// come: half of them are held back instead, to go the moment a batch completes.
    /// A disk that completes requests one by one still has half the client's depth to
    /// work on, and never fewer than [`RESERVE_FLOOR`].
    fn disk_share(&self) -> usize {
        (self.peak / 2).max(RESERVE_FLOOR)
    }

    /// Queues `io` behind the requests held back, and starts what the disk has room for.
    fn hold(&mut self, io: Io) {
        self.held.push_back(io);
        self.peak = self.peak.max(self.ring.in_kernel() + self.held.len());
        self.start_held();
    }

    /// Starts held requests, oldest first, while the disk has room for them.
    fn start_held(&mut self) {
        while self.ring.in_kernel() < self.disk_share() {
            let Some(io) = self.held.pop_front() else {
                break;
            };
            self.dispatch(io);
        }
    }

    fn dispatch(&mut self, io: Io) {
        match io {
            Io::Stop => self.stopping = true,
            Io::Read {
                offset,
                len,
                reply,
                ticket,
            } => self.start_read(offset, len, reply, ticket),
            Io::Write {
                offset,
                data,
                sync,
                reply,
                ticket,
            } => self.start_write(offset, data, sync, reply, ticket),
        }
    }

    fn start_read(&mut self, offset: u64, len: u32, reply: ReplyData, ticket: Ticket) {
        let size = self.dev.size();
        let n = u64::from(len).min(size.saturating_sub(offset));
        // What the chain knows reads as zeros needs no I/O, nor a worker.
        if n == 0 || qed::known_zero(self.dev, offset, n).unwrap_or(false) {
            return reply.data(&self.zeros[..n as usize]);
        }
        let n = n as usize;
        let tag = Tag {
            offset,
            reply: Replier::Read(reply),
            ticket,
        };
        let read = self
            .ring
            .read(self.dev, offset, n, tag, || AlignedBuf::new(n));
        if let Err(tag) = read {
            self.to_pool(tag.into_io(len, None));
        }
    }

    fn start_write(
        &mut self,
        offset: u64,
        data: AlignedBuf,
        sync: bool,
        reply: ReplyWrite,
        ticket: Ticket,
    ) {
        let n = data.len() as u64;
        let fits = n > 0 && offset.checked_add(n).is_some_and(|e| e <= self.dev.size());
        // A synchronous write needs a flush after it: the pool does that.
        if !fits || sync {
            return self.to_pool(Io::Write {
                offset,
                data,
                sync,
                reply,
                ticket,
            });
        }
        let tag = Tag {
            offset,
            reply: Replier::Write(reply),
            ticket,
        };
        if let Err((tag, data)) = self.ring.write(self.dev, offset, data, tag) {
            self.to_pool(tag.into_io(n as u32, Some(data)));
        }
    }

    fn to_pool(&self, io: Io) {
        let pool = self.pool;
        let tally = self.tally.clone();
        match io {
            Io::Read {
                offset,
                len,
                reply,
                ticket,
            } => pool.execute(move || {
                read_and_reply(&tally, &*ticket.device, offset, len, reply);
                drop(ticket);
            }),
            Io::Write {
                offset,
                data,
                sync,
                reply,
                ticket,
            } => pool.execute(move || {
                write_and_reply(&tally, &*ticket.device, offset, &data, sync, reply);
                drop(ticket);
            }),
            Io::Stop => {}
        }
    }

    /// Answers what the ring finished; returns whether anything did. The writes are
    /// settled first (the queue settles them as it reaps), so that nothing they hold
    /// (claims, block holds, the allocation gate) is still held while this thread starts
    /// the requests held back, which may wait for those; the answers go out once the
    /// disk has its next batch.
    fn reap(&mut self) -> bool {
        let (dev, tally) = (self.dev, self.tally);
        let mut answers = Vec::new();
        let reaped = self.ring.reap(|event| {
            if let DirectEvent::Done(done) = event {
                answers.push(settle(dev, tally, done));
            }
        });
        if !reaped.unwrap_or(false) {
            return false;
        }
        // What came in meanwhile counts towards the depth, and may go to the disk now.
        while let Ok(io) = self.rx.try_recv() {
            self.held.push_back(io);
        }
        // Forget, slowly, a depth the client no longer keeps.
        self.peak = (self.peak.saturating_sub(1)).max(self.ring.in_kernel() + self.held.len());
        self.start_held();
        let _ = self.ring.submit();
        for a in answers {
            a.send();
        }
        true
    }
}

impl Tag {
    /// The request again, for the pool: a read of `len` bytes, or a write of `data`.
    fn into_io(self, len: u32, data: Option<AlignedBuf>) -> Io {
        let Tag {
            offset,
            reply,
            ticket,
        } = self;
        match (reply, data) {
            (Replier::Write(reply), Some(data)) => Io::Write {
                offset,
                data,
                sync: false,
                reply,
                ticket,
            },
            (Replier::Read(reply), _) => Io::Read {
                offset,
                len,
                reply,
                ticket,
            },
            // The queue hands a write back with its payload: never reached.
            (Replier::Write(reply), None) => {
                reply.error(fuser::Errno::EIO);
                Io::Stop
            }
        }
    }
}

/// Says how to answer a request the ring finished (the queue settled a write's
/// allocation or block hold already).
fn settle(dev: &dyn BlockDevice, tally: &Tally, done: DirectDone<Tag>) -> Answer {
    let n = done.len;
    let whole = done.whole();
    let res = done.result;
    let offset = done.tag.offset;
    let failure = |what: &str| {
        let cause = if res < 0 {
            std::io::Error::from_raw_os_error(-res)
        } else {
            std::io::Error::other(format!("short {what}: {res} of {n} bytes"))
        };
        Failure::Device(qed::Error::Io {
            context: format!("{what} {n} bytes at {offset} of {}", dev.filename()),
            cause,
        })
    };
    let reply = match done.tag.reply {
        Replier::Read(reply) => Reply::Read(
            reply,
            if whole {
                Ok(done.buf)
            } else {
                Err(tally.errno(failure("reading")))
            },
        ),
        Replier::Write(reply) => {
            tally.wrote();
            Reply::Write(
                reply,
                match done.settled {
                    Ok(()) if whole => Ok(n as u32),
                    Ok(()) => Err(tally.errno(failure("writing"))),
                    Err(e) => Err(tally.errno(Failure::Device(e))),
                },
            )
        }
    };
    Answer {
        reply,
        _ticket: done.tag.ticket,
    }
}

/// A settled request's answer, and its ticket, given back once the answer is sent.
struct Answer {
    reply: Reply,
    _ticket: Ticket,
}

enum Reply {
    Read(ReplyData, Result<AlignedBuf, fuser::Errno>),
    Write(ReplyWrite, Result<u32, fuser::Errno>),
}

impl Answer {
    fn send(self) {
        match self.reply {
            Reply::Read(r, Ok(buf)) => r.data(&buf),
            Reply::Read(r, Err(e)) => r.error(e),
            Reply::Write(r, Ok(n)) => r.written(n),
            Reply::Write(r, Err(e)) => r.error(e),
        }
    }
}
