//! A connection in transmission, as every thread serving it sees it: the export and
//! session, the channel to its reply thread, and the budget that bounds what it has in
//! flight.

use crate::export::Export;
use crate::proto::{self, cmd, ReplyTo, Request};
use crate::session::Session;
use qed::Waker;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Payload bytes a connection may have in flight before it stops reading requests.
const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// Requests a connection may have in flight.
pub(crate) const MAX_IN_FLIGHT: u64 = 256;

/// Counts what a connection has in flight, so reading pauses instead of buffering
/// without bound.
#[derive(Default)]
pub(crate) struct Budget {
    state: Mutex<InFlight>,
    changed: Condvar,
}

#[derive(Default)]
struct InFlight {
    bytes: u64,
    requests: u64,
    /// Threads waiting for a change: a release with none skips the wake-up, which
    /// costs a system call each time otherwise.
    waiting: u32,
}

impl InFlight {
    /// Whether a request of `bytes` fits. An empty connection always admits one
    /// request, however large.
    fn admits(&self, bytes: u64) -> bool {
        self.requests == 0
            || (self.bytes + bytes <= MAX_IN_FLIGHT_BYTES && self.requests < MAX_IN_FLIGHT)
    }
}

impl Budget {
    /// Takes `bytes` and one request from the budget, waiting until they fit.
    pub(crate) fn acquire(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !st.admits(bytes) {
            st = self.wait(st);
        }
        st.bytes += bytes;
        st.requests += 1;
    }

    /// Takes `bytes` and one request if they fit now; returns whether it did.
    pub(crate) fn try_acquire(&self, bytes: u64) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.admits(bytes) {
            return false;
        }
        st.bytes += bytes;
        st.requests += 1;
        true
    }

    /// Takes `bytes` and one request whether they fit or not: for a last reply.
    pub(crate) fn take(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.bytes += bytes;
        st.requests += 1;
    }

    /// Whether every request has given its budget back.
    pub(crate) fn idle(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
            == 0
    }

    /// Gives back what [`Budget::acquire`] took for one request.
    pub(crate) fn release(&self, bytes: u64) {
        self.release_many(bytes, 1);
    }

    /// Gives back what `requests` requests took, `bytes` in all.
    pub(crate) fn release_many(&self, bytes: u64, requests: u64) {
        if requests == 0 {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.bytes -= bytes;
        st.requests -= requests;
        if st.waiting > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits until every request has given its budget back, i.e. has been answered.
    pub(crate) fn wait_idle(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.requests > 0 {
            st = self.wait(st);
        }
    }

    fn wait<'a>(&self, mut st: MutexGuard<'a, InFlight>) -> MutexGuard<'a, InFlight> {
        st.waiting += 1;
        let mut st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        st.waiting -= 1;
        st
    }
}

/// What a connection's reply thread receives.
pub(crate) enum Msg {
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

impl Connection {
    /// A connection whose replies go to `replies`; `waker` wakes the reply thread's
    /// ring, if it has one.
    pub(crate) fn new(
        export: Arc<Export>,
        session: Session,
        replies: Sender<Msg>,
        waker: Option<Waker>,
    ) -> Self {
        Self {
            export,
            session,
            replies,
            waker,
            budget: Arc::new(Budget::default()),
        }
    }

    /// The device exported.
    pub(crate) fn device(&self) -> &dyn qed::BlockDevice {
        &*self.export.device
    }

    /// Hands a finished reply to the reply thread, with the budget it holds.
    pub(crate) fn send(&self, reply: Vec<u8>, cost: u64) {
        self.send_msg(Msg::Reply(reply, cost));
    }

    /// Hands a message to the reply thread, waking it if it sleeps on its ring.
    pub(crate) fn send_msg(&self, msg: Msg) {
        match self.replies.send(msg) {
            Ok(()) => {
                if let Some(w) = &self.waker {
                    w.wake();
                }
            }
            // Nobody will send the reply: its budget must not stay taken.
            Err(mpsc::SendError(Msg::Reply(_, cost))) => self.budget.release(cost),
            Err(_) => {}
        }
    }

    /// Whom a reply to `req` goes to, in this connection's header style.
    pub(crate) fn reply_to(&self, req: &Request) -> ReplyTo {
        ReplyTo::new(req, self.session.extended)
    }

    /// The reply to a request that succeeded without data.
    pub(crate) fn ok_reply(&self, req: &Request) -> Vec<u8> {
        proto::done_reply(&self.reply_to(req))
    }

    /// The reply to a request that failed: an error chunk where the client expects
    /// chunks (every reply with extended headers), else a simple reply.
    pub(crate) fn error_reply(&self, req: &Request, error: u32, msg: &str) -> Vec<u8> {
        let structured_only = matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS);
        if self.session.extended || (self.session.structured && structured_only) {
            let mut out = Vec::new();
            proto::error_chunk(&mut out, &self.reply_to(req), error, msg);
            out
        } else {
            proto::simple_reply(req.cookie, error).to_vec()
        }
    }
}
