//! A request in flight, and the messages a queue's ring thread is handed about it.

use crate::request::Request;
use qed::Waker;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use vhost_user_backend::VringRwLock;
use vm_memory::{Bytes, GuestMemoryMmap};

/// A request taken from a queue, with what completing it needs.
pub(crate) struct Job {
    pub(crate) head: u16,
    pub(crate) req: Request,
    pub(crate) mem: Arc<GuestMemoryMmap>,
    pub(crate) vring: VringRwLock,
    pub(crate) queue: usize,
    /// The frontend's connection it came from (its rings).
    pub(crate) connection: u64,
}

impl Job {
    /// Writes the request's status byte; returns the used length to complete it with
    /// (the data written into guest memory and the status, or 0 when the status could
    /// not be written).
    pub(crate) fn put_status(&self, status: u8, written: u32) -> u32 {
        match self.mem.write_obj(status, self.req.status) {
            Ok(()) => written + 1,
            Err(_) => 0,
        }
    }
}

/// What a ring thread is handed.
pub(crate) enum Msg {
    /// A request to start.
    Start(Job),
    /// A request a worker carried out, to complete with its status and the bytes of
    /// data it wrote into guest memory.
    Done { job: Job, status: u8, written: u32 },
    /// No more requests will come: end once those in the kernel are completed.
    Stop,
}

/// Hands a ring thread its messages, from any thread.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) tx: Sender<Msg>,
    pub(crate) waker: Waker,
}

impl Link {
    /// Hands `msg` over; gives it back if the thread is gone.
    pub(crate) fn send(&self, msg: Msg) -> Result<(), Msg> {
        self.tx.send(msg).map_err(|e| e.0)?;
        self.waker.wake();
        Ok(())
    }
}
