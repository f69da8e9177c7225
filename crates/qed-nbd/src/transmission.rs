//! The transmission phase: requests read in order, served in parallel, replied to as
//! they finish. A connection with a ring has one thread that reads its requests and
//! sends the replies; without one, a reader thread hands requests to a reply thread.
//! The worker pool runs what the ring cannot.

use crate::connection::{Connection, Msg, MAX_IN_FLIGHT};
use crate::export::Export;
use crate::intake::Intake;
use crate::reader::read_requests;
use crate::replies::{self, Ring};
use crate::session::Session;
use crate::transport::{Channel, Transport};
use qed::WorkerPool;
use std::sync::mpsc;
use std::sync::Arc;

/// Serves requests until the client disconnects, breaks the protocol or the reading
/// side is shut down; waits for the requests in flight before returning.
/// Under TLS the reply thread seals its batches itself, and its ring still waits for
/// the socket to take more.
pub(crate) fn serve(channel: Channel, export: Arc<Export>, session: Session, pool: &WorkerPool) {
    if let Ok(socket) = channel.socket() {
        let _ = socket.set_read_timeout(None);
        let _ = socket.set_nodelay();
    }
    let Ok((reader, writer)) = Transport::split(channel) else {
        return;
    };
    let mut ring = Ring::new(MAX_IN_FLIGHT as usize);
    if let Some(r) = ring.as_mut() {
        r.serve_clients();
    }
    let (replies, incoming) = mpsc::channel::<Msg>();
    let waker = ring.as_ref().map(Ring::waker);
    let conn = Arc::new(Connection::new(export, session, replies, waker));
    if ring.is_some() {
        // One thread reads the requests, starts them and answers them.
        let intake = Some(Intake::new(reader));
        replies::run(&conn, pool, incoming, ring, writer, intake).close();
        return;
    }
    std::thread::scope(|s| {
        // Replies leave from a thread of this connection's own: a client that stops
        // reading them blocks only its connection, never the workers every connection
        // shares.
        let replier = std::thread::Builder::new()
            .name("nbd-replies".into())
            .spawn_scoped(s, || {
                replies::run(&conn, pool, incoming, None, writer, None)
            });
        let Ok(replier) = replier else {
            return;
        };
        read_requests(&conn, pool, reader);
        conn.budget.wait_idle();
        conn.send_msg(Msg::Stop);
        if let Ok(w) = replier.join() {
            w.close();
        }
    });
}
