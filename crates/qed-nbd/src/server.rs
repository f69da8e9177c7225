//! Accepting clients and running their sessions until shutdown.

use crate::export::Export;
use crate::handshake::handshake;
use crate::stream::Stream;
use crate::tls::{HandshakeFailed, Tls};
use crate::transmission::serve;
use qed::WorkerPool;
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the accept loop looks at the shutdown flag.
const POLL: Duration = Duration::from_millis(20);
/// How long shutdown waits for replies to be taken before it cuts connections: a client
/// that never reads its replies must not keep the server from exiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A handle on each live connection by id, so shutdown can wake its reader.
type Live = Arc<Mutex<HashMap<u64, Stream>>>;

/// Where clients connect.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix socket.
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        let s = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Stream::Unix(s)
            }
        };
        Ok(s)
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Most clients served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Keep serving after the last client leaves (otherwise stop then).
    pub persistent: bool,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Worker threads executing requests.
    pub workers: usize,
    /// TLS policy and credentials; `None` refuses NBD_OPT_STARTTLS.
    pub tls: Option<Arc<Tls>>,
    /// Where the server's one-line notices go (a failed TLS handshake, with the peer).
    pub log: fn(&str),
}

fn log_to_stderr(line: &str) {
    eprintln!("{line}");
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_connections: 1,
            persistent: false,
            handshake_timeout: Duration::from_secs(10),
            workers: 32,
            tls: None,
            log: log_to_stderr,
        }
    }
}

/// An NBD server for one export.
pub struct Server {
    export: Arc<Export>,
    config: Config,
    shutdown: Arc<AtomicBool>,
}

impl Server {
    /// A server for `export`.
    pub fn new(export: Export, config: Config) -> Self {
        Self {
            export: Arc::new(export),
            config,
            shutdown: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Setting this flag stops the server: no new clients, every request in flight
    /// finishes and is replied to, then [`Server::run`] returns.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Serves clients until shutdown (or, unless persistent, until the last client
    /// leaves). Returns once every connection has finished.
    pub fn run(&self, listener: Listener) -> io::Result<()> {
        listener.set_nonblocking()?;
        let pool = Arc::new(WorkerPool::start("nbd-worker", self.config.workers, None)?);
        let active = Arc::new(AtomicUsize::new(0));
        let live: Live = Arc::default();
        let mut threads = Vec::new();
        let mut next_id = 0u64;
        let mut served = false;
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                break;
            }
            if !self.config.persistent && served && active.load(Ordering::Acquire) == 0 {
                break;
            }
            if active.load(Ordering::Acquire) >= self.config.max_connections {
                std::thread::sleep(POLL);
                continue;
            }
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            served = true;
            let id = next_id;
            next_id += 1;
            if let Ok(c) = stream.try_clone() {
                live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, c);
            }
            active.fetch_add(1, Ordering::AcqRel);
            threads.push(self.spawn_session(stream, id, &pool, &active, &live));
            threads.retain(|t| !t.is_finished());
        }
        close_connections(&live, threads);
        // Every connection has ended: the workers finish what is queued before `run`
        // returns.
        pool.stop();
        Ok(())
    }

    /// Runs one client's handshake and transmission on a thread of its own; the
    /// connection leaves `live` and `active` when it ends.
    fn spawn_session(
        &self,
        stream: Stream,
        id: u64,
        pool: &Arc<WorkerPool>,
        active: &Arc<AtomicUsize>,
        live: &Live,
    ) -> JoinHandle<()> {
        let export = self.export.clone();
        let pool = pool.clone();
        let active = active.clone();
        let live = live.clone();
        let shutdown = self.shutdown.clone();
        let timeout = self.config.handshake_timeout;
        let tls = self.config.tls.clone();
        let log = self.config.log;
        let multi_conn = self.config.max_connections > 1;
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            let stopping = || shutdown.load(Ordering::Acquire);
            let peer = tls.as_ref().map(|_| stream.peer());
            match handshake(
                stream,
                &export,
                tls.as_deref(),
                deadline,
                multi_conn,
                &stopping,
            ) {
                Ok(Ok((channel, session))) => serve(channel, export, session, &pool),
                Ok(Err(_)) => {}
                Err(e) => {
                    if let Some(why) = e
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<HandshakeFailed>())
                    {
                        let peer = peer.as_deref().unwrap_or("a client");
                        log(&format!("{peer}: {why}"));
                    }
                }
            }
            // The handshake's own handle is gone; this one may keep the socket open.
            let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = live.remove(&id) {
                let _ = s.shutdown(Shutdown::Both);
            }
            drop(live);
            active.fetch_sub(1, Ordering::AcqRel);
        })
    }
}

/// Ends every connection at shutdown: first only their reading, so what was read is
/// still executed and replied to; then, after a grace period for clients slow to take
/// their replies, the whole socket.
fn close_connections(live: &Live, threads: Vec<JoinHandle<()>>) {
    for s in live.lock().unwrap_or_else(|p| p.into_inner()).values() {
        let _ = s.shutdown(Shutdown::Read);
    }
    let grace = Instant::now() + SHUTDOWN_GRACE;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < grace {
        std::thread::sleep(POLL);
    }
    // Requests already taken still run to the end (the pool finishes its queue).
    for s in live.lock().unwrap_or_else(|p| p.into_inner()).values() {
        let _ = s.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}
