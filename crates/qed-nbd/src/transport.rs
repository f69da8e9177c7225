//! What a connection's bytes travel through: the socket itself, or a TLS session on it.
//!
//! During the handshake one thread owns the connection ([`Channel`]). In transmission
//! it has a reading and a sending handle ([`Transport`]), held by one thread or, without
//! a ring, by a reader and a reply thread: plain text goes straight to the socket; a TLS
//! session sits behind a mutex on a non-blocking socket. Reading holds the lock only to
//! decrypt what has come; sending holds it only to encrypt ([`Transport::seal`]) into a
//! buffer of the sender's, which is then sent like plain text: a batch of records
//! leaves in one system call, and nobody waits for the socket with the lock held.

use crate::stream::Stream;
use openssl::ssl::{ErrorCode, SslStream};
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

/// The socket as a TLS session sees it. Reads come from the socket. Writes go to the
/// socket during the handshake; in transmission they are kept in `sealed` for the
/// sender to take.
#[derive(Debug)]
pub(crate) struct Wire {
    socket: Stream,
    sealed: Option<Vec<u8>>,
}

impl Wire {
    /// The socket, written through.
    pub(crate) fn new(socket: Stream) -> Wire {
        Wire {
            socket,
            sealed: None,
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.sealed {
            Some(v) => {
                v.extend_from_slice(buf);
                Ok(buf.len())
            }
            None => self.socket.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.sealed {
            Some(_) => Ok(()),
            None => self.socket.flush(),
        }
    }
}

/// A connection during the handshake: plain until NBD_OPT_STARTTLS, encrypted after.
pub(crate) enum Channel {
    /// The socket itself.
    Plain(Stream),
    /// A TLS session over it.
    Tls(Box<SslStream<Wire>>),
    /// Neither, for the moment the socket is being handed to TLS.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection is gone")
}

impl Channel {
    /// The socket underneath.
    pub(crate) fn socket(&self) -> io::Result<&Stream> {
        match self {
            Channel::Plain(s) => Ok(s),
            Channel::Tls(t) => Ok(&t.get_ref().socket),
            Channel::Gone => Err(gone()),
        }
    }

    /// Whether the connection is encrypted.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Channel::Tls(_))
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.read(buf),
            Channel::Tls(t) => t.read(buf),
            Channel::Gone => Err(gone()),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.write(buf),
            Channel::Tls(t) => t.write(buf),
            Channel::Gone => Err(gone()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Plain(s) => s.flush(),
            Channel::Tls(t) => t.flush(),
            Channel::Gone => Err(gone()),
        }
    }
}

/// A TLS session shared by a connection's reader and reply thread.
pub(crate) struct TlsShared {
    session: Mutex<SslStream<Wire>>,
    /// Another handle on the socket, to send on, wait on and shut down without the lock.
    socket: Stream,
}

/// A connection in transmission, as its reader or its reply thread holds it.
pub(crate) enum Transport {
    /// Plain text on the socket.
    Plain(Stream),
    /// A TLS session.
    Tls(Arc<TlsShared>),
}

impl Transport {
    /// Two handles on `channel` for transmission: the reader's and the reply thread's.
    pub(crate) fn split(channel: Channel) -> io::Result<(Transport, Transport)> {
        match channel {
            Channel::Plain(s) => {
                let writer = s.try_clone()?;
                Ok((Transport::Plain(s), Transport::Plain(writer)))
            }
            Channel::Tls(mut t) => {
                let socket = t.get_ref().socket.try_clone()?;
                // Neither side may block inside the session while holding its lock.
                socket.set_nonblocking(true)?;
                t.get_mut().sealed = Some(Vec::new());
                let shared = Arc::new(TlsShared {
                    session: Mutex::new(*t),
                    socket,
                });
                Ok((Transport::Tls(shared.clone()), Transport::Tls(shared)))
            }
            Channel::Gone => Err(gone()),
        }
    }

    /// The socket underneath.
    pub(crate) fn socket(&self) -> &Stream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &t.socket,
        }
    }

    /// Whether the connection is encrypted.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Sends from `parts` in order, in one call, without blocking (WouldBlock when the
    /// socket is full) or with `wait` until something went. Over TLS `parts` must be
    /// sealed already. Returns the bytes taken.
    pub(crate) fn send_vectored(&self, parts: &[IoSlice<'_>], wait: bool) -> io::Result<usize> {
        let fd = self.socket().as_raw_fd();
        // A TLS socket is non-blocking for both its users; waiting is done with poll.
        let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
        loop {
            // SAFETY: a zeroed msghdr is a valid empty one; it points at `parts`, which
            // IoSlice lays out as iovecs, alive for the call.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = parts.len() as _;
                libc::sendmsg(fd, &msg, flags)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if wait && e.kind() == io::ErrorKind::WouldBlock {
                wait_for(self.socket(), libc::POLLOUT)?;
                continue;
            }
            return Err(e);
        }
    }

    /// Encrypts all of `parts`, in order, appending the records to `out` for
    /// [`Transport::send_vectored`]; returns the bytes of `parts` taken. Anything the
    /// session wrote on its own since the last call (an alert) goes first.
    pub(crate) fn seal(&self, parts: &[IoSlice<'_>], out: &mut Vec<u8>) -> io::Result<usize> {
        let Transport::Tls(t) = self else {
            return Err(io::Error::other("sealing a plain-text connection"));
        };
        let mut session = t.lock();
        let Some(own) = session.get_mut().sealed.as_mut() else {
            return Err(gone());
        };
        out.append(own);
        // The session writes straight into `out`'s allocation.
        std::mem::swap(own, out);
        // Writes into memory never block, so each part goes whole (a part cut short
        // would stop here all the same, so that nothing after it jumps ahead).
        let mut taken = 0;
        let mut failure = None;
        for p in parts.iter().filter(|p| !p.is_empty()) {
            match session.ssl_write(p) {
                Ok(n) => {
                    taken += n;
                    if n < p.len() {
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(ssl_io_error(e));
                    break;
                }
            }
        }
        if let Some(own) = session.get_mut().sealed.as_mut() {
            std::mem::swap(own, out);
        }
        failure.map_or(Ok(taken), Err)
    }

    /// Ends the session: a TLS close_notify, if the socket takes it, then the socket.
    pub(crate) fn close(&self) {
        if let Transport::Tls(t) = self {
            let mut session = t.lock();
            let _ = session.shutdown();
            let note = session.get_mut().sealed.take().unwrap_or_default();
            drop(session);
            let _ = self.send_vectored(&[IoSlice::new(&note)], false);
        }
        let _ = self.socket().shutdown(Shutdown::Both);
    }
}

impl TlsShared {
    fn lock(&self) -> MutexGuard<'_, SslStream<Wire>> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A failed TLS call's error as an I/O error; WouldBlock when the call needs more from
/// the socket (writes never do: they go into a buffer).
fn ssl_io_error(e: openssl::ssl::Error) -> io::Error {
    if e.code() == ErrorCode::WANT_READ {
        return io::ErrorKind::WouldBlock.into();
    }
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::other(e.to_string()),
    }
}

/// Waits until `socket` is ready for `events` (or hung up: the next call says so).
fn wait_for(socket: &Stream, events: libc::c_short) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd, on a socket we hold open.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Transport {
    /// Reads what has come without waiting: WouldBlock when nothing has, 0 once the
    /// client has closed the connection.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => {
                // SAFETY: a receive into a live buffer on a socket we hold open.
                let n = unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n >= 0 {
                    Ok(n as usize)
                } else {
                    Err(io::Error::last_os_error())
                }
            }
            Transport::Tls(t) => {
                let result = t.lock().ssl_read(buf);
                match result {
                    Ok(n) => Ok(n),
                    // The client closed the session, cleanly or not.
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(0),
                    Err(e) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => Ok(0),
                    Err(e) => Err(ssl_io_error(e)),
                }
            }
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(_) => loop {
                match self.try_read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        wait_for(self.socket(), libc::POLLIN)?;
                    }
                    result => return result,
                }
            },
        }
    }
}
