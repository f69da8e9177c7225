//! What the protocol's threads (one per queue), the queues' ring threads and the
//! workers share: the device, the guest's memory and cache state, the requests in
//! flight, and the completing of a request in the used ring.

use crate::config::DeviceConfig;
use crate::execute::{execute, Target};
use crate::job::{Job, Link, Msg};
use qed::{BlockDevice, WorkerPool};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the protocol hands it over (and swaps it on a new table).
pub(crate) type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The device and its state, shared by every thread of the backend.
pub(crate) struct Shared {
    pub(crate) device: Arc<dyn BlockDevice>,
    pub(crate) config: DeviceConfig,
    pub(crate) pool: WorkerPool,
    /// The guest's write cache: on, the guest flushes; off, every write is made durable.
    pub(crate) writeback: AtomicBool,
    pub(crate) event_idx: AtomicBool,
    pub(crate) memory: Mutex<Option<Memory>>,
    /// Requests handed to the workers and not completed yet, per queue.
    pub(crate) flights: Vec<Flights>,
    /// Each queue's ring thread's link, once started: where workers hand back what they
    /// completed.
    pub(crate) links: Vec<std::sync::OnceLock<Link>>,
    /// Counts the frontends served: requests of one share its rings.
    pub(crate) connection: std::sync::atomic::AtomicU64,
}

/// The requests of one queue not completed yet, and those completed so far.
#[derive(Default)]
pub(crate) struct Flights {
    count: Mutex<usize>,
    idle: Condvar,
    /// Requests completed on the queue since the server started.
    pub(crate) completed: std::sync::atomic::AtomicU64,
}

impl Flights {
    pub(crate) fn enter(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    pub(crate) fn leave(&self) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    pub(crate) fn wait_idle(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Shared {
    /// The guest's memory, once a frontend gave its table.
    pub(crate) fn guest_memory(&self) -> Option<Memory> {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the guest runs with its write cache on.
    pub(crate) fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// Counts a request of `queue` done.
    pub(crate) fn left(&self, queue: usize) {
        if let Some(f) = self.flights.get(queue) {
            f.leave();
        }
    }

    /// Runs `job` on a worker, through the device's own path, and completes it there.
    pub(crate) fn run_on_workers(self: &Arc<Self>, job: Job) {
        let shared = self.clone();
        self.pool.execute(move || {
            let target = Target {
                device: shared.device.as_ref(),
                config: &shared.config,
                writeback: shared.writeback(),
                log: shared.config.options.log,
            };
            let outcome = execute(&target, &job.mem, &job.req);
            // Through the ring thread, told to the guest with the rest of its batch.
            let link = shared.links.get(job.queue).and_then(|l| l.get());
            let done = Msg::Done {
                job,
                status: outcome.status,
                written: outcome.written,
            };
            let undelivered = match link {
                Some(link) => link.send(done).err(),
                None => Some(done),
            };
            if let Some(Msg::Done {
                job,
                status,
                written,
            }) = undelivered
            {
                complete(&job.vring, job.head, job.put_status(status, written));
                shared.left(job.queue);
            }
        });
    }
}

/// Puts a request in the used ring and tells the guest when it wants to be told.
pub(crate) fn complete(vring: &VringRwLock, head: u16, len: u32) {
    if vring.add_used(head, len).is_ok() {
        notify(vring);
    }
}

/// Tells the guest of what was put in the used ring, when it wants to be told: once for
/// a batch of completions, each interrupt costing the guest more than a request.
pub(crate) fn notify(vring: &VringRwLock) {
    if vring.needs_notification().unwrap_or(true) {
        let _ = vring.signal_used_queue();
    }
}
