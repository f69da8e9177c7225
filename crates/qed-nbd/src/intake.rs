//! Requests read by the reply thread itself, without blocking. On a connection with a
//! ring one thread reads the requests, starts them and sends their replies, as
//! qemu-nbd's event loop does: a request reaches the disk without a hand-over to another
//! thread, which would have to be woken, and a TLS session has one user.
//!
//! Bytes are read as the socket has them and cut into requests, a write's payload
//! included; a request is taken only once the connection's budget admits it, so reading
//! pauses, as the reading thread's does, while too much is in flight.

use crate::connection::Connection;
use crate::export::MAX_PAYLOAD;
use crate::proto::{cmd, Request};
use crate::reader::{cost, refuse_oversized_write};
use crate::transport::Transport;
use qed::AlignedBuf as Buf;
use std::io::ErrorKind;

/// Bytes read from the socket at a time.
const READ_SIZE: usize = 64 << 10;

/// The reading side of a connection, driven by its reply thread.
pub(crate) struct Intake {
    stream: Transport,
    buf: Box<[u8]>,
    /// The bytes of `buf` read and not yet taken.
    start: usize,
    end: usize,
    /// A write whose payload is still coming: the request, its payload, the bytes of it
    /// filled, its cost (held from the budget).
    payload: Option<(Request, Buf, usize, u64)>,
    /// A request read and not yet admitted: the budget is full.
    held: Option<(Request, u64)>,
    /// The client disconnected, sent NBD_CMD_DISC or broke the protocol: nothing more
    /// is read.
    pub(crate) done: bool,
    /// A wait for the socket to be readable is in the ring.
    pub(crate) armed: bool,
}

/// What the next look at the socket gave.
pub(crate) enum Next {
    /// A request with its payload and budget.
    Request(Request, Buf, u64),
    /// Nothing until the socket has more, or the budget has room, or ever again
    /// (`Intake::done`).
    Wait,
}

impl Intake {
    /// Reads from `stream`, the reading handle of the connection.
    pub(crate) fn new(stream: Transport) -> Intake {
        Intake {
            stream,
            buf: vec![0; READ_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            payload: None,
            held: None,
            done: false,
            armed: false,
        }
    }

    /// The socket, to wait on.
    pub(crate) fn socket(&self) -> &Transport {
        &self.stream
    }

    /// The next request the socket has whole and the budget admits.
    pub(crate) fn next(&mut self, conn: &Connection) -> Next {
        loop {
            if self.done {
                return Next::Wait;
            }
            if let Some((req, payload, filled, cost)) = self.payload.take() {
                return self.fill(conn, req, payload, filled, cost);
            }
            if let Some((req, cost)) = self.held.take() {
                if !conn.budget.try_acquire(cost) {
                    self.held = Some((req, cost));
                    return Next::Wait;
                }
                let payload_len = req.payload_len(conn.session.extended);
                if req.kind == cmd::WRITE || payload_len > 0 {
                    // Aligned, so that it can go to an O_DIRECT file as it is. Its length
                    // was checked against MAX_PAYLOAD when the header came in.
                    let payload = Buf::new(payload_len as usize);
                    self.payload = Some((req, payload, 0, cost));
                    continue;
                }
                return Next::Request(req, Buf::new(0), cost);
            }
            let extended = conn.session.extended;
            let header_len = Request::header_len(extended);
            if self.end - self.start >= header_len {
                let head = &self.buf[self.start..self.start + header_len];
                let req = Request::parse(head, extended);
                self.start += header_len;
                self.admit(conn, req);
                continue;
            }
            match self.read_more() {
                Ok(true) => {}
                Ok(false) => self.done = true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Wait,
                Err(_) => self.done = true,
            }
        }
    }

    /// Holds a request header just read until the budget admits it; a wrong magic or a
    /// disconnect ends the reading, and an oversized write is refused, which ends it too.
    fn admit(&mut self, conn: &Connection, req: Option<Request>) {
        let Some(req) = req else {
            self.done = true;
            return;
        };
        if req.kind == cmd::DISC {
            self.done = true;
            return;
        }
        let payload_len = req.payload_len(conn.session.extended);
        if payload_len > u64::from(MAX_PAYLOAD) {
            // The payload cannot be skipped without reading it: the client goes.
            refuse_oversized_write(conn, &req);
            self.done = true;
            return;
        }
        self.held = Some((req, cost(conn, &req, payload_len)));
    }

    /// Fills a write's payload from what was read, then from the socket.
    fn fill(
        &mut self,
        conn: &Connection,
        req: Request,
        mut payload: Buf,
        mut filled: usize,
        cost: u64,
    ) -> Next {
        let n = (self.end - self.start).min(payload.len() - filled);
        payload[filled..filled + n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        filled += n;
        while filled < payload.len() {
            match self.stream.try_read(&mut payload[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.payload = Some((req, payload, filled, cost));
                    return Next::Wait;
                }
                Err(_) => break,
            }
        }
        if filled < payload.len() {
            // The client went in the middle of a write: nothing to answer.
            conn.budget.release(cost);
            self.done = true;
            return Next::Wait;
        }
        Next::Request(req, payload, cost)
    }

    /// Reads what the socket has after the bytes kept; false once the client has gone.
    fn read_more(&mut self) -> std::io::Result<bool> {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        loop {
            match self.stream.try_read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the intake waits for the socket (rather than for the budget, or for
    /// nothing).
    pub(crate) fn starved(&self) -> bool {
        !self.done && self.held.is_none()
    }
}
