//! Replies waiting to leave a connection, in order, with the budget each holds until it
//! has gone.
//!
//! Small replies and headers are gathered into one buffer; a large read's data stays in
//! the buffer it was read into and goes out beside them in one vectored send, so the
//! bytes are copied once, by the kernel into the socket. Over TLS everything is gathered
//! (encryption copies it anyway, and one record beats a header's record of its own),
//! then sealed into records a batch at a time, and the records sent as plain text is.
//! Data buffers that went out come back for the next reads of their size.

use crate::connection::Budget;
use crate::transport::Transport;
use qed::AlignedBuf as Buf;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::Shutdown;

/// Bytes of replies gathered before they are sent.
pub(crate) const MAX_REPLY_BATCH: usize = 256 << 10;
/// Data at least this long is sent from its own buffer rather than copied.
const SEND_IN_PLACE: usize = 16 << 10;
/// Bytes of replies sealed into TLS records at a time: enough to send several records
/// in one call, few enough that the first record is not long kept waiting for the last.
const SEAL_BATCH: usize = 64 << 10;
/// Buffers sent in one call, at most.
const MAX_IOVECS: usize = 64;
/// Bytes of data buffers kept for reuse, and how many at most (so that finding one of
/// the right size stays a short look).
const SPARE_BYTES: usize = 8 << 20;
const SPARE_BUFFERS: usize = 32;

/// A piece of the outgoing stream.
enum Chunk {
    Gathered(Vec<u8>),
    InPlace(Buf),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Gathered(v) => v,
            Chunk::InPlace(b) => b,
        }
    }
}

/// The replies of one connection not sent yet.
#[derive(Default)]
pub(crate) struct Outbox {
    chunks: VecDeque<Chunk>,
    /// Bytes of the first chunk already sent.
    sent_in_front: usize,
    /// Bytes queued and bytes sent since the connection began.
    queued_total: u64,
    sent_total: u64,
    /// (end of the reply in the stream, its budget)
    costs: VecDeque<(u64, u64)>,
    /// Data buffers that went out, for reuse, and their bytes.
    spare: Vec<Buf>,
    spare_bytes: usize,
    /// TLS records sealed and not all sent yet, and how much of them went.
    sealed: Vec<u8>,
    sealed_sent: usize,
    pub(crate) broken: bool,
    pub(crate) poll_armed: bool,
}

impl Outbox {
    /// Queues one reply: `head`, then `data` if any (the data read for it). Over a plain
    /// socket large data is sent from `data` itself.
    pub(crate) fn push(
        &mut self,
        budget: &Budget,
        socket: &Transport,
        head: &[u8],
        data: Option<Buf>,
        cost: u64,
    ) {
        if self.broken {
            budget.release(cost);
            return;
        }
        self.gather(head);
        if let Some(data) = data {
            if data.len() >= SEND_IN_PLACE && !socket.is_tls() {
                self.queued_total += data.len() as u64;
                self.chunks.push_back(Chunk::InPlace(data));
            } else {
                self.gather(&data);
                self.recycle(data);
            }
        }
        self.costs.push_back((self.queued_total, cost));
    }

    /// Queues a finished reply of the pool's; a large one (a read the pool ran) is moved
    /// in, not copied.
    pub(crate) fn push_reply(&mut self, budget: &Budget, reply: Vec<u8>, cost: u64) {
        if self.broken {
            budget.release(cost);
            return;
        }
        if reply.len() >= SEND_IN_PLACE {
            self.queued_total += reply.len() as u64;
            self.chunks.push_back(Chunk::Gathered(reply));
        } else {
            self.gather(&reply);
        }
        self.costs.push_back((self.queued_total, cost));
    }

    /// Appends to the last gathered chunk, or starts one.
    fn gather(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.queued_total += bytes.len() as u64;
        if let Some(Chunk::Gathered(v)) = self.chunks.back_mut() {
            v.extend_from_slice(bytes);
            return;
        }
        self.chunks.push_back(Chunk::Gathered(bytes.to_vec()));
    }

    /// Bytes queued and not sent.
    pub(crate) fn unsent(&self) -> u64 {
        self.queued_total - self.sent_total
    }

    /// Whether anything is left to send.
    pub(crate) fn pending(&self) -> bool {
        self.unsent() > 0 || self.sealed_sent < self.sealed.len()
    }

    /// A buffer of `len` bytes for a read: one that went out before, or a new one.
    pub(crate) fn read_buffer(&mut self, len: usize) -> Buf {
        match self.spare.iter().position(|b| b.len() == len) {
            Some(i) => {
                self.spare_bytes -= len;
                self.spare.swap_remove(i)
            }
            None => Buf::new(len),
        }
    }

    fn recycle(&mut self, buf: Buf) {
        if self.spare.len() < SPARE_BUFFERS && self.spare_bytes + buf.len() <= SPARE_BYTES {
            self.spare_bytes += buf.len();
            self.spare.push(buf);
        }
    }

    /// Sends what it can; with `wait`, everything (blocking). Returns whether all went.
    pub(crate) fn send(&mut self, budget: &Budget, socket: &Transport, wait: bool) -> bool {
        while self.pending() && !self.broken {
            let tls = socket.is_tls();
            if tls && self.sealed_sent == self.sealed.len() && self.seal(socket).is_err() {
                self.fail(socket);
                break;
            }
            let result = if tls {
                socket.send_vectored(&[IoSlice::new(&self.sealed[self.sealed_sent..])], wait)
            } else {
                let slices = unsent(&self.chunks, self.sent_in_front, usize::MAX);
                socket.send_vectored(&slices, wait)
            };
            let e = match result {
                Ok(n) if n > 0 && tls => {
                    self.sealed_sent += n;
                    continue;
                }
                Ok(n) if n > 0 => {
                    self.advance(n);
                    continue;
                }
                Ok(_) => std::io::ErrorKind::WriteZero.into(),
                Err(e) => e,
            };
            match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock => break,
                _ => self.fail(socket),
            }
        }
        let done = if self.broken {
            self.chunks.clear();
            self.sent_in_front = 0;
            self.sealed.clear();
            self.sealed_sent = 0;
            self.sent_total = self.queued_total;
            u64::MAX
        } else {
            self.sent_total
        };
        let (mut bytes, mut requests) = (0, 0);
        while self.costs.front().is_some_and(|&(end, _)| end <= done) {
            if let Some((_, cost)) = self.costs.pop_front() {
                bytes += cost;
                requests += 1;
            }
        }
        budget.release_many(bytes, requests);
        !self.pending()
    }

    /// Seals the next replies into TLS records; they count as sent from then on, and
    /// give back their budget: at most one batch of records waits beyond the budget, and
    /// [`Outbox::pending`] still counts it, so nothing ends before it has gone.
    fn seal(&mut self, socket: &Transport) -> std::io::Result<()> {
        self.sealed.clear();
        self.sealed_sent = 0;
        let slices = unsent(&self.chunks, self.sent_in_front, SEAL_BATCH);
        let n = socket.seal(&slices, &mut self.sealed)?;
        self.advance(n);
        Ok(())
    }

    /// A reply cut short, or one that cannot be sealed, leaves the stream out of step:
    /// the session ends.
    fn fail(&mut self, socket: &Transport) {
        self.broken = true;
        let _ = socket.socket().shutdown(Shutdown::Both);
    }

    /// Counts `n` more bytes sent, letting go of the chunks that went whole.
    fn advance(&mut self, mut n: usize) {
        self.sent_total += n as u64;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.bytes().len() - self.sent_in_front;
            if n < left {
                self.sent_in_front += n;
                break;
            }
            n -= left;
            self.sent_in_front = 0;
            match self.chunks.pop_front() {
                Some(Chunk::InPlace(buf)) => self.recycle(buf),
                Some(Chunk::Gathered(mut v))
                    if self.chunks.is_empty() && v.capacity() <= MAX_REPLY_BATCH =>
                {
                    // Kept for the next replies, unless a large one grew it.
                    v.clear();
                    self.chunks.push_back(Chunk::Gathered(v));
                }
                _ => {}
            }
        }
    }
}

/// The bytes of `chunks` not sent yet (the first `sent_in_front` of the first chunk
/// went), as at most [`MAX_IOVECS`] slices and `limit` bytes.
fn unsent(chunks: &VecDeque<Chunk>, sent_in_front: usize, limit: usize) -> Vec<IoSlice<'_>> {
    let mut slices = Vec::with_capacity(MAX_IOVECS.min(chunks.len()));
    let mut left = limit;
    for (i, c) in chunks.iter().take(MAX_IOVECS).enumerate() {
        let skip = if i == 0 { sent_in_front } else { 0 };
        let bytes = &c.bytes()[skip..];
        let take = bytes.len().min(left);
        slices.push(IoSlice::new(&bytes[..take]));
        left -= take;
        if left == 0 {
            break;
        }
    }
    slices
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Stream;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn buf_of(len: usize, seed: u8) -> Buf {
        let mut b = Buf::new(len);
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.wrapping_add((i % 251) as u8);
        }
        b
    }

    /// Replies of every kind, sent without blocking into a socket that takes less than
    /// they are, arrive whole and in order, and every budget comes back once its reply
    /// has gone.
    #[test]
    fn replies_leave_in_order_through_partial_sends() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let socket = Transport::Plain(Stream::Unix(ours));
        let received = send_all(&socket, move |total| {
            let mut theirs = theirs;
            let mut got = vec![0; total];
            theirs.read_exact(&mut got).unwrap();
            got
        });
        received();
    }

    /// The same over TLS: the replies are sealed a batch at a time, the records go out
    /// through the same partial sends, and the client decrypts every byte in order;
    /// closing the session ends it cleanly.
    #[test]
    fn sealed_replies_leave_in_order_through_partial_sends() {
        use crate::tls::{Tls, TlsCredentials, TlsMode};
        use crate::transport::Channel;
        use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};

        let dir = tempfile::tempdir().unwrap();
        let psk = dir.path().join("keys.psk");
        std::fs::write(&psk, "alice:000102030405060708090a0b0c0d0e0f\n").unwrap();
        let tls = Tls::new(TlsMode::Require, &TlsCredentials::Psk(psk)).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = std::thread::spawn(move || {
            let mut c = SslConnector::builder(SslMethod::tls_client()).unwrap();
            c.set_verify(SslVerifyMode::NONE);
            c.set_psk_client_callback(|_, _, identity, key| {
                identity[..6].copy_from_slice(b"alice\0");
                for (i, k) in key.iter_mut().take(16).enumerate() {
                    *k = i as u8;
                }
                Ok(16)
            });
            let c = c.build();
            let mut config = c.configure().unwrap();
            config.set_verify_hostname(false);
            config.connect("localhost", theirs).unwrap()
        });
        let session = tls.accept(Stream::Unix(ours)).unwrap();
        let mut theirs = client.join().unwrap();
        let (reader, socket) = Transport::split(Channel::Tls(Box::new(session))).unwrap();
        let received = send_all(&socket, move |total| {
            let mut got = vec![0; total];
            theirs.read_exact(&mut got).unwrap();
            // The session's end: a close_notify, then nothing.
            let mut rest = Vec::new();
            theirs.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "bytes after the replies");
            got
        });
        socket.close();
        received();
        drop(reader);
    }

    /// Queues replies of every kind on `socket`, sends them without blocking while
    /// nobody reads, then while `read` (given the bytes expected) takes them on another
    /// thread; returns a check to run once the socket may close.
    fn send_all(
        socket: &Transport,
        read: impl FnOnce(usize) -> Vec<u8> + Send + 'static,
    ) -> impl FnOnce() {
        let budget = Budget::default();
        let mut out = Outbox::default();
        let mut expected = Vec::new();
        for i in 0..40u8 {
            let head = [i; 16];
            expected.extend_from_slice(&head);
            budget.acquire(1);
            match i % 4 {
                0 => {
                    let data = buf_of(64 << 10, i);
                    expected.extend_from_slice(&data);
                    out.push(&budget, socket, &head, Some(data), 1);
                }
                1 => {
                    let data = buf_of(512, i);
                    expected.extend_from_slice(&data);
                    out.push(&budget, socket, &head, Some(data), 1);
                }
                2 => out.push(&budget, socket, &head, None, 1),
                _ => {
                    // A pool's reply: its header and data in one buffer.
                    let reply: Vec<u8> = buf_of(20 << 10, i).to_vec();
                    expected.extend_from_slice(&reply);
                    out.push_reply(&budget, [&head[..], &reply].concat(), 1);
                }
            }
        }
        let total = expected.len();
        // Nobody reads yet: the socket takes a part and refuses the rest for now.
        assert!(
            !out.send(&budget, socket, false),
            "a full socket took it all"
        );
        let reader = std::thread::spawn(move || read(total));
        while !out.send(&budget, socket, false) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        budget.wait_idle();
        assert!(!out.broken);
        assert!(
            !out.spare.is_empty(),
            "sent read buffers are kept for reuse"
        );
        let again = out.read_buffer(64 << 10);
        assert_eq!(again.len(), 64 << 10);
        move || assert!(reader.join().unwrap() == expected, "bytes out of order")
    }
}
