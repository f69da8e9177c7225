//! The control socket: a Unix socket listener, a thread per client (a bounded number of
//! them), and a clean end that leaves no socket file behind.

use crate::commands::Commands;
use crate::connection;
use crate::error::ControlError;
use crate::protocol::{error_json, greeting};
use serde_json::json;
use std::collections::HashMap;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Clients served at once; one more is told so and disconnected.
pub const MAX_CONNECTIONS: usize = 8;
/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// How long a reply may wait for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Live = Arc<Mutex<HashMap<u64, UnixStream>>>;

/// A running control socket. Stopping it (or dropping it) closes every connection and
/// removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    /// The socket file's (device, inode), so that only this server's file is removed.
    file_id: (u64, u64),
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` and serves `commands` on threads of its own. A socket file
    /// left by a server that is gone is replaced; one a live server answers on is not,
    /// nor is anything that is not a socket. The socket is made accessible to its owner
    /// only: whoever can connect can start and cancel jobs.
    pub fn start(path: &Path, commands: Arc<Commands>) -> io::Result<ControlServer> {
        clear_stale(path)?;
        let listener = UnixListener::bind(path)
            .map_err(|e| annotate(e, format!("could not listen on {}", path.display())))?;
        let meta = std::fs::metadata(path)?;
        let file_id = (meta.dev(), meta.ino());
        let mut server = ControlServer {
            path: path.to_path_buf(),
            file_id,
            stop: Arc::new(AtomicBool::new(false)),
            accept: None,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = server.stop.clone();
        server.accept = Some(
            std::thread::Builder::new()
                .name("control accept".into())
                .spawn(move || accept_loop(listener, commands, stop))?,
        );
        Ok(server)
    }

    /// Where the socket listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, closes every connection (a command being answered finishes
    /// first), and removes the socket file.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        // A later server may have replaced the file (after ours was removed by hand).
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                std::fs::remove_file(&self.path).ok();
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if !self.stop.load(Ordering::Acquire) {
            self.shut();
        }
    }
}

/// Removes a socket file nobody listens on any more; refuses a live one and anything
/// else that is in the way.
fn clear_stale(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use: another server is listening on it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| annotate(e, format!("could not remove the stale {}", path.display()))),
        Err(e) => Err(annotate(e, format!("could not probe {}", path.display()))),
    }
}

fn annotate(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn accept_loop(listener: UnixListener, commands: Arc<Commands>, stop: Arc<AtomicBool>) {
    let live: Live = Arc::default();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next = 0u64;
    while !stop.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Nothing to accept, or no room for it (out of descriptors): wait a little,
            // without spinning.
            Err(_) => {
                std::thread::sleep(POLL);
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        if stream.set_nonblocking(false).is_err()
            || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
        {
            continue;
        }
        if threads.len() >= MAX_CONNECTIONS {
            turn_away(stream);
            continue;
        }
        let id = next;
        next += 1;
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        lock(&live).insert(id, handle);
        let (commands, gone) = (commands.clone(), live.clone());
        let spawned = std::thread::Builder::new()
            .name("control client".into())
            .spawn(move || {
                // A client that goes away mid-line is no error of the server's.
                let _ = connection::serve(stream, &commands);
                lock(&gone).remove(&id);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => {
                lock(&live).remove(&id);
            }
        }
    }
    // Wake every reader; each finishes the reply it is writing, if any, and ends.
    for s in lock(&live).values() {
        let _ = s.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Tells a client past the limit why it is disconnected: the greeting (so that QMP
/// clients read the error as a reply), then the error.
fn turn_away(mut stream: UnixStream) {
    let e = ControlError::generic(format!(
        "too many control connections ({MAX_CONNECTIONS}): try again later"
    ));
    let text = format!("{}\n{}\n", greeting(), json!({"error": error_json(&e)}));
    let _ = stream.write_all(text.as_bytes());
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
