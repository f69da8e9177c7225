//! Executing requests through the device's own path, on the worker pool every
//! connection shares: what each command accepts, does and answers.

use crate::connection::Connection;
use crate::errors::nbd_error;
use crate::export::{DiscardMode, MAX_PAYLOAD};
use crate::proto::{self, cflag, chunk, cmd, errno, ReplyTo, Request};
use crate::session::{MetaContext, Session};
use qed::describe;
use qed::AlignedBuf as Buf;
use qed::WorkerPool;
use std::sync::Arc;

/// Most extents sent in one block status chunk.
pub(crate) const MAX_EXTENTS: usize = 1 << 16;
/// Largest extent length that fits a descriptor, kept sector aligned.
const MAX_EXTENT_LEN: u64 = (u32::MAX as u64) & !511;

/// Why a request failed: its NBD error value and a message for the client.
type Failure = (u32, String);

/// Flags each command accepts in `session`.
pub(crate) fn allowed_flags(kind: u16, session: &Session) -> u16 {
    let df = if session.structured { cflag::DF } else { 0 };
    // With extended headers a write says its length is a payload's, as it must; no
    // other command takes a payload here.
    let payload = if session.extended {
        cflag::PAYLOAD_LEN
    } else {
        0
    };
    cflag::FUA
        | match kind {
            cmd::READ => df,
            cmd::WRITE => payload,
            cmd::WRITE_ZEROES => cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            _ => 0,
        }
}

/// Runs a request on the shared pool and hands its reply to the reply thread.
pub(crate) fn run_on_pool(
    conn: &Arc<Connection>,
    pool: &WorkerPool,
    req: Request,
    payload: Buf,
    cost: u64,
) {
    let c = conn.clone();
    pool.execute(move || {
        // A bug in the library must cost this request, not the worker: a worker
        // lost with its request unanswered would leave the connection waiting.
        let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handle(&c, &req, payload.as_ref())
        }))
        .unwrap_or_else(|_| c.error_reply(&req, errno::EIO, "internal error"));
        drop(payload);
        c.send(reply, cost);
    });
}

/// The reply to a request, whether it succeeded or not.
fn handle(conn: &Connection, req: &Request, payload: &[u8]) -> Vec<u8> {
    match execute(conn, req, payload) {
        Ok(reply) => reply,
        Err((error, msg)) => conn.error_reply(req, error, &msg),
    }
}

/// Checks a request against the session and the export, then runs its command.
fn execute(conn: &Connection, req: &Request, payload: &[u8]) -> Result<Vec<u8>, Failure> {
    if req.flags & !allowed_flags(req.kind, &conn.session) != 0 {
        return Err((
            errno::EINVAL,
            format!("flags {:#x} not valid here", req.flags),
        ));
    }
    let command = Command::new(conn, req);
    if command.writing && conn.export.read_only {
        return Err((errno::EPERM, "the export is read-only".into()));
    }
    match req.kind {
        cmd::READ => command.read(),
        cmd::WRITE => command.write(payload),
        cmd::FLUSH => command.flush(),
        cmd::TRIM => command.trim(),
        cmd::WRITE_ZEROES => command.write_zeroes(),
        cmd::CACHE => command.cache(),
        cmd::BLOCK_STATUS => command.block_status(),
        _ => Err((errno::EINVAL, format!("unknown command {}", req.kind))),
    }
}

/// One request being executed, with what every command checks about it.
struct Command<'a> {
    conn: &'a Connection,
    req: &'a Request,
    len: u64,
    /// The range lies within the export.
    in_bounds: bool,
    /// The command changes the export.
    writing: bool,
}

impl<'a> Command<'a> {
    fn new(conn: &'a Connection, req: &'a Request) -> Self {
        let size = conn.device().size();
        let len = req.length;
        Self {
            conn,
            req,
            len,
            in_bounds: req.offset.checked_add(len).is_some_and(|e| e <= size),
            writing: matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM),
        }
    }

    fn device(&self) -> &'a dyn qed::BlockDevice {
        self.conn.device()
    }

    /// Maps a device error the way this command's kind asks for.
    fn io<T>(&self, r: qed::Result<T>) -> Result<T, Failure> {
        r.map_err(|e| (nbd_error(&e, self.writing), e.to_string()))
    }

    /// Flushes when the client asked for the data to be durable before the reply.
    fn fua(&self) -> Result<(), Failure> {
        if self.req.flags & cflag::FUA != 0 {
            self.io(self.device().flush())?;
        }
        Ok(())
    }

    fn ok_reply(&self) -> Vec<u8> {
        self.conn.ok_reply(self.req)
    }

    fn read(&self) -> Result<Vec<u8>, Failure> {
        let req = self.req;
        if !self.in_bounds {
            return Err((errno::EINVAL, "read past the end of the export".into()));
        }
        if req.length > u64::from(MAX_PAYLOAD) {
            // EOVERFLOW is only for DF reads a server cannot send in one chunk.
            return Err((errno::EINVAL, "read larger than 32 MiB".into()));
        }
        if self.conn.session.structured {
            read_structured(self.device(), req, &self.conn.reply_to(req))
        } else {
            let mut out = proto::simple_reply(req.cookie, 0).to_vec();
            out.resize(16 + req.length as usize, 0);
            self.io(self.device().read_at(&mut out[16..], req.offset))?;
            Ok(out)
        }
    }

    fn write(&self, payload: &[u8]) -> Result<Vec<u8>, Failure> {
        if !self.in_bounds {
            return Err((errno::ENOSPC, "write past the end of the export".into()));
        }
        self.io(self.device().write_at(payload, self.req.offset))?;
        self.fua()?;
        Ok(self.ok_reply())
    }

    fn flush(&self) -> Result<Vec<u8>, Failure> {
        self.io(self.device().flush())?;
        Ok(self.ok_reply())
    }

    fn trim(&self) -> Result<Vec<u8>, Failure> {
        if !self.in_bounds {
            return Err((errno::EINVAL, "trim past the end of the export".into()));
        }
        if self.conn.export.discard == DiscardMode::Unmap {
            self.io(self.device().discard(self.req.offset, self.len))?;
            self.fua()?;
        }
        Ok(self.ok_reply())
    }

    fn write_zeroes(&self) -> Result<Vec<u8>, Failure> {
        let (req, len) = (self.req, self.len);
        if !self.in_bounds {
            return Err((errno::ENOSPC, "write past the end of the export".into()));
        }
        let fast = req.flags & cflag::FAST_ZERO != 0;
        if req.flags & cflag::NO_HOLE != 0 {
            if fast {
                return Err((errno::ENOTSUP, "zeroes without holes are not fast".into()));
            }
            self.io(write_real_zeroes(self.device(), req.offset, len))?;
        } else {
            if fast && !io_err(self.device().zeroes_are_fast(req.offset, len))? {
                return Err((
                    errno::ENOTSUP,
                    "zeroing this range means writing data".into(),
                ));
            }
            self.io(self.device().write_zeroes(req.offset, len))?;
        }
        self.fua()?;
        Ok(self.ok_reply())
    }

    fn cache(&self) -> Result<Vec<u8>, Failure> {
        if !self.in_bounds {
            return Err((errno::EINVAL, "cache past the end of the export".into()));
        }
        let end = self.req.offset + self.len;
        // Looking the range up brings its metadata into the cache. A hint: at most
        // MAX_LOOKUPS of it, so that one request (64-bit with extended headers) cannot
        // hold a worker for the whole of a huge image.
        let mut pos = self.req.offset;
        let mut lookups = 0;
        while pos < end && lookups < MAX_LOOKUPS {
            pos += io_status(self.device().block_status(pos, end - pos))?;
            lookups += 1;
        }
        Ok(self.ok_reply())
    }

    fn block_status(&self) -> Result<Vec<u8>, Failure> {
        let session = &self.conn.session;
        if !session.structured || session.contexts.is_empty() {
            return Err((errno::EINVAL, "no metadata context was selected".into()));
        }
        if self.len == 0 || !self.in_bounds {
            return Err((
                errno::EINVAL,
                "block status range is empty or past the end".into(),
            ));
        }
        block_status(
            self.device(),
            self.req,
            &session.contexts,
            &self.conn.reply_to(self.req),
        )
    }
}

/// Writes zeroes as data, for clients that want no holes.
fn write_real_zeroes(dev: &dyn qed::BlockDevice, offset: u64, len: u64) -> qed::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        dev.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A structured read (its length within MAX_PAYLOAD): zero runs as holes, data as
/// data, in order.
fn read_structured(
    dev: &dyn qed::BlockDevice,
    req: &Request,
    to: &ReplyTo,
) -> Result<Vec<u8>, Failure> {
    let end = req.offset + req.length;
    let mut out = Vec::with_capacity(32 + req.length as usize);
    if req.length == 0 {
        // No data chunk can be empty: a read of nothing is answered with a none chunk.
        proto::chunk_header(&mut out, to, chunk::FLAG_DONE, chunk::NONE, 0);
        return Ok(out);
    }
    if req.flags & cflag::DF != 0 {
        proto::last_data_chunk_header(&mut out, to, req.offset, req.length);
        let at = out.len();
        out.resize(at + req.length as usize, 0);
        io_err(dev.read_at(&mut out[at..], req.offset))?;
        return Ok(out);
    }
    let mut pos = req.offset;
    let mut last_header = 0;
    while pos < end {
        let (zero, run) = same_kind_run(dev, pos, end)?;
        last_header = out.len();
        if zero {
            proto::chunk_header(&mut out, to, 0, chunk::OFFSET_HOLE, 12);
            out.extend_from_slice(&pos.to_be_bytes());
            out.extend_from_slice(&(run as u32).to_be_bytes());
        } else {
            proto::chunk_header(&mut out, to, 0, chunk::OFFSET_DATA, 8 + run);
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

/// Whether the range from `pos` starts with zeroes, and how far that lasts before `end`.
/// Runs of the same kind are merged so that a fragmented image does not mean tiny
/// chunks.
fn same_kind_run(dev: &dyn qed::BlockDevice, pos: u64, end: u64) -> Result<(bool, u64), Failure> {
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
    Ok((zero, run))
}

/// A run of the export alike in every context: its length, `base:allocation` flags and
/// allocation depth.
type Run = (u64, u32, u32);

/// A block status reply: one chunk per selected context, with 64-bit descriptors
/// (BLOCK_STATUS_EXT) under extended headers.
fn block_status(
    dev: &dyn qed::BlockDevice,
    req: &Request,
    contexts: &[MetaContext],
    to: &ReplyTo,
) -> Result<Vec<u8>, Failure> {
    let one = req.flags & cflag::REQ_ONE != 0;
    let runs = allocation_runs(dev, req, one)?;
    let max_len = if to.extended {
        u64::MAX
    } else {
        MAX_EXTENT_LEN
    };
    let mut out = Vec::new();
    for (i, ctx) in contexts.iter().enumerate() {
        let mut descriptors = descriptors(*ctx, &runs, max_len);
        if one {
            descriptors.truncate(1);
        }
        let flags = if i + 1 == contexts.len() {
            chunk::FLAG_DONE
        } else {
            0
        };
        let n = descriptors.len() as u64;
        if to.extended {
            proto::chunk_header(&mut out, to, flags, chunk::BLOCK_STATUS_EXT, 8 + 16 * n);
            out.extend_from_slice(&ctx.id().to_be_bytes());
            out.extend_from_slice(&(n as u32).to_be_bytes());
            for (len, value) in descriptors {
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&u64::from(value).to_be_bytes());
            }
        } else {
            proto::chunk_header(&mut out, to, flags, chunk::BLOCK_STATUS, 4 + 8 * n);
            out.extend_from_slice(&ctx.id().to_be_bytes());
            for (len, value) in descriptors {
                // Cut to MAX_EXTENT_LEN above.
                out.extend_from_slice(&(len as u32).to_be_bytes());
                out.extend_from_slice(&value.to_be_bytes());
            }
        }
    }
    Ok(out)
}

/// Lookups one block status or cache request makes at most: with 64 KiB clusters a lookup
/// covers up to 32 MiB of unallocated space, so this answers for 32 GiB at a time, while
/// a 64-bit request over a 64 TiB image would otherwise take two million lookups.
const MAX_LOOKUPS: usize = 1024;

/// The runs of the requested range (at most [`MAX_EXTENTS`]; only the first with
/// `one`), neighbours alike in every context merged.
fn allocation_runs(
    dev: &dyn qed::BlockDevice,
    req: &Request,
    one: bool,
) -> Result<Vec<Run>, Failure> {
    let end = req.offset + req.length;
    let mut runs: Vec<Run> = Vec::new();
    let mut pos = req.offset;
    // Runs alike merge, so the count of runs does not bound the walk: the lookups do.
    // A shorter answer than asked is allowed, and the client asks again from its end.
    let mut lookups = 0;
    while pos < end && runs.len() < MAX_EXTENTS && lookups < MAX_LOOKUPS {
        lookups += 1;
        let e = io_err(describe(dev, pos, end - pos, 0))?;
        let flags =
            if e.data { 0 } else { proto::STATE_HOLE } | if e.zero { proto::STATE_ZERO } else { 0 };
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
    Ok(runs)
}

/// The (length, value) descriptors of one context: runs with the same value in it are
/// merged, and runs longer than `max_len` (what a descriptor holds) are cut.
fn descriptors(ctx: MetaContext, runs: &[Run], max_len: u64) -> Vec<(u64, u32)> {
    let mut descriptors: Vec<(u64, u32)> = Vec::new();
    for &(len, flags, depth) in runs {
        let value = match ctx {
            MetaContext::Allocation => flags,
            MetaContext::AllocationDepth => depth,
        };
        let mut left = len;
        while left > 0 {
            let n = left.min(max_len);
            match descriptors.last_mut() {
                Some(d) if d.1 == value && d.0 <= max_len - n => d.0 += n,
                _ => descriptors.push((n, value)),
            }
            left -= n;
        }
    }
    descriptors
}

/// Maps a device error of a request that does not write.
fn io_err<T>(r: qed::Result<T>) -> Result<T, Failure> {
    r.map_err(|e| (nbd_error(&e, false), e.to_string()))
}

fn io_status(r: qed::Result<qed::BlockStatus>) -> Result<u64, Failure> {
    io_err(r).map(|s| s.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_cut_only_where_they_have_32_bits() {
        let g = 1u64 << 30;
        let runs: Vec<Run> = vec![(g, 0, 1), (6 * g, 3, 0), (g, 0, 1)];
        let wide = descriptors(MetaContext::Allocation, &runs, u64::MAX);
        assert_eq!(wide, vec![(g, 0), (6 * g, 3), (g, 0)]);
        let compact = descriptors(MetaContext::Allocation, &runs, MAX_EXTENT_LEN);
        assert!(compact
            .iter()
            .all(|d| d.0 <= MAX_EXTENT_LEN && d.0 % 512 == 0));
        assert_eq!(compact.iter().map(|d| d.0).sum::<u64>(), 8 * g);
        assert_eq!(compact.len(), 4, "{compact:?}");
        // Runs alike in one context merge there.
        let depth = descriptors(MetaContext::AllocationDepth, &runs, u64::MAX);
        assert_eq!(depth, vec![(g, 1), (6 * g, 0), (g, 1)]);
    }
}
