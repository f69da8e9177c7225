//! A TCP proxy that makes a server on loopback answer as slowly as one far away
//! ([`DelayProxy`]): the first byte of the answer to each request is forwarded no
//! earlier than a fixed delay after the request arrived, while the bytes themselves are
//! copied at full speed. It counts the requests and records the most that were in flight
//! at once, so that a test can assert that a client keeps enough of them going to fill a
//! slow link, and how large they are.
//!
//! It speaks HTTP/1.1 only as far as it must: a request is the bytes a client sends
//! after the previous answer started (keep-alive clients wait for an answer before they
//! ask again); an answer ends after its head and `Content-Length` bytes of body (an
//! answer without one ends with its connection or the next request). The `Range`
//! header of a request, when there is one, gives its size.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes copied per read: large, so that the proxy copies at the speed of memory.
const BUFFER: usize = 1 << 20;
/// Most bytes of a request or answer head looked at.
const HEAD_LIMIT: usize = 16 << 10;

/// What a [`DelayProxy`] has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests forwarded.
    pub requests: u64,
    /// Most requests in flight at once: arrived, and their answer not yet all sent.
    pub max_in_flight: u64,
    /// Most bytes asked for (by `Range` headers) by the requests in flight at once.
    pub max_range_bytes_in_flight: u64,
    /// The largest range one request asked for.
    pub max_range: u64,
    /// Answer bytes sent to clients, heads included.
    pub bytes_down: u64,
    /// Connections accepted.
    pub connections: u64,
}

#[derive(Debug, Default)]
struct Shared {
    stats: ProxyStats,
    in_flight: u64,
    range_bytes_in_flight: u64,
}

/// The answer a connection owes: when its request came and what it asked for.
#[derive(Debug, Default)]
struct Conn {
    /// When the request still waiting for the first byte of its answer arrived.
    unanswered: Option<Instant>,
    /// Whether a request is counted in flight, and the range it asked for.
    counted: Option<u64>,
    closed: bool,
}

struct Inner {
    delay: Duration,
    shared: Mutex<Shared>,
    stop: AtomicBool,
    /// Both ends of every open connection, to shut them when the proxy stops.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Inner {
    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request in flight.
    fn begin(&self, range: u64) {
        let mut s = self.shared();
        s.stats.requests += 1;
        s.in_flight += 1;
        s.range_bytes_in_flight += range;
        s.stats.max_in_flight = s.stats.max_in_flight.max(s.in_flight);
        s.stats.max_range = s.stats.max_range.max(range);
        s.stats.max_range_bytes_in_flight = s
            .stats
            .max_range_bytes_in_flight
            .max(s.range_bytes_in_flight);
    }

    fn end(&self, range: u64) {
        let mut s = self.shared();
        s.in_flight = s.in_flight.saturating_sub(1);
        s.range_bytes_in_flight = s.range_bytes_in_flight.saturating_sub(range);
    }
}

/// A proxy on a loopback port that forwards to `upstream`, delaying every answer; stops
/// (closing every connection) when dropped.
pub struct DelayProxy {
    port: u16,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on 127.0.0.1:`port` (0: any free port) and forwards each connection to
    /// `upstream`, holding back each answer until `delay` after its request arrived.
    pub fn start(port: u16, upstream: &str, delay: Duration) -> io::Result<Self> {
        let upstream: SocketAddr = upstream.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{upstream}: no address to forward to"),
            )
        })?;
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        let inner = Arc::new(Inner {
            delay,
            shared: Mutex::new(Shared::default()),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let accept = {
            let inner = inner.clone();
            std::thread::spawn(move || accept_loop(listener, upstream, inner))
        };
        Ok(Self {
            port,
            inner,
            accept: Some(accept),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What it has seen so far.
    pub fn stats(&self) -> ProxyStats {
        self.inner.shared().stats
    }

    /// Forgets what it has seen (requests still in flight stay counted as in flight).
    pub fn reset_stats(&self) {
        let mut s = self.inner.shared();
        s.stats = ProxyStats::default();
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        // Wakes the accepting thread, which then sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self
            .inner
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, inner: Arc<Inner>) {
    for client in listener.incoming() {
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(upstream) else {
            // The client sees its connection close, as with a server that is down.
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        {
            let mut sockets = inner.sockets.lock().unwrap_or_else(|p| p.into_inner());
            // Connections long closed need not be kept for the stop.
            sockets.retain(|s| s.peer_addr().is_ok());
            sockets.extend([c3, s3]);
        }
        inner.shared().stats.connections += 1;
        let conn = Arc::new(Mutex::new(Conn::default()));
        {
            let (inner, conn) = (inner.clone(), conn.clone());
            std::thread::spawn(move || requests(client, server, &inner, &conn));
        }
        {
            let inner = inner.clone();
            std::thread::spawn(move || answers(s2, c2, &inner, &conn));
        }
    }
}

fn lock(conn: &Mutex<Conn>) -> MutexGuard<'_, Conn> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Client to server: notes when each request arrives and what it asks for.
fn requests(mut from: TcpStream, mut to: TcpStream, inner: &Inner, conn: &Mutex<Conn>) {
    let mut buf = vec![0u8; BUFFER];
    let mut head: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = Instant::now();
        {
            let mut c = lock(conn);
            if c.unanswered.is_none() {
                // Bytes after an answer started: the next request.
                if let Some(range) = c.counted.take() {
                    inner.end(range);
                }
                head.clear();
                c.unanswered = Some(now);
                c.counted = Some(0);
                inner.begin(0);
            }
            if head.len() < HEAD_LIMIT && c.counted == Some(0) {
                head.extend_from_slice(&buf[..n.min(HEAD_LIMIT - head.len())]);
                if let Some(range) = range_len(&head) {
                    c.counted = Some(range);
                    let mut s = inner.shared();
                    s.range_bytes_in_flight += range;
                    s.stats.max_range = s.stats.max_range.max(range);
                    s.stats.max_range_bytes_in_flight = s
                        .stats
                        .max_range_bytes_in_flight
                        .max(s.range_bytes_in_flight);
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    close(inner, conn);
}

/// Server to client: holds back the first byte of each answer until its request is
/// `delay` old, and counts the request done when its answer is all sent.
fn answers(mut from: TcpStream, mut to: TcpStream, inner: &Inner, conn: &Mutex<Conn>) {
    let mut buf = vec![0u8; BUFFER];
    let mut answer = Answer::default();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let arrived = lock(conn).unanswered.take();
        if let Some(at) = arrived {
            if let Some(wait) = (at + inner.delay).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            answer = Answer::default();
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        inner.shared().stats.bytes_down += n as u64;
        if answer.feed(&buf[..n]) {
            let mut c = lock(conn);
            if let Some(range) = c.counted.take() {
                inner.end(range);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    close(inner, conn);
}

/// Ends the connection's accounting once, when its first direction closes.
fn close(inner: &Inner, conn: &Mutex<Conn>) {
    let mut c = lock(conn);
    if !c.closed {
        c.closed = true;
        if let Some(range) = c.counted.take() {
            inner.end(range);
        }
    }
}

/// Where an answer is: in its head (kept to read its `Content-Length`), or in a body of
/// known length.
#[derive(Debug, Default)]
struct Answer {
    head: Vec<u8>,
    /// Body bytes still to come, once the head is read; `None` while in the head or when
    /// the head gave no length.
    body_left: Option<u64>,
    done: bool,
}

impl Answer {
    /// Takes the next bytes of the answer; true when they end it.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        if self.done {
            return false;
        }
        if self.body_left.is_none() {
            let room = HEAD_LIMIT.saturating_sub(self.head.len());
            let before = self.head.len();
            self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
            let Some(end) = find(&self.head, b"\r\n\r\n") else {
                if self.head.len() >= HEAD_LIMIT {
                    // No head this proxy can read: the answer ends with the connection.
                    self.done = true;
                }
                return false;
            };
            let head_end = end + 4;
            let Some(length) = header_value(&self.head[..head_end], "content-length")
                .and_then(|v| v.trim().parse::<u64>().ok())
            else {
                self.done = true;
                return false;
            };
            bytes = &bytes[(head_end - before).min(bytes.len())..];
            self.body_left = Some(length);
        }
        let left = self.body_left.unwrap_or(0);
        let left = left.saturating_sub(bytes.len() as u64);
        self.body_left = Some(left);
        if left == 0 {
            self.done = true;
            return true;
        }
        false
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of header `name` (lower case) in a head, if it is there.
fn header_value<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v)
    })
}

/// The bytes a complete request head's `Range: bytes=A-B` asks for.
fn range_len(head: &[u8]) -> Option<u64> {
    let end = find(head, b"\r\n\r\n")?;
    let v = header_value(&head[..end + 4], "range")?;
    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    b.checked_sub(a)?.checked_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_end_after_their_length() {
        let mut a = Answer::default();
        assert!(!a.feed(b"HTTP/1.1 206 Partial\r\nContent-Len"));
        assert!(!a.feed(b"gth: 5\r\n\r\nab"));
        assert!(a.feed(b"cde"));
        let mut b = Answer::default();
        assert!(b.feed(b"HTTP/1.1 412 X\r\ncontent-length: 0\r\n\r\n"));
    }

    #[test]
    fn ranges_are_read_from_complete_heads() {
        assert_eq!(
            range_len(b"GET / HTTP/1.1\r\nRange: bytes=10-19\r\n\r\n"),
            Some(10)
        );
        assert_eq!(range_len(b"GET / HTTP/1.1\r\nRange: bytes=10-19\r\n"), None);
        assert_eq!(
            range_len(b"GET / HTTP/1.1\r\nrange: bytes=9-1\r\n\r\n"),
            None
        );
    }

    #[test]
    fn answers_come_after_the_delay() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 1024];
            for _ in 0..2 {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0);
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .unwrap();
            }
        });
        let proxy = DelayProxy::start(0, &addr, Duration::from_millis(100)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        for _ in 0..2 {
            let start = Instant::now();
            c.write_all(b"GET / HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n")
                .unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"ok") {
                let mut buf = [0u8; 256];
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            assert!(start.elapsed() >= Duration::from_millis(100));
        }
        let stats = proxy.stats();
        assert_eq!(stats.requests, 2);
        assert_eq!(stats.max_in_flight, 1);
        assert_eq!(stats.max_range, 2);
    }
}
