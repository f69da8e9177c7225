//! What a connection's bytes travel through: the socket itself, or a TLS session on it.
//!
//! During the handshake one thread owns the connection ([`Channel`]). In transmission
//! the reader and the reply thread share it ([`Transport`]): plain text goes straight
//! to the socket as before; a TLS session sits behind a mutex on a non-blocking socket,
//! each side holding the lock only to encrypt or decrypt what is there and waiting for
//! the socket without it, so a reader waiting for requests never holds up replies.

use crate::stream::Stream;
use openssl::ssl::{ErrorCode, SslStream};
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

/// A connection during the handshake: plain until NBD_OPT_STARTTLS, encrypted after.
pub(crate) enum Channel {
    /// The socket itself.
    Plain(Stream),
    /// A TLS session over it.
    Tls(Box<SslStream<Stream>>),
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
            Channel::Tls(t) => Ok(t.get_ref()),
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
    session: Mutex<SslStream<Stream>>,
    /// Another handle on the socket, to wait on and shut down without the lock.
    socket: Stream,
}

/// A connection in transmission, as its reader or its reply thread holds it.
pub(crate) enum Transport {
    /// Plain text on the socket.
    Plain(Stream),
    /// A TLS session.
    Tls(Arc<TlsShared>),
}

/// What a TLS call needs before it can go on.
enum Need {
    Readable,
    Writable,
}

impl Transport {
    /// Two handles on `channel` for transmission: the reader's and the reply thread's.
    pub(crate) fn split(channel: Channel) -> io::Result<(Transport, Transport)> {
        match channel {
            Channel::Plain(s) => {
                let writer = s.try_clone()?;
                Ok((Transport::Plain(s), Transport::Plain(writer)))
            }
            Channel::Tls(t) => {
                let socket = t.get_ref().try_clone()?;
                // Neither side may block inside the session while holding its lock.
                socket.set_nonblocking(true)?;
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

    /// Sends from `buf` without blocking (WouldBlock when the socket is full), or with
    /// `wait` until something went. Returns the bytes of `buf` taken.
    pub(crate) fn send(&self, buf: &[u8], wait: bool) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => {
                let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
                // SAFETY: send from a live buffer on a socket we hold open.
                let n = unsafe { libc::send(s.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
                if n >= 0 {
                    Ok(n as usize)
                } else {
                    Err(io::Error::last_os_error())
                }
            }
            Transport::Tls(t) => loop {
                let result = t.lock().ssl_write(buf);
                match result {
                    Ok(n) => return Ok(n),
                    Err(e) => match need(e)? {
                        _ if !wait => return Err(io::ErrorKind::WouldBlock.into()),
                        Need::Writable => wait_for(&t.socket, libc::POLLOUT)?,
                        // Only a renegotiation could make a write read, and there is
                        // none; the reader takes whatever comes in.
                        Need::Readable => std::thread::yield_now(),
                    },
                }
            },
        }
    }

    /// Whether the connection is encrypted.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Sends from `parts` in order, as [`Transport::send`] does from one buffer: over a
    /// plain socket in one call; over TLS from the first part that is not empty.
    pub(crate) fn send_vectored(&self, parts: &[IoSlice<'_>], wait: bool) -> io::Result<usize> {
        let Transport::Plain(s) = self else {
            let first = parts
                .iter()
                .find(|p| !p.is_empty())
                .map_or(&[][..], |p| &p[..]);
            return self.send(first, wait);
        };
        let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
        // SAFETY: a zeroed msghdr is a valid empty one; it points at `parts`, which
        // IoSlice lays out as iovecs, alive for the call.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = parts.len() as _;
            libc::sendmsg(s.as_raw_fd(), &msg, flags)
        };
        if n >= 0 {
            Ok(n as usize)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Ends the session: a TLS close_notify, if the socket takes it, then the socket.
    pub(crate) fn close(&self) {
        if let Transport::Tls(t) = self {
            let _ = t.lock().shutdown();
        }
        let _ = self.socket().shutdown(Shutdown::Both);
    }
}

impl TlsShared {
    fn lock(&self) -> MutexGuard<'_, SslStream<Stream>> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a failed TLS call waits for, or the error that ends the session.
fn need(e: openssl::ssl::Error) -> io::Result<Need> {
    match e.code() {
        ErrorCode::WANT_READ => Ok(Need::Readable),
        ErrorCode::WANT_WRITE => Ok(Need::Writable),
        _ => match e.into_io_error() {
            Ok(io) if io.kind() == io::ErrorKind::WouldBlock => Ok(Need::Readable),
            Ok(io) => Err(io),
            Err(e) => Err(io::Error::other(e.to_string())),
        },
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

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(t) => loop {
                let result = t.lock().ssl_read(buf);
                match result {
                    Ok(n) => return Ok(n),
                    // The client closed the session, cleanly or not.
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(0),
                    Err(e) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => {
                        return Ok(0)
                    }
                    Err(e) => match need(e)? {
                        Need::Readable => wait_for(&t.socket, libc::POLLIN)?,
                        Need::Writable => wait_for(&t.socket, libc::POLLOUT)?,
                    },
                }
            },
        }
    }
}
