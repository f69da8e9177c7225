//! The socket: one frontend (a QEMU) at a time, each connection served by a daemon of
//! its own, so that a frontend that reconnects (after its own restart or this
//! process's) starts from fresh rings.

use crate::backend::Backend;
use crate::config::{BlkOptions, DeviceConfig, SECTOR};
use qed::BlockDevice;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// A vhost-user-blk export listening on a Unix socket.
pub struct Server {
    listener: Listener,
    backend: Arc<Backend>,
    stop: Arc<StopState>,
    log: fn(&str),
}

struct StopState {
    path: PathBuf,
    /// Set once, under `current`'s lock.
    stopped: AtomicBool,
    current: Mutex<Option<ShutdownHandle>>,
}

/// Stops a [`Server::run`] from another thread (a signal handler's): the connection
/// served is closed once its requests are completed, and no other is taken.
#[derive(Clone)]
pub struct Stopper {
    state: Arc<StopState>,
}

impl Stopper {
    /// Asks the server to stop; returns at once.
    pub fn stop(&self) {
        let current = {
            let mut current = self.state.current.lock().unwrap_or_else(|p| p.into_inner());
            self.state.stopped.store(true, Ordering::Release);
            current.take()
        };
        match current {
            Some(handle) => handle.shutdown(),
            // A server waiting for a frontend wakes on a connection of its own.
            None => drop(UnixStream::connect(&self.state.path)),
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.stop.path)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `path` (which must not exist) for a frontend of `device`.
    pub fn bind(
        path: impl AsRef<Path>,
        device: Arc<dyn BlockDevice>,
        options: BlkOptions,
    ) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if options.num_queues == 0 || options.num_queues > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} queues asked: from 1 to 64 are served",
                    options.num_queues
                ),
            ));
        }
        if !matches!(options.logical_block_size, 512 | 4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a logical block of {} bytes: 512 or 4096 are served",
                    options.logical_block_size
                ),
            ));
        }
        let log = options.log;
        let config = DeviceConfig {
            capacity_sectors: device.size() / SECTOR,
            options,
        };
        let backend = Arc::new(Backend::new(device, config)?);
        let listener = Listener::from(UnixListener::bind(&path)?);
        Ok(Self {
            listener,
            backend,
            stop: Arc::new(StopState {
                path,
                stopped: AtomicBool::new(false),
                current: Mutex::new(None),
            }),
            log,
        })
    }

    /// A handle that stops [`Server::run`].
    pub fn stopper(&self) -> Stopper {
        Stopper {
            state: self.stop.clone(),
        }
    }

    /// Serves frontends one after the other until stopped; returns how many requests
    /// each queue completed. A frontend's protocol error ends its connection, not the
    /// server: it (or QEMU reconnecting) may connect again.
    pub fn run(mut self) -> io::Result<Vec<u64>> {
        while !self.stop.stopped.load(Ordering::Acquire) {
            let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let mut daemon =
                VhostUserDaemon::new("vhost-user-blk".into(), self.backend.clone(), memory)
                    .map_err(protocol)?;
            if let Err(e) = daemon.start(&mut self.listener) {
                if self.stop.stopped.load(Ordering::Acquire) {
                    break;
                }
                return Err(protocol(e));
            }
            {
                let mut current = self.stop.current.lock().unwrap_or_else(|p| p.into_inner());
                if self.stop.stopped.load(Ordering::Acquire) {
                    daemon.request_shutdown();
                } else {
                    *current = daemon.shutdown_handle();
                }
            }
            let ended = daemon.wait();
            self.stop
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            // Requests taken from the rings complete before the rings go.
            self.backend.drain();
            drop(daemon);
            self.backend.forget_memory();
            match ended {
                // A frontend that leaves (a VM shut down, a QEMU killed) is no error.
                Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage,
                ))
                | Ok(()) => {}
                Err(e) => {
                    if !self.stop.stopped.load(Ordering::Acquire) {
                        (self.log)(&format!("a frontend's connection ended: {e}"));
                    }
                }
            }
        }
        self.backend.drain();
        Ok(self.backend.completed())
    }
}

fn protocol(e: vhost_user_backend::Error) -> io::Error {
    io::Error::other(e.to_string())
}
