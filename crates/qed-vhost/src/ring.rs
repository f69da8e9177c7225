//! A queue's ring thread: the reads and writes the device can place go straight to the
//! image's file through an io_uring (the library's `DirectQueue`), as the NBD server's
//! do; everything else runs on the workers, which hand what they completed back to it.
//! Every completion of the queue goes into the used ring here, so that the guest is
//! told once for a batch: an interrupt costs a guest more than a request.

use crate::execute::{gather, scatter, transfer};
use crate::job::{Job, Link, Msg};
use crate::request::Kind;
use crate::shared::{notify, Shared};
use qed::{AlignedBuf, DirectDone, DirectEvent, DirectQueue};
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

/// Requests a ring keeps in the kernel at most.
const DEPTH: usize = 256;

/// A queue's ring thread, ended and waited for when dropped.
pub(crate) struct RingThread {
    link: Link,
    thread: Option<JoinHandle<()>>,
}

impl RingThread {
    /// Starts the ring thread of a queue; `None` where io_uring cannot be had (the
    /// workers then take every request).
    pub(crate) fn start(shared: Arc<Shared>, queue: usize) -> Option<RingThread> {
        let (jobs, incoming) = channel();
        let (ready, started) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-ring-{queue}"))
            .spawn(move || {
                let dev = shared.device.clone();
                let Some(mut ring) = DirectQueue::<Job>::new(DEPTH) else {
                    let _ = ready.send(None);
                    return;
                };
                ring.serve_clients();
                let _ = ready.send(Some(ring.waker()));
                serve(&shared, dev.as_ref(), &mut ring, &incoming);
                ring.drain();
            })
            .ok()?;
        match started.recv() {
            Ok(Some(waker)) => Some(RingThread {
                link: Link { tx: jobs, waker },
                thread: Some(thread),
            }),
            _ => {
                let _ = thread.join();
                None
            }
        }
    }

    /// What hands the thread its messages.
    pub(crate) fn link(&self) -> Link {
        self.link.clone()
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        let _ = self.link.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The ring thread's loop, until no more jobs can come and none is in the kernel.
fn serve<'d>(
    shared: &Arc<Shared>,
    dev: &'d dyn qed::BlockDevice,
    ring: &mut DirectQueue<'d, Job>,
    incoming: &Receiver<Msg>,
) {
    let mut early: Option<Msg> = None;
    let mut closed = false;
    let mut batch = Batch::default();
    loop {
        let _ = ring.submit();
        let mut progress = ring
            .reap(|event| {
                if let DirectEvent::Done(done) = event {
                    finish(shared, done, &mut batch);
                }
            })
            .unwrap_or(false);
        batch.notify();
        loop {
            let msg = match early.take() {
                Some(msg) => msg,
                None => match incoming.try_recv() {
                    Ok(msg) => msg,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                },
            };
            progress = true;
            match msg {
                Msg::Start(job) => start(shared, dev, ring, job, &mut batch),
                Msg::Done {
                    job,
                    status,
                    written,
                } => finish_with(shared, job, status, written, &mut batch),
                Msg::Stop => closed = true,
            }
        }
        batch.notify();
        let _ = ring.submit();
        if closed && ring.in_flight() == 0 {
            return;
        }
        if !progress {
            let parked = ring.park(|| match incoming.try_recv() {
                Ok(msg) => {
                    early = Some(msg);
                    true
                }
                Err(TryRecvError::Empty) => false,
                Err(TryRecvError::Disconnected) => true,
            });
            if parked.is_err() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

/// Starts `job` on the ring when the device can place it there; on the workers
/// otherwise.
fn start<'d>(
    shared: &Arc<Shared>,
    dev: &'d dyn qed::BlockDevice,
    ring: &mut DirectQueue<'d, Job>,
    job: Job,
    batch: &mut Batch,
) {
    let writeback = shared.writeback();
    let direct = match job.req.kind {
        Kind::Read => transfer(&shared.config, &job.mem, &job.req, true),
        // A write the guest wants durable at once needs a flush after it: the workers.
        Kind::Write if writeback && !shared.config.options.read_only => {
            transfer(&shared.config, &job.mem, &job.req, false)
        }
        _ => None,
    };
    let Some((offset, len)) = direct else {
        shared.run_on_workers(job);
        return;
    };
    let handed_back = if job.req.kind == Kind::Read {
        ring.read(dev, offset, len, job, || AlignedBuf::new(len))
            .err()
    } else {
        let mut buf = AlignedBuf::new(len);
        if !gather(&job.mem, &job.req, &mut buf) {
            finish_with(shared, job, VIRTIO_BLK_S_IOERR as u8, 0, batch);
            return;
        }
        ring.write(dev, offset, buf, job).err().map(|(job, _)| job)
    };
    if let Some(job) = handed_back {
        shared.run_on_workers(job);
    }
}

/// Completes a request the ring ran: a read's data into guest memory, the status.
fn finish(shared: &Shared, done: DirectDone<Job>, batch: &mut Batch) {
    let whole = done.whole();
    let job = &done.tag;
    let ok = match job.req.kind {
        Kind::Read => whole && scatter(&job.mem, &job.req, &done.buf[..done.len]),
        _ => whole && done.settled.is_ok(),
    };
    if !ok {
        let why = match &done.settled {
            Err(e) => e.to_string(),
            Ok(()) if done.result < 0 => {
                std::io::Error::from_raw_os_error(-done.result).to_string()
            }
            Ok(()) => format!("{} of {} bytes", done.result, done.len),
        };
        (shared.config.options.log)(&format!(
            "a {} at sector {} failed: {why}",
            if job.req.kind == Kind::Read {
                "read"
            } else {
                "write"
            },
            job.req.sector
        ));
    }
    let written = if ok && job.req.kind == Kind::Read {
        done.len as u32
    } else {
        0
    };
    let status = if ok {
        VIRTIO_BLK_S_OK
    } else {
        VIRTIO_BLK_S_IOERR
    } as u8;
    finish_with(shared, done.tag, status, written, batch);
}

/// Writes the status, puts the request in the used ring (the guest told with the rest
/// of the batch) and counts it done.
fn finish_with(shared: &Shared, job: Job, status: u8, written: u32, batch: &mut Batch) {
    let len = job.put_status(status, written);
    if job.vring.add_used(job.head, len).is_ok() {
        batch.add(job.connection, &job.vring);
    }
    shared.left(job.queue);
}

/// The rings completions went into since the guest was last told: one, but for the
/// moment a frontend reconnects.
#[derive(Default)]
struct Batch {
    rings: Vec<(u64, VringRwLock)>,
}

impl Batch {
    fn add(&mut self, connection: u64, vring: &VringRwLock) {
        if !self.rings.iter().any(|(c, _)| *c == connection) {
            self.rings.push((connection, vring.clone()));
        }
    }

    fn notify(&mut self) {
        for (_, vring) in self.rings.drain(..) {
            notify(&vring);
        }
    }
}
