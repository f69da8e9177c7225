//! A fixed pool of worker threads carrying out requests on the device.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Worker threads and the bounded queue feeding them.
pub(crate) struct Pool {
    sender: Mutex<Option<SyncSender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Starts `n` workers (at least one) behind a queue of `capacity` jobs.
    pub(crate) fn start(n: usize, capacity: usize) -> std::io::Result<Self> {
        let (sender, receiver) = sync_channel::<Job>(capacity.max(1));
        let receiver: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(receiver));
        let mut workers = Vec::new();
        for i in 0..n.max(1) {
            let r = receiver.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("fuse-worker-{i}"))
                    .spawn(move || loop {
                        let job = r.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    })?,
            );
        }
        Ok(Self {
            sender: Mutex::new(Some(sender)),
            workers: Mutex::new(workers),
        })
    }

    /// Queues a job; it waits while the queue is full. A job handed in after
    /// [`Pool::stop`] is dropped, which answers its request with an error.
    pub(crate) fn execute(&self, job: impl FnOnce() + Send + 'static) {
        // The sender is cloned out so that a full queue blocks only this caller.
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(s) = sender {
            let _ = s.send(Box::new(job));
        }
    }

    /// Lets the workers finish the queued jobs and end, and waits for them.
    pub(crate) fn stop(&self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for Pool {
    /// Ends the workers without waiting for them: the last owner may be a job running
    /// on one of them, which cannot wait for itself.
    fn drop(&mut self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}
