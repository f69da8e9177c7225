//! A connection's reply thread. It owns an io_uring: reads of mapped data and writes in
//! place (or into space the image sets aside) go straight to the file through it, as
//! qemu-nbd's event loop does; every other request runs on the shared worker pool.
//! With a ring it also reads the requests itself ([`Intake`]), waiting for the socket
//! through the ring beside the disk's completions.
//! Replies leave in batches through a non-blocking socket, the ring telling when the
//! socket takes more; so a client that stops reading stalls only its own replies, and
//! nothing the thread holds (an allocation's claim, a block's lock) waits on it.

use crate::commands::{allowed_flags, run_on_pool};
use crate::connection::{Connection, Msg};
use crate::errors::{io_errno, nbd_error};
use crate::export::MAX_PAYLOAD;
use crate::intake::{Intake, Next};
use crate::outbox::{Outbox, MAX_REPLY_BATCH};
use crate::proto::{self, cflag, cmd, errno, Request};
use crate::transport::Transport;
use qed::{AlignedBuf as Buf, BlockDevice, DirectDone, DirectEvent, DirectQueue, WorkerPool};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

/// A connection's ring: each request in it tagged with its cost (held from the budget).
pub(crate) type Ring<'a> = DirectQueue<'a, (Request, u64)>;

/// Runs the reply thread until the reader has stopped and every request is answered.
/// With `intake` (and a ring) the thread reads the requests itself, and there is no
/// reader. Returns the socket.
pub(crate) fn run(
    conn: &Arc<Connection>,
    pool: &WorkerPool,
    incoming: Receiver<Msg>,
    ring: Option<Ring<'_>>,
    socket: Transport,
    intake: Option<Intake>,
) -> Transport {
    let mut t = ReplyThread {
        ring,
        out: Outbox::default(),
        early: None,
        stopping: false,
        intake,
        conn,
        dev: conn.device(),
        pool,
        incoming,
        socket,
    };
    // A bug in the library must not leave the ring waiting for a socket nobody reads:
    // the thread drains it either way, and the connection ends.
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.serve()));
    let socket = t.finish();
    if served.is_err() {
        let _ = socket.socket().shutdown(std::net::Shutdown::Both);
    }
    socket
}

impl ReplyThread<'_> {
    /// Answers requests until the reader has stopped (or the intake is done) and every
    /// request is answered.
    fn serve(&mut self) {
        loop {
            let reaped = self.reap_completions();
            // New requests and replies, after the completions: a wake-up the ring has
            // just delivered is for a message already sent.
            let mut progress = self.take_messages(reaped);
            progress |= self.take_requests();
            // The disk starts on the new requests while the replies go out.
            self.submit();
            progress |= self.send_replies();
            if self.intake.as_ref().is_some_and(|i| i.done) && self.conn.budget.idle() {
                self.stopping = true;
            }
            if self.stopping && !self.busy() {
                return;
            }
            if !progress {
                self.wait_for_ring();
            }
        }
    }
}

/// The reply thread's state.
struct ReplyThread<'a> {
    /// First, so that it is drained before the buffers it may still use are dropped.
    ring: Option<Ring<'a>>,
    out: Outbox,
    /// A message taken while parking the ring, to act on first.
    early: Option<Msg>,
    /// The reader is done (or gone); the thread ends once nothing is left to answer.
    stopping: bool,
    /// The requests, when this thread reads them itself.
    intake: Option<Intake>,
    conn: &'a Arc<Connection>,
    dev: &'a dyn BlockDevice,
    pool: &'a WorkerPool,
    incoming: Receiver<Msg>,
    socket: Transport,
}

impl<'a> ReplyThread<'a> {
    /// Turns what the ring finished into replies; returns whether anything finished.
    fn reap_completions(&mut self) -> bool {
        let Some(r) = self.ring.as_mut() else {
            return false;
        };
        let _ = r.submit();
        let (conn, out, socket, intake) =
            (self.conn, &mut self.out, &self.socket, &mut self.intake);
        let reaped = r.reap(|event| match event {
            DirectEvent::Writable(_) => out.poll_armed = false,
            DirectEvent::Readable(res) => {
                if let Some(i) = intake.as_mut() {
                    i.armed = false;
                }
                if res < 0 {
                    // A ring that cannot wait for the socket would have this thread
                    // spin: it looks again a little later instead.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            DirectEvent::Done(done) => {
                let cost = done.tag.1;
                let (head, data) = complete(conn, done);
                out.push(&conn.budget, socket, &head, data, cost);
            }
        });
        reaped.unwrap_or(false)
    }

    /// Takes the messages waiting, until a batch of replies is gathered; returns
    /// whether anything was reaped or taken. `reaped` says whether completions were.
    fn take_messages(&mut self, reaped: bool) -> bool {
        let mut progress = reaped;
        loop {
            // Without a ring nothing else can wake this thread: wait for a message.
            let block = self.ring.is_none() && !progress && !self.out.pending() && !self.stopping;
            let Some(msg) = self.next_message(block) else {
                break;
            };
            progress = true;
            self.dispatch(msg);
            if self.out.unsent() >= MAX_REPLY_BATCH as u64 {
                break;
            }
        }
        progress
    }

    /// The next message, if one is waiting (or, with `block`, once one comes). A reader
    /// gone counts as stopping.
    fn next_message(&mut self, block: bool) -> Option<Msg> {
        if let Some(m) = self.early.take() {
            return Some(m);
        }
        let msg = if block {
            self.incoming.recv().ok()
        } else {
            match self.incoming.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => None,
            }
        };
        if msg.is_none() {
            self.stopping = true;
        }
        msg
    }

    /// Takes the requests the socket has whole and the budget admits; returns whether
    /// it took any (or learned that no more will come).
    fn take_requests(&mut self) -> bool {
        let Some(mut intake) = self.intake.take() else {
            return false;
        };
        let was_done = intake.done;
        let mut progress = false;
        while let Next::Request(req, payload, cost) = intake.next(self.conn) {
            progress = true;
            let on_ring = match req.kind {
                cmd::READ | cmd::WRITE => self.start(req, payload, cost),
                _ => Err((req, payload, cost)),
            };
            if let Err((req, payload, cost)) = on_ring {
                run_on_pool(self.conn, self.pool, req, payload, cost);
            }
        }
        progress |= intake.done && !was_done;
        self.intake = Some(intake);
        progress
    }

    /// Acts on one message: a reply is queued, or the reader is done.
    fn dispatch(&mut self, msg: Msg) {
        match msg {
            Msg::Stop => self.stopping = true,
            Msg::Reply(bytes, cost) => self.out.push_reply(&self.conn.budget, bytes, cost),
        }
    }

    /// Hands the ring what was queued on it.
    fn submit(&mut self) {
        if let Some(r) = self.ring.as_mut() {
            let _ = r.submit();
        }
    }

    /// Sends the replies gathered. Without a ring, it blocks until they are all sent;
    /// with one, what the socket cannot take now waits for the ring to say it can.
    fn send_replies(&mut self) -> bool {
        if !self.out.pending() || self.out.poll_armed {
            return false;
        }
        let before = self.out.unsent();
        let all_sent = self
            .out
            .send(&self.conn.budget, &self.socket, self.ring.is_none());
        // Replies that went gave back budget the intake may be waiting for.
        let progress = self.out.unsent() < before;
        if all_sent {
            return progress;
        }
        if let Some(r) = self.ring.as_mut() {
            // The socket outlives the ring's use of it: the ring is drained before the
            // thread returns the socket.
            if r.poll_writable(self.socket.socket().as_raw_fd()) {
                self.out.poll_armed = true;
            } else {
                self.out.send(&self.conn.budget, &self.socket, true);
                return true;
            }
        }
        progress
    }

    /// Whether a request is in the kernel or a reply is unsent.
    fn busy(&self) -> bool {
        self.ring.as_ref().is_some_and(|r| r.in_flight() > 0) || self.out.pending()
    }

    /// Sleeps until the ring has a completion or a message wakes it.
    fn wait_for_ring(&mut self) {
        let Some(r) = self.ring.as_mut() else {
            return;
        };
        if let Some(i) = self.intake.as_mut() {
            if i.starved() && !i.armed {
                let fd = i.socket().socket().as_raw_fd();
                // The socket outlives the ring's use of it, as for the writable poll.
                i.armed = r.poll_readable(fd);
            }
        }
        let in_kernel = r.in_kernel() > 0;
        let incoming = &self.incoming;
        let early = &mut self.early;
        // A message sent before the ring was parked found nobody to wake: look once more.
        let parked = r.park(|| match incoming.try_recv() {
            Ok(m) => {
                *early = Some(m);
                true
            }
            Err(TryRecvError::Empty) => false,
            // Nothing more will come (the next look stops): sleep only for completions.
            Err(TryRecvError::Disconnected) => !in_kernel,
        });
        if parked.is_err() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Drains the ring, so no buffer or socket is in the kernel's hands, and gives back
    /// the socket.
    fn finish(mut self) -> Transport {
        if let Some(i) = self.intake.as_ref().filter(|i| i.armed) {
            // A wait for requests that will not be read ends with the reading side.
            let _ = i.socket().socket().shutdown(std::net::Shutdown::Read);
        }
        if let Some(mut r) = self.ring.take() {
            r.drain();
        }
        self.socket
    }

    /// Starts a read or write through the ring when there is one and the device can
    /// take it there; hands it back otherwise.
    fn start(&mut self, req: Request, buf: Buf, cost: u64) -> Result<(), (Request, Buf, u64)> {
        let Some(ring) = self.ring.as_mut() else {
            return Err((req, buf, cost));
        };
        if !direct_allowed(self.dev, self.conn, &req, &buf) {
            return Err((req, buf, cost));
        }
        let offset = req.offset;
        if req.kind == cmd::WRITE {
            return ring
                .write(self.dev, offset, buf, (req, cost))
                .map_err(|((req, cost), buf)| (req, buf, cost));
        }
        // Within MAX_PAYLOAD: direct_allowed checked it.
        let len = req.length as usize;
        let out = &mut self.out;
        ring.read(self.dev, offset, len, (req, cost), || out.read_buffer(len))
            .map_err(|(req, cost)| (req, buf, cost))
    }
}

/// Whether a request may go straight to a file: only a valid read, or a valid write
/// (with its whole payload) that needs no flush after it; the device then says whether
/// it can place it without help. Anything else is left to the pool.
fn direct_allowed(dev: &dyn BlockDevice, conn: &Connection, req: &Request, payload: &Buf) -> bool {
    let len = req.length;
    let valid = len > 0
        && len <= u64::from(MAX_PAYLOAD)
        && req.offset.checked_add(len).is_some_and(|e| e <= dev.size())
        && req.flags & !allowed_flags(req.kind, &conn.session) == 0;
    match req.kind {
        cmd::READ => valid,
        // FUA needs a flush after the write: the pool does that.
        cmd::WRITE => {
            valid
                && !conn.export.read_only
                && req.flags & cflag::FUA == 0
                && payload.len() as u64 == len
        }
        _ => false,
    }
}

/// The reply to a request the ring ran: the reply itself, or for a read that succeeded
/// its header, with the data read to follow it.
fn complete(conn: &Connection, done: DirectDone<(Request, u64)>) -> (Vec<u8>, Option<Buf>) {
    let whole = done.whole();
    let res = done.result;
    let (req, _) = done.tag;
    let failure = if res < 0 {
        io_errno(&std::io::Error::from_raw_os_error(-res))
    } else {
        errno::EIO
    };
    if req.kind == cmd::WRITE {
        let reply = match done.settled {
            Ok(()) if whole => conn.ok_reply(&req),
            Ok(()) => conn.error_reply(&req, failure, "write failed"),
            Err(e) => conn.error_reply(&req, nbd_error(&e, true), &e.to_string()),
        };
        return (reply, None);
    }
    if !whole {
        return (conn.error_reply(&req, failure, "read failed"), None);
    }
    let mut head = Vec::with_capacity(32);
    if conn.session.structured {
        proto::last_data_chunk_header(&mut head, &conn.reply_to(&req), req.offset, req.length);
    } else {
        head.extend_from_slice(&proto::simple_reply(req.cookie, 0));
    }
    (head, Some(done.buf))
}
