//! The reading side of a connection: requests are read in order, charged to the
//! connection's budget, and run on the worker pool (a connection without a ring).

use crate::commands::{run_on_pool, MAX_EXTENTS};
use crate::connection::Connection;
use crate::export::MAX_PAYLOAD;
use crate::proto::{cflag, cmd, errno, Request};
use crate::transport::Transport;
use qed::AlignedBuf as Buf;
use qed::WorkerPool;
use std::io::Read;
use std::sync::Arc;

/// Reads requests and hands them on, until the client disconnects or breaks the
/// protocol.
pub(crate) fn read_requests(conn: &Arc<Connection>, pool: &WorkerPool, stream: Transport) {
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
    // A wrong magic or a read error ends the session.
    let extended = conn.session.extended;
    while let Ok(Some(req)) = Request::read(&mut reader, extended) {
        if req.kind == cmd::DISC {
            break;
        }
        let payload_len = req.payload_len(extended);
        if payload_len > u64::from(MAX_PAYLOAD) {
            refuse_oversized_write(conn, &req);
            break;
        }
        let cost = cost(conn, &req, payload_len);
        conn.budget.acquire(cost);
        // Aligned, so that it can go to an O_DIRECT file as it is.
        let mut payload = Buf::new(payload_len as usize);
        if payload_len > 0 && reader.read_exact(payload.as_mut()).is_err() {
            conn.budget.release(cost);
            break;
        }
        // Without a ring every request runs on the pool.
        run_on_pool(conn, pool, req, payload, cost);
    }
}

/// A payload longer than the server takes cannot be refused without reading it: this
/// says why, and the caller then drops the client.
pub(crate) fn refuse_oversized_write(conn: &Connection, req: &Request) {
    conn.budget.take(0);
    conn.send(
        conn.error_reply(req, errno::EINVAL, "payload larger than 32 MiB"),
        0,
    );
}

/// What a request holds of the budget until its reply is sent: its payload, or the most
/// its reply can carry, whichever is more. Any request may carry a payload with extended
/// headers (it is refused later, but held until then), so every payload is counted.
pub(crate) fn cost(conn: &Connection, req: &Request, payload_len: u64) -> u64 {
    let reply = match req.kind {
        cmd::READ => req.length.min(u64::from(MAX_PAYLOAD)),
        // A block status reply can list up to MAX_EXTENTS runs per context.
        cmd::BLOCK_STATUS if req.flags & cflag::REQ_ONE == 0 => {
            let (head, descriptor) = if conn.session.extended {
                (40, 16)
            } else {
                (24, 8)
            };
            conn.session.contexts.len() as u64 * (head + descriptor * MAX_EXTENTS as u64)
        }
        _ => 0,
    };
    reply.max(payload_len)
}
