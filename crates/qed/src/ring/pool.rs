//! A fixed pool of worker threads carrying out the requests a [`super::DirectQueue`]
//! cannot take (and any other work its owner hands out).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A job; `None` tells the worker that takes it to end.
type Job = Option<Box<dyn FnOnce() + Send + 'static>>;

/// The queue feeding the workers.
#[derive(Debug)]
enum Queue {
    Bounded(SyncSender<Job>),
    Unbounded(Sender<Job>),
}

impl Queue {
    fn send(&self, job: Job) {
        // The workers end only on `None`, sent by `stop` after every other job: a job
        // that finds them gone is dropped, which answers its request with an error.
        let _ = match self {
            Queue::Bounded(s) => s.send(job).map_err(drop),
            Queue::Unbounded(s) => s.send(job).map_err(drop),
        };
    }
}

/// Worker threads and the queue feeding them.
#[derive(Debug)]
pub struct WorkerPool {
    queue: Queue,
    stopped: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl WorkerPool {
    /// Starts `n` workers (at least one), named `name-0`, `name-1`, ..., behind a queue of
    /// `capacity` jobs (handing in a job then waits while it is full), or an unbounded
    /// one.
    pub fn start(name: &str, n: usize, capacity: Option<usize>) -> std::io::Result<Self> {
        let (queue, receiver) = match capacity {
            Some(c) => {
                let (s, r) = sync_channel::<Job>(c.max(1));
                (Queue::Bounded(s), r)
            }
            None => {
                let (s, r) = channel::<Job>();
                (Queue::Unbounded(s), r)
            }
        };
        let receiver: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(receiver));
        let mut workers = Vec::new();
        for i in 0..n.max(1) {
            let r = receiver.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || loop {
                        let job = r.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok(Some(job)) => job(),
                            Ok(None) | Err(_) => break,
                        }
                    })?,
            );
        }
        Ok(Self {
            queue,
            stopped: AtomicBool::new(false),
            workers: Mutex::new(workers),
        })
    }

    /// Queues a job. A job handed in after [`WorkerPool::stop`] is dropped, which
    /// answers its request with an error.
    pub fn execute(&self, job: impl FnOnce() + Send + 'static) {
        if !self.stopped.load(Ordering::Acquire) {
            self.queue.send(Some(Box::new(job)));
        }
    }

    /// Lets the workers finish the jobs queued and end, and waits for them.
    pub fn stop(&self) {
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        self.stopped.store(true, Ordering::Release);
        for _ in &workers {
            self.queue.send(None);
        }
        for w in workers {
            let _ = w.join();
        }
    }
}
