//! The transmission phase: requests read in order, served in parallel, replied to as
//! they finish.

use crate::export::{DiscardMode, Export, MAX_PAYLOAD};
use crate::handshake::{MetaContext, Session};
use crate::pool::Pool;
use crate::proto::{self, cflag, chunk, cmd, errno, Request};
use crate::stream::Stream;
use qed::describe;
use qed::{AlignedBuf as Buf, Ring, Waker};
use std::io::Read;
use std::net::Shutdown;
use std::sync::mpsc::{self, channel, Sender};
use std::sync::{Arc, Condvar, Mutex};

/// Payload bytes a connection may have in flight before it stops reading requests.
const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// Requests a connection may have in flight.
const MAX_IN_FLIGHT: u64 = 256;
/// Most extents sent in one block status chunk.
const MAX_EXTENTS: usize = 1 << 16;
/// Largest extent length that fits a descriptor, kept sector aligned.
const MAX_EXTENT_LEN: u64 = (u32::MAX as u64) & !511;

/// Counts what a connection has in flight, so reading pauses instead of buffering
/// without bound.
#[derive(Default)]
pub(crate) struct Budget {
    state: Mutex<(u64, u64)>,
    changed: Condvar,
}

impl Budget {
    pub(crate) fn acquire(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // An empty connection always admits one request, however large.
        while st.1 > 0 && (st.0 + bytes > MAX_IN_FLIGHT_BYTES || st.1 >= MAX_IN_FLIGHT) {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 += bytes;
        st.1 += 1;
    }

    pub(crate) fn release(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 -= bytes;
        st.1 -= 1;
        self.changed.notify_all();
    }

    fn wait_idle(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.1 > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What a connection's reply thread receives.
pub(crate) enum Msg {
    /// A read or write it may run through io_uring, with its payload and budget.
    Io(Request, Buf, u64),
    /// A finished reply and the budget it holds until it is sent.
    Reply(Vec<u8>, u64),
    /// The reader is done and every request has been answered.
    Stop,
}

/// A connection in transmission.
pub(crate) struct Connection {
    pub(crate) export: Arc<Export>,
    pub(crate) session: Session,
    replies: Sender<Msg>,
    /// Wakes the reply thread when it sleeps on its ring; `None` without one.
    waker: Option<Waker>,
    pub(crate) budget: Arc<Budget>,
}

/// Maps a library error to an NBD error value.
pub(crate) fn nbd_error(e: &qed::Error, writing: bool) -> u32 {
    match e {
        qed::Error::ReadOnly => errno::EPERM,
        qed::Error::OutOfRange { .. } if writing => errno::ENOSPC,
        qed::Error::OutOfRange { .. } | qed::Error::InvalidArgument(_) => errno::EINVAL,
        qed::Error::Io { cause, .. } => io_errno(cause),
        _ => errno::EIO,
    }
}

/// Maps an I/O error to an NBD error value. The protocol asks for EDQUOT and EFBIG to be
/// reported as ENOSPC too.
pub(crate) fn io_errno(cause: &std::io::Error) -> u32 {
    match cause.kind() {
        std::io::ErrorKind::StorageFull
        | std::io::ErrorKind::QuotaExceeded
        | std::io::ErrorKind::FileTooLarge => errno::ENOSPC,
        _ => errno::EIO,
    }
}

/// Flags each command accepts.
pub(crate) fn allowed_flags(kind: u16, structured: bool) -> u16 {
    let df = if structured { cflag::DF } else { 0 };
    cflag::FUA
        | match kind {
            cmd::READ => df,
            cmd::WRITE_ZEROES => cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            _ => 0,
        }
}

/// Serves requests until the client disconnects, breaks the protocol or the reading
/// side is shut down; waits for the requests in flight before returning.
pub fn serve(stream: Stream, export: Arc<Export>, session: Session, pool: &Pool) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_nodelay();
    let ring = Ring::new(MAX_IN_FLIGHT as u32);
    let (replies, incoming) = channel::<Msg>();
    let conn = Arc::new(Connection {
        export,
        session,
        replies,
        waker: ring.as_ref().map(Ring::waker),
        budget: Arc::new(Budget::default()),
    });
    std::thread::scope(|s| {
        // Replies leave from a thread of this connection's own: a client that stops
        // reading them blocks only its connection, never the workers every connection
        // shares.
        let replier = std::thread::Builder::new()
            .name("nbd-replies".into())
            .spawn_scoped(s, || {
                crate::replies::run(&conn, pool, incoming, ring, writer)
            });
        let Ok(replier) = replier else {
            return;
        };
        read_requests(&conn, pool, stream);
        conn.budget.wait_idle();
        conn.send_msg(Msg::Stop);
        if let Ok(w) = replier.join() {
            let _ = w.shutdown(Shutdown::Both);
        }
    });
}

/// Reads requests and hands them on, until the client disconnects or breaks the
/// protocol.
fn read_requests(conn: &Arc<Connection>, pool: &Pool, stream: Stream) {
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
    // A wrong magic or a read error ends the session.
    while let Ok(Some(req)) = Request::read(&mut reader) {
        if req.kind == cmd::DISC {
            break;
        }
        let payload_len = if req.kind == cmd::WRITE {
            if req.length > MAX_PAYLOAD {
                // The payload cannot be refused without reading it: say why, then drop
                // the client.
                conn.budget.acquire(0);
                conn.send(proto::simple_reply(req.cookie, errno::EINVAL).to_vec(), 0);
                break;
            }
            u64::from(req.length)
        } else {
            0
        };
        let cost = match req.kind {
            cmd::READ => u64::from(req.length.min(MAX_PAYLOAD)),
            // A block status reply can list up to MAX_EXTENTS runs per context.
            cmd::BLOCK_STATUS if req.flags & cflag::REQ_ONE == 0 => {
                conn.session.contexts.len() as u64 * (16 + 8 * MAX_EXTENTS as u64)
            }
            _ => payload_len,
        };
        conn.budget.acquire(cost);
        // Aligned, so that it can go to an O_DIRECT file as it is.
        let mut payload = Buf::new(payload_len as usize);
        if payload_len > 0 && reader.read_exact(payload.as_mut()).is_err() {
            conn.budget.release(cost);
            break;
        }
        if conn.waker.is_some() && matches!(req.kind, cmd::READ | cmd::WRITE) {
            conn.send_msg(Msg::Io(req, payload, cost));
        } else {
            conn.run_on(pool, req, payload, cost);
        }
    }
}

impl Connection {
    pub(crate) fn send(&self, reply: Vec<u8>, cost: u64) {
        self.send_msg(Msg::Reply(reply, cost));
    }

    fn send_msg(&self, msg: Msg) {
        match self.replies.send(msg) {
            Ok(()) => {
                if let Some(w) = &self.waker {
                    w.wake();
                }
            }
            Err(mpsc::SendError(Msg::Reply(_, cost) | Msg::Io(_, _, cost))) => {
                self.budget.release(cost)
            }
            Err(_) => {}
        }
    }

    /// Runs a request on the shared pool, through the device's own path.
    pub(crate) fn run_on(self: &Arc<Self>, pool: &Pool, req: Request, payload: Buf, cost: u64) {
        let c = self.clone();
        pool.execute(move || {
            // A bug in the library must cost this request, not the worker: a worker
            // lost with its request unanswered would leave the connection waiting.
            let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.handle(&req, payload.as_ref())
            }))
            .unwrap_or_else(|_| c.error_reply(&req, errno::EIO, "internal error"));
            drop(payload);
            c.send(reply, cost);
        });
    }

    pub(crate) fn device(&self) -> &dyn qed::BlockDevice {
        &*self.export.device
    }

    /// The reply to a request that failed.
    pub(crate) fn error_reply(&self, req: &Request, error: u32, msg: &str) -> Vec<u8> {
        let structured_only = matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS);
        if self.session.structured && structured_only {
            let mut out = Vec::new();
            proto::error_chunk(&mut out, req.cookie, error, msg);
            out
        } else {
            proto::simple_reply(req.cookie, error).to_vec()
        }
    }

    fn ok_reply(&self, req: &Request) -> Vec<u8> {
        proto::simple_reply(req.cookie, 0).to_vec()
    }

    fn handle(&self, req: &Request, payload: &[u8]) -> Vec<u8> {
        match self.execute(req, payload) {
            Ok(reply) => reply,
            Err((error, msg)) => self.error_reply(req, error, &msg),
        }
    }

    fn execute(&self, req: &Request, payload: &[u8]) -> Result<Vec<u8>, (u32, String)> {
        let structured = self.session.structured;
        if req.flags & !allowed_flags(req.kind, structured) != 0 {
            return Err((
                errno::EINVAL,
                format!("flags {:#x} not valid here", req.flags),
            ));
        }
        let size = self.device().size();
        let len = u64::from(req.length);
        let in_bounds = req.offset.checked_add(len).is_some_and(|e| e <= size);
        let writing = matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
        if writing && self.export.read_only {
            return Err((errno::EPERM, "the export is read-only".into()));
        }
        let io = |r: qed::Result<()>| r.map_err(|e| (nbd_error(&e, writing), e.to_string()));
        let fua = |this: &Self| -> Result<(), (u32, String)> {
            if req.flags & cflag::FUA != 0 {
                io(this.device().flush())?;
            }
            Ok(())
        };
        match req.kind {
            cmd::READ => {
                if !in_bounds {
                    return Err((errno::EINVAL, "read past the end of the export".into()));
                }
                if req.length > MAX_PAYLOAD {
                    // EOVERFLOW is only for DF reads a server cannot send in one chunk.
                    return Err((errno::EINVAL, "read larger than 32 MiB".into()));
                }
                if structured {
                    self.read_structured(req)
                } else {
                    let mut out = proto::simple_reply(req.cookie, 0).to_vec();
                    out.resize(16 + req.length as usize, 0);
                    io(self.device().read_at(&mut out[16..], req.offset))?;
                    Ok(out)
                }
            }
            cmd::WRITE => {
                if !in_bounds {
                    return Err((errno::ENOSPC, "write past the end of the export".into()));
                }
                io(self.device().write_at(payload, req.offset))?;
                fua(self)?;
                Ok(self.ok_reply(req))
            }
            cmd::FLUSH => {
                io(self.device().flush())?;
                Ok(self.ok_reply(req))
            }
            cmd::TRIM => {
                if !in_bounds {
                    return Err((errno::EINVAL, "trim past the end of the export".into()));
                }
                if self.export.discard == DiscardMode::Unmap {
                    io(self.device().discard(req.offset, len))?;
                    fua(self)?;
                }
                Ok(self.ok_reply(req))
            }
            cmd::WRITE_ZEROES => {
                if !in_bounds {
                    return Err((errno::ENOSPC, "write past the end of the export".into()));
                }
                let fast = req.flags & cflag::FAST_ZERO != 0;
                if req.flags & cflag::NO_HOLE != 0 {
                    if fast {
                        return Err((errno::ENOTSUP, "zeroes without holes are not fast".into()));
                    }
                    self.write_real_zeroes(req.offset, len)
                        .map_err(|e| (nbd_error(&e, true), e.to_string()))?;
                } else {
                    if fast && !io_err(self.device().zeroes_are_fast(req.offset, len))? {
                        return Err((
                            errno::ENOTSUP,
                            "zeroing this range means writing data".into(),
                        ));
                    }
                    io(self.device().write_zeroes(req.offset, len))?;
                }
                fua(self)?;
                Ok(self.ok_reply(req))
            }
            cmd::CACHE => {
                if !in_bounds {
                    return Err((errno::EINVAL, "cache past the end of the export".into()));
                }
                // Looking the range up brings its metadata into the cache.
                let mut pos = req.offset;
                while pos < req.offset + len {
                    let s = io_status(self.device().block_status(pos, req.offset + len - pos))?;
                    pos += s;
                }
                Ok(self.ok_reply(req))
            }
            cmd::BLOCK_STATUS => {
                if !structured || self.session.contexts.is_empty() {
                    return Err((errno::EINVAL, "no metadata context was selected".into()));
                }
                if len == 0 || !in_bounds {
                    return Err((
                        errno::EINVAL,
                        "block status range is empty or past the end".into(),
                    ));
                }
                self.block_status(req)
            }
            _ => Err((errno::EINVAL, format!("unknown command {}", req.kind))),
        }
    }

    fn write_real_zeroes(&self, offset: u64, len: u64) -> qed::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.device().write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// A structured read: zero runs as holes, data as data, in order.
    fn read_structured(&self, req: &Request) -> Result<Vec<u8>, (u32, String)> {
        let dev = self.device();
        let end = req.offset + u64::from(req.length);
        let mut out = Vec::with_capacity(32 + req.length as usize);
        if req.length == 0 {
            // No data chunk can be empty: a read of nothing is answered with a none chunk.
            proto::chunk_header(&mut out, req.cookie, chunk::FLAG_DONE, chunk::NONE, 0);
            return Ok(out);
        }
        if req.flags & cflag::DF != 0 {
            proto::last_data_chunk_header(&mut out, req.cookie, req.offset, req.length);
            let at = out.len();
            out.resize(at + req.length as usize, 0);
            io_err(dev.read_at(&mut out[at..], req.offset))?;
            return Ok(out);
        }
        let mut pos = req.offset;
        let mut last_header = 0;
        while pos < end {
            // Merge runs of the same kind so a fragmented image does not mean tiny chunks.
            let first = io_err(describe(dev, pos, end - pos, 0))?;
            let zero = first.zero;
            let mut run = first.length;
            while pos + run < end {
                let next = io_err(describe(dev, pos + run, end - pos - run, 0))?;
                if next.zero != zero {
                    break;
                }
                run += next.length;
            }
            last_header = out.len();
            if zero {
                proto::chunk_header(&mut out, req.cookie, 0, chunk::OFFSET_HOLE, 12);
                out.extend_from_slice(&pos.to_be_bytes());
                out.extend_from_slice(&(run as u32).to_be_bytes());
            } else {
                proto::chunk_header(&mut out, req.cookie, 0, chunk::OFFSET_DATA, 8 + run as u32);
                out.extend_from_slice(&pos.to_be_bytes());
                let at = out.len();
                out.resize(at + run as usize, 0);
                io_err(dev.read_at(&mut out[at..], pos))?;
            }
            pos += run;
        }
        // The last chunk carries the DONE flag (flags sit 4 bytes into the header).
        out[last_header + 4..last_header + 6].copy_from_slice(&chunk::FLAG_DONE.to_be_bytes());
        Ok(out)
    }

    fn block_status(&self, req: &Request) -> Result<Vec<u8>, (u32, String)> {
        let dev = self.device();
        let end = req.offset + u64::from(req.length);
        let one = req.flags & cflag::REQ_ONE != 0;
        // (length, base:allocation flags, allocation depth) per run.
        let mut runs: Vec<(u64, u32, u32)> = Vec::new();
        let mut pos = req.offset;
        while pos < end && runs.len() < MAX_EXTENTS {
            let e = io_err(describe(dev, pos, end - pos, 0))?;
            let flags = if e.data { 0 } else { proto::STATE_HOLE }
                | if e.zero { proto::STATE_ZERO } else { 0 };
            let depth = if e.present { e.depth + 1 } else { 0 };
            match runs.last_mut() {
                Some(last) if last.1 == flags && last.2 == depth => last.0 += e.length,
                _ => runs.push((e.length, flags, depth)),
            }
            pos += e.length;
            if one {
                break;
            }
        }
        let mut out = Vec::new();
        let contexts = &self.session.contexts;
        for (i, ctx) in contexts.iter().enumerate() {
            let mut descriptors: Vec<(u32, u32)> = Vec::new();
            for &(len, flags, depth) in &runs {
                let value = match ctx {
                    MetaContext::Allocation => flags,
                    MetaContext::AllocationDepth => depth,
                };
                let mut left = len;
                while left > 0 {
                    let n = left.min(MAX_EXTENT_LEN);
                    match descriptors.last_mut() {
                        Some(d) if d.1 == value && u64::from(d.0) + n <= MAX_EXTENT_LEN => {
                            d.0 += n as u32
                        }
                        _ => descriptors.push((n as u32, value)),
                    }
                    left -= n;
                }
            }
            if one {
                descriptors.truncate(1);
            }
            let flags = if i + 1 == contexts.len() {
                chunk::FLAG_DONE
            } else {
                0
            };
            proto::chunk_header(
                &mut out,
                req.cookie,
                flags,
                chunk::BLOCK_STATUS,
                4 + 8 * descriptors.len() as u32,
            );
            out.extend_from_slice(&ctx.id().to_be_bytes());
            for (len, value) in descriptors {
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&value.to_be_bytes());
            }
        }
        Ok(out)
    }
}

fn io_err<T>(r: qed::Result<T>) -> Result<T, (u32, String)> {
    r.map_err(|e| (nbd_error(&e, false), e.to_string()))
}

fn io_status(r: qed::Result<qed::BlockStatus>) -> Result<u64, (u32, String)> {
    io_err(r).map(|s| s.len)
}
