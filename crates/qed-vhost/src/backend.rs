//! The vhost-user backend: the device's features and configuration for the protocol,
//! and its queues' requests handed to the workers and completed in the used rings.

use crate::config::{DeviceConfig, QUEUE_SIZE};
use crate::job::{Job, Msg};
use crate::request::parse;
use crate::ring::RingThread;
use crate::shared::{complete, Flights, Memory, Shared};
use qed::{BlockDevice, WorkerPool};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Bytes of the configuration space a frontend may ask for at most.
const MAX_CONFIG: u32 = 256;
/// Offset of `wce` (the write cache's state) in the configuration space.
const WCE_OFFSET: u32 = 32;
/// How long a queue is watched for more requests, notifications off, after it had some.
const POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// The device, shared by the protocol's threads (one per queue), the queues' ring
/// threads and the workers.
pub(crate) struct Backend {
    shared: Arc<Shared>,
    /// Each queue's ring thread (none where io_uring is missing); dropping one waits
    /// for the requests it has in the kernel.
    _rings: Vec<Option<RingThread>>,
}

impl Backend {
    pub(crate) fn new(device: Arc<dyn BlockDevice>, config: DeviceConfig) -> io::Result<Self> {
        let workers = config.options.workers.max(1);
        let queues = config.options.num_queues.max(1);
        let shared = Arc::new(Shared {
            device,
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            memory: Mutex::new(None),
            flights: (0..queues).map(|_| Flights::default()).collect(),
            connection: std::sync::atomic::AtomicU64::new(0),
            links: (0..queues).map(|_| std::sync::OnceLock::new()).collect(),
            pool: WorkerPool::start("vhost-worker", workers, None)?,
            config,
        });
        let rings: Vec<Option<RingThread>> = (0..queues)
            .map(|q| RingThread::start(shared.clone(), q))
            .collect();
        for (ring, link) in rings.iter().zip(&shared.links) {
            if let Some(ring) = ring {
                let _ = link.set(ring.link());
            }
        }
        Ok(Self {
            shared,
            _rings: rings,
        })
    }

    /// Waits until every request handed to the workers is completed: before a
    /// connection's rings are let go.
    pub(crate) fn drain(&self) {
        for f in &self.shared.flights {
            f.wait_idle();
        }
    }

    /// Requests completed on each queue so far.
    pub(crate) fn completed(&self) -> Vec<u64> {
        self.shared
            .flights
            .iter()
            .map(|f| f.completed.load(Ordering::Relaxed))
            .collect()
    }

    /// Forgets the memory of a connection that ended.
    pub(crate) fn forget_memory(&self) {
        self.shared.connection.fetch_add(1, Ordering::AcqRel);
        *self.shared.memory.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the guest made requests available on `vring` that are not taken yet.
    fn more_available(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
        let state = vring.get_ref();
        let queue = state.get_queue();
        queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|avail| avail.0 != queue.next_avail())
    }

    /// Looks for more requests for a while with the guest's notifications off, so that a
    /// guest busy with I/O makes them without a kick (each one an exit of the VM);
    /// returns whether some came. The memory is taken once, not at every look.
    fn poll(&self, vring: &VringRwLock) -> bool {
        let Some(memory) = self.shared.guest_memory() else {
            return false;
        };
        let guard = memory.memory();
        let start = std::time::Instant::now();
        while start.elapsed() < POLL {
            if Self::more_available(vring, &guard) {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    /// Takes every request the guest made available on `vring` (queue `queue`) and
    /// hands each to its ring thread or a worker, which completes it; returns whether it
    /// took any.
    fn take_requests(&self, vring: &VringRwLock, queue: usize) -> bool {
        let memory = self.shared.guest_memory();
        let Some(memory) = memory else {
            return false;
        };
        let guard = memory.memory();
        let mut took = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(guard.clone());
            let Some(chain) = chain else {
                break;
            };
            took = true;
            let head = chain.head_index();
            // The chain ends itself after a queue's worth of descriptors (a loop in
            // it, or a lie about its length), and where a descriptor cannot be read.
            let descs: Vec<Descriptor> = chain.take(QUEUE_SIZE).collect();
            let mem = guard.clone().into_inner();
            let Ok(req) = parse(&mem, &descs) else {
                // Not a request: completed empty, so that the ring goes on.
                complete(vring, head, 0);
                continue;
            };
            let Some(flights) = self.shared.flights.get(queue) else {
                return took;
            };
            flights.enter();
            let job = Job {
                head,
                req,
                mem,
                vring: vring.clone(),
                queue,
                connection: self.shared.connection.load(Ordering::Acquire),
            };
            let job = match self.shared.links.get(queue).and_then(|l| l.get()) {
                Some(link) => match link.send(Msg::Start(job)) {
                    Ok(()) => continue,
                    Err(Msg::Start(job)) => job,
                    Err(_) => continue,
                },
                None => job,
            };
            self.shared.run_on_workers(job);
        }
        took
    }
}

/// Refuses a memory table with a region reaching past the end of the file it maps:
/// touching that part would kill this process (SIGBUS), whatever the checks of guest
/// addresses said.
fn regions_backed(mem: &GuestMemoryMmap) -> io::Result<()> {
    for region in mem.iter() {
        let Some(file) = region.file_offset() else {
            continue;
        };
        let meta = file.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let end = file.start().checked_add(region.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a memory region of {} bytes at offset {} of a file of {} bytes",
                    region.len(),
                    file.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.shared.flights.len()
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.shared.config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        // Each negotiation starts the write cache afresh: on where the guest may switch
        // it (CONFIG_WCE; it reads `wce` and writes it to change it), else on exactly
        // when the guest can flush. QEMU negotiates once with no guest features before
        // the guest's driver does: that must not leave the cache off for the guest.
        let writeback = features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0
            || features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.shared.writeback.store(writeback, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Release);
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        let mut memory = self.shared.memory.lock().unwrap_or_else(|p| p.into_inner());
        match regions_backed(&mem.memory()) {
            Ok(()) => {
                *memory = Some(mem);
                Ok(())
            }
            Err(e) => {
                // Nothing is read from it: the refusal ends the connection.
                *memory = None;
                Err(e)
            }
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self
            .shared
            .config
            .space(self.shared.writeback.load(Ordering::Acquire));
        let size = size.min(MAX_CONFIG) as usize;
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size).min(space.len());
        let mut out = space[start..end].to_vec();
        out.resize(size, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The write cache's state is the one field a guest may write.
        match (offset, buf) {
            (WCE_OFFSET, [wce]) => {
                if *wce == 0 {
                    // Writes completed with the cache on are made durable before the
                    // guest counts on the cache being off.
                    self.shared.device.flush().map_err(io::Error::other)?;
                }
                self.shared.writeback.store(*wce != 0, Ordering::Release);
                Ok(())
            }
            _ => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // A thread per queue, so that a guest's vCPUs kick their queues in parallel.
        (0..self.shared.flights.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend reads where the ring stands once this returns: every request
        // taken from it must be completed by then.
        if let Some(f) = self.shared.flights.get(queue_index as usize) {
            f.wait_idle();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        // One queue per thread: the thread's index is its queue's.
        let queue = thread_id;
        if self.shared.event_idx.load(Ordering::Acquire) {
            loop {
                let _ = vring.disable_notification();
                while self.take_requests(vring, queue) && self.poll(vring) {}
                // Requests made while notifications were off are taken in another round.
                if !vring.enable_notification().unwrap_or(false) {
                    break;
                }
            }
        } else {
            self.take_requests(vring, queue);
        }
        Ok(())
    }
}
