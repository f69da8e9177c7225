//! A connection's reply thread. It owns an io_uring: reads of mapped data and writes in
//! place (or into space the image sets aside) go straight to the file through it, as
//! qemu-nbd's event loop does; every other request runs on the shared worker pool.
//! Replies leave in batches through a non-blocking socket, the ring telling when the
//! socket takes more; so a client that stops reading stalls only its own replies, and
//! nothing the thread holds (an allocation's claim, a block's lock) waits on it.

use crate::pool::Pool;
use crate::proto::{self, cflag, cmd, errno, Request};
use crate::stream::Stream;
use crate::transmission::{allowed_flags, io_errno, nbd_error, Connection, Msg};
use crate::MAX_PAYLOAD;
use qed::{AlignedBuf as Buf, BlockDevice, DirectExtent, PendingWrite, Ring};
use std::collections::VecDeque;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

/// `user_data` of the poll that waits for the socket to take more.
const SOCKET_WRITABLE: u64 = u64::MAX - 1;
/// Bytes of replies gathered before they are sent.
const MAX_REPLY_BATCH: usize = 256 << 10;

/// A request in the kernel.
struct InFlight<'a> {
    req: Request,
    buf: Buf,
    cost: u64,
    write: Option<PendingWrite<'a>>,
}

/// Replies waiting to be sent, and the budget each holds until it is.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    sent: usize,
    /// (end of the reply in `bytes`, its budget)
    costs: VecDeque<(usize, u64)>,
    broken: bool,
    poll_armed: bool,
}

impl Outbox {
    /// Queues one reply, given in parts (a header and the data read, say, copied once).
    fn push(&mut self, conn: &Connection, parts: &[&[u8]], cost: u64) {
        if self.broken {
            conn.budget.release(cost);
            return;
        }
        for part in parts {
            self.bytes.extend_from_slice(part);
        }
        self.costs.push_back((self.bytes.len(), cost));
    }

    fn pending(&self) -> bool {
        self.sent < self.bytes.len()
    }

    /// Sends what it can; with `wait`, everything (blocking). Returns whether all went.
    fn send(&mut self, conn: &Connection, socket: &Stream, wait: bool) -> bool {
        let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
        while self.pending() && !self.broken {
            let rest = &self.bytes[self.sent..];
            // SAFETY: send from a live buffer on a socket we hold open.
            let n =
                unsafe { libc::send(socket.as_raw_fd(), rest.as_ptr().cast(), rest.len(), flags) };
            if n > 0 {
                self.sent += n as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock => break,
                _ => {
                    // A reply cut short leaves the stream out of step: end the session.
                    self.broken = true;
                    let _ = socket.shutdown(Shutdown::Both);
                }
            }
        }
        let done = if self.broken {
            self.bytes.len()
        } else {
            self.sent
        };
        while self.costs.front().is_some_and(|&(end, _)| end <= done) {
            if let Some((_, cost)) = self.costs.pop_front() {
                conn.budget.release(cost);
            }
        }
        if done == self.bytes.len() {
            if self.bytes.capacity() > MAX_REPLY_BATCH {
                // Do not keep a large read's buffer around for small replies.
                self.bytes = Vec::new();
            } else {
                self.bytes.clear();
            }
            self.sent = 0;
            self.costs.clear();
        }
        !self.pending()
    }
}

/// Runs the reply thread until the reader has stopped and every request is answered.
/// Returns the socket.
pub(crate) fn run(
    conn: &Arc<Connection>,
    pool: &Pool,
    incoming: Receiver<Msg>,
    mut ring: Option<Ring>,
    socket: Stream,
) -> Stream {
    let dev = conn.device();
    let mut flight: Vec<Option<InFlight<'_>>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut out = Outbox::default();
    let mut stopping = false;
    loop {
        // Completions.
        let mut progress = false;
        if let Some(r) = ring.as_mut() {
            let _ = r.submit();
            for (user_data, res) in r.reap().unwrap_or_default() {
                progress = true;
                if user_data == SOCKET_WRITABLE {
                    out.poll_armed = false;
                    continue;
                }
                let Some(f) = flight.get_mut(user_data as usize).and_then(Option::take) else {
                    continue;
                };
                free.push(user_data as usize);
                let (head, with_data) = complete(conn, f.req, f.write, res);
                let data: &[u8] = if with_data { f.buf.as_ref() } else { &[] };
                out.push(conn, &[&head, data], f.cost);
            }
        }
        // New requests and replies, after the completions: a wake-up the ring has just
        // delivered is for a message already sent. Without a ring, wait for them here.
        loop {
            let msg = if ring.is_none() && !progress && !out.pending() && !stopping {
                match incoming.recv() {
                    Ok(m) => m,
                    Err(_) => {
                        stopping = true;
                        break;
                    }
                }
            } else {
                match incoming.try_recv() {
                    Ok(m) => m,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                }
            };
            progress = true;
            match msg {
                Msg::Stop => stopping = true,
                Msg::Reply(bytes, cost) => out.push(conn, &[&bytes], cost),
                Msg::Io(req, buf, cost) => {
                    let started = match ring.as_mut() {
                        Some(r) => start(conn, dev, r, &mut flight, &mut free, req, buf, cost),
                        None => Err((req, buf, cost)),
                    };
                    if let Err((req, buf, cost)) = started {
                        conn.run_on(pool, req, buf, cost);
                    }
                }
            }
            if out.bytes.len() >= MAX_REPLY_BATCH {
                break;
            }
        }
        // Replies.
        if out.pending() && !out.poll_armed {
            let all_sent = out.send(conn, &socket, ring.is_none());
            if !all_sent {
                if let Some(r) = ring.as_mut() {
                    // The socket outlives the ring's use of it: the ring is drained
                    // before this function returns the socket.
                    if r.poll_writable(socket.as_raw_fd(), SOCKET_WRITABLE).is_ok() {
                        out.poll_armed = true;
                    } else {
                        out.send(conn, &socket, true);
                    }
                }
            }
        }
        let busy = flight.iter().any(Option::is_some) || out.pending();
        if stopping && !busy {
            break;
        }
        if !progress {
            if let Some(r) = ring.as_mut() {
                if r.wait().is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }
    if let Some(mut r) = ring {
        r.drain();
    }
    socket
}

/// Starts a read or write through the ring when the device can take it there; hands it
/// back otherwise.
#[allow(clippy::too_many_arguments)]
fn start<'a>(
    conn: &Connection,
    dev: &'a dyn BlockDevice,
    ring: &mut Ring,
    flight: &mut Vec<Option<InFlight<'a>>>,
    free: &mut Vec<usize>,
    req: Request,
    mut buf: Buf,
    cost: u64,
) -> Result<(), (Request, Buf, u64)> {
    let len = u64::from(req.length);
    let valid = len > 0
        && req.length <= MAX_PAYLOAD
        && req.offset.checked_add(len).is_some_and(|e| e <= dev.size())
        && req.flags & !allowed_flags(req.kind, conn.session.structured) == 0;
    let usable = |x: &DirectExtent| x.offset % x.align == 0 && len % x.align == 0;
    let (extent, write) = match req.kind {
        cmd::READ if valid => match dev.direct_extent(req.offset, len, false) {
            Some(x) if usable(&x) => (x, None),
            _ => return Err((req, buf, cost)),
        },
        // FUA needs a flush after the write: the pool does that.
        cmd::WRITE if valid && !conn.export.read_only && req.flags & cflag::FUA == 0 => {
            match dev.begin_write(req.offset, len) {
                Some(w) if usable(&w.extent) => (w.extent, Some(w)),
                _ => return Err((req, buf, cost)),
            }
        }
        _ => return Err((req, buf, cost)),
    };
    if write.is_none() {
        buf = Buf::new(req.length as usize);
    }
    let slot = free.pop().unwrap_or_else(|| {
        flight.push(None);
        flight.len() - 1
    });
    let ptr = buf.as_mut_ptr();
    let is_write = write.is_some();
    flight[slot] = Some(InFlight {
        req,
        buf,
        cost,
        write,
    });
    // SAFETY: the buffer lives in `flight` (its heap block never moves) until this
    // request is reaped, and `run` drains the ring before it returns.
    let pushed = unsafe {
        if is_write {
            ring.write(extent.fd, ptr, req.length, extent.offset, slot as u64)
        } else {
            ring.read(extent.fd, ptr, req.length, extent.offset, slot as u64)
        }
    };
    if pushed.is_err() {
        free.push(slot);
        let f = flight[slot].take().expect("just stored");
        // An unused write gives back what it held.
        drop(f.write);
        return Err((f.req, f.buf, f.cost));
    }
    Ok(())
}

/// The reply to a request the ring ran, `res` being its completion's result: the reply
/// itself, or for a read that succeeded its header, with `true` (the data read follows).
fn complete(
    conn: &Connection,
    req: Request,
    write: Option<PendingWrite<'_>>,
    res: i32,
) -> (Vec<u8>, bool) {
    let done = res >= 0 && res as u32 == req.length;
    let failure = if res < 0 {
        io_errno(&std::io::Error::from_raw_os_error(-res))
    } else {
        errno::EIO
    };
    if let Some(w) = write {
        let reply = match w.finish(done) {
            Ok(()) if done => proto::simple_reply(req.cookie, 0).to_vec(),
            Ok(()) => conn.error_reply(&req, failure, "write failed"),
            Err(e) => conn.error_reply(&req, nbd_error(&e, true), &e.to_string()),
        };
        return (reply, false);
    }
    if !done {
        return (conn.error_reply(&req, failure, "read failed"), false);
    }
    let mut head = Vec::with_capacity(32);
    if conn.session.structured {
        proto::last_data_chunk_header(&mut head, req.cookie, req.offset, req.length);
    } else {
        head.extend_from_slice(&proto::simple_reply(req.cookie, 0));
    }
    (head, true)
}
