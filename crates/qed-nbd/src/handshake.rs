//! The fixed newstyle handshake: option haggling until the client picks the export.

use crate::export::{Export, MAX_PAYLOAD, PREFERRED_BLOCK};
use crate::proto::{self, info, opt, rep, tflag, IHAVEOPT};
use crate::session::{MetaContext, Session};
use crate::stream::Stream;
use crate::tls::{Tls, TlsMode};
use crate::transport::Channel;
use std::io::{self, Read, Write};
use std::ops::ControlFlow::{self, Break, Continue};
use std::time::Instant;

/// Largest option payload accepted; longer ones get NBD_REP_ERR_TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longer option payloads are not even skipped: the connection is dropped.
const MAX_SKIPPABLE_LEN: u32 = 16 << 20;
/// Most options a client may send before it must pick an export.
const MAX_OPTIONS: usize = 1000;

/// Why the handshake ended without a session: the client aborted, asked for an unknown
/// export with NBD_OPT_EXPORT_NAME, or the server is shutting down.
#[derive(Debug)]
pub struct Closed;

/// Handshake outcome: a session on its connection, a clean close, or an I/O or protocol
/// error (a failed TLS handshake among them).
pub type Outcome = io::Result<Result<(Channel, Session), Closed>>;

/// How the haggling goes on after an option: on to the next, or over with this outcome.
type Next = ControlFlow<Result<Session, Closed>>;

/// The server's side of the handshake, between the greeting and the export chosen.
struct Haggler<'a> {
    channel: Channel,
    export: &'a Export,
    /// The TLS policy and credentials; `None` is TLS off.
    tls: Option<&'a Tls>,
    deadline: Instant,
    session: Session,
    /// The client asked to be spared the zero padding after NBD_OPT_EXPORT_NAME.
    no_zeroes: bool,
    /// The server serves more than one client at once.
    multi_conn: bool,
}

/// Runs the handshake. The whole of it, a TLS handshake included, must finish before
/// `deadline`. `multi_conn` says whether the server serves more than one client at
/// once: only then is CAN_MULTI_CONN offered.
pub fn handshake(
    stream: Stream,
    export: &Export,
    tls: Option<&Tls>,
    deadline: Instant,
    multi_conn: bool,
    shutting_down: &dyn Fn() -> bool,
) -> Outcome {
    let mut h = Haggler {
        channel: Channel::Plain(stream),
        export,
        tls,
        deadline,
        session: Session::default(),
        no_zeroes: false,
        multi_conn,
    };
    h.greet()?;
    for _ in 0..MAX_OPTIONS {
        let Some((option, data)) = h.read_option()? else {
            continue;
        };
        if shutting_down() && option != opt::ABORT {
            h.refuse_shutting_down(option)?;
            return Ok(Err(Closed));
        }
        if let Break(outcome) = h.answer(option, &data)? {
            return Ok(outcome.map(|session| (h.channel, session)));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "too many options",
    ))
}

/// Splits a length-prefixed string off the front of `data`.
fn take_string(data: &mut &[u8]) -> Option<Vec<u8>> {
    if data.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let rest = &data[4..];
    if len > rest.len() {
        return None;
    }
    let s = rest[..len].to_vec();
    *data = &rest[len..];
    Some(s)
}

impl Haggler<'_> {
    /// Sends the server's greeting and takes the client's flags.
    fn greet(&mut self) -> io::Result<()> {
        let mut greeting = Vec::with_capacity(18);
        greeting.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting
            .extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        self.send(&greeting)?;
        let client_flags = self.read_u32()?;
        if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown client flags {client_flags:#x}"),
            ));
        }
        self.no_zeroes = client_flags & proto::CLIENT_NO_ZEROES != 0;
        Ok(())
    }

    /// Reads the next option and its data; `None` for one too long to take, which has
    /// been skipped and answered already.
    fn read_option(&mut self) -> io::Result<Option<(u32, Vec<u8>)>> {
        if self.read_u64()? != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "option without the IHAVEOPT magic",
            ));
        }
        let option = self.read_u32()?;
        let len = self.read_u32()?;
        if len > MAX_OPTION_LEN {
            // EXPORT_NAME has no error reply: the only answer is to hang up.
            if len > MAX_SKIPPABLE_LEN || option == opt::EXPORT_NAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("option {option} of {len} bytes"),
                ));
            }
            self.skip(len.into())?;
            self.reply(option, rep::ERR_TOO_BIG, b"option data too long")?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        self.read_full(&mut data)?;
        Ok(Some((option, data)))
    }

    /// Ends the handshake of a server that is shutting down, telling the client why
    /// where the option has an error reply.
    fn refuse_shutting_down(&mut self, option: u32) -> io::Result<()> {
        if option != opt::EXPORT_NAME {
            self.reply(option, rep::ERR_SHUTDOWN, b"the server is shutting down")?;
        }
        Ok(())
    }

    /// The export's transmission flags for this client. A client told it may open
    /// several connections (nbdcopy opens four) would wait forever for the ones a
    /// server of one client at a time never accepts: CAN_MULTI_CONN only goes with more.
    fn flags(&self) -> u16 {
        let flags = self.export.flags(self.session.structured);
        if self.multi_conn {
            flags
        } else {
            flags & !tflag::CAN_MULTI_CONN
        }
    }

    fn tls_mode(&self) -> TlsMode {
        self.tls.map_or(TlsMode::Off, Tls::mode)
    }

    /// Answers one option.
    fn answer(&mut self, option: u32, data: &[u8]) -> io::Result<Next> {
        if option == opt::STARTTLS {
            self.starttls(data)?;
            return Ok(Continue(()));
        }
        if self.tls_mode() == TlsMode::Require && !self.channel.is_tls() && option != opt::ABORT {
            // Nothing about the export before TLS: no list, no description, no data.
            if option == opt::EXPORT_NAME {
                // It has no error reply: the only answer is to hang up.
                return Ok(Break(Err(Closed)));
            }
            self.reply(
                option,
                rep::ERR_TLS_REQD,
                b"TLS is required: use NBD_OPT_STARTTLS",
            )?;
            return Ok(Continue(()));
        }
        match option {
            opt::EXPORT_NAME => return self.export_name(data).map(Break),
            opt::ABORT => {
                // The client may already be gone; the reply is a courtesy.
                let _ = self.reply(option, rep::ACK, &[]);
                return Ok(Break(Err(Closed)));
            }
            opt::LIST => self.list(data)?,
            opt::INFO | opt::GO => {
                if self.info_or_go(option, data)? && option == opt::GO {
                    return Ok(Break(Ok(std::mem::take(&mut self.session))));
                }
            }
            opt::STRUCTURED_REPLY => self.structured_reply(data)?,
            opt::EXTENDED_HEADERS => self.extended_headers(data)?,
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, data)?,
            _ => self.reply(option, rep::ERR_UNSUP, b"option not supported")?,
        }
        Ok(Continue(()))
    }

    /// Answers NBD_OPT_STARTTLS: after its ACK the TLS handshake runs, and the haggling
    /// starts again inside TLS. A failed TLS handshake ends the connection.
    fn starttls(&mut self, data: &[u8]) -> io::Result<()> {
        let option = opt::STARTTLS;
        let Some(tls) = self.tls.filter(|t| t.mode() != TlsMode::Off) else {
            return self.reply(
                option,
                rep::ERR_POLICY,
                b"TLS is not enabled on this server",
            );
        };
        if self.channel.is_tls() {
            // As the protocol says of a second STARTTLS.
            return self.reply(option, rep::ERR_INVALID, b"TLS is already negotiated");
        }
        if !data.is_empty() {
            return self.reply(option, rep::ERR_INVALID, b"NBD_OPT_STARTTLS takes no data");
        }
        self.reply(option, rep::ACK, &[])?;
        let Channel::Plain(stream) = std::mem::replace(&mut self.channel, Channel::Gone) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        // The socket's read timeout keeps the TLS handshake within the deadline too.
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake took too long",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        self.channel = Channel::Tls(Box::new(tls.accept(stream)?));
        // What was agreed in plain text does not carry over into TLS.
        self.session = Session::default();
        Ok(())
    }

    /// Answers NBD_OPT_EXPORT_NAME, which ends the handshake either way: the export's
    /// size and flags, or a hang-up for an unknown name (the option has no error reply).
    fn export_name(&mut self, name: &[u8]) -> io::Result<Result<Session, Closed>> {
        // A client that asked for extended headers must pick with NBD_OPT_GO, which can
        // say it agreed to them; this option cannot be refused but by hanging up.
        if !self.export.matches(name) || self.session.extended {
            return Ok(Err(Closed));
        }
        let mut m = Vec::with_capacity(10 + 124);
        m.extend_from_slice(&self.export.device.size().to_be_bytes());
        m.extend_from_slice(&self.flags().to_be_bytes());
        if !self.no_zeroes {
            m.extend_from_slice(&[0u8; 124]);
        }
        self.send(&m)?;
        Ok(Ok(std::mem::take(&mut self.session)))
    }

    /// Answers NBD_OPT_LIST with the one export.
    fn list(&mut self, data: &[u8]) -> io::Result<()> {
        let option = opt::LIST;
        if !data.is_empty() {
            return self.reply(option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data");
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(self.export.name.len() as u32).to_be_bytes());
        d.extend_from_slice(self.export.name.as_bytes());
        d.extend_from_slice(self.export.description.as_bytes());
        self.reply(option, rep::SERVER, &d)?;
        self.reply(option, rep::ACK, &[])
    }

    /// Answers NBD_OPT_STRUCTURED_REPLY, which may be negotiated once.
    fn structured_reply(&mut self, data: &[u8]) -> io::Result<()> {
        let option = opt::STRUCTURED_REPLY;
        if !data.is_empty() {
            self.reply(
                option,
                rep::ERR_INVALID,
                b"NBD_OPT_STRUCTURED_REPLY takes no data",
            )
        } else if self.session.extended {
            self.reply(
                option,
                rep::ERR_EXT_HEADER_REQD,
                b"extended headers already negotiated",
            )
        } else if self.session.structured {
            self.reply(
                option,
                rep::ERR_INVALID,
                b"structured replies already negotiated",
            )
        } else {
            self.session.structured = true;
            self.reply(option, rep::ACK, &[])
        }
    }

    /// Answers NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths and
    /// extended replies, which include all that structured replies give. Negotiated once.
    fn extended_headers(&mut self, data: &[u8]) -> io::Result<()> {
        let option = opt::EXTENDED_HEADERS;
        if !data.is_empty() {
            self.reply(
                option,
                rep::ERR_INVALID,
                b"NBD_OPT_EXTENDED_HEADERS takes no data",
            )
        } else if self.session.extended {
            self.reply(
                option,
                rep::ERR_INVALID,
                b"extended headers already negotiated",
            )
        } else {
            self.session.extended = true;
            self.session.structured = true;
            self.reply(option, rep::ACK, &[])
        }
    }

    /// Fills `buf` from the client before the handshake's deadline. Each read waits at
    /// most for what is left of the handshake's time, so a client that trickles bytes
    /// cannot stretch it.
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "handshake took too long");
        let mut done = 0;
        while done < buf.len() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            self.channel.socket()?.set_read_timeout(Some(left))?;
            match self.channel.read(&mut buf[done..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_full(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_full(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads and drops `len` bytes of option data.
    fn skip(&mut self, mut len: u64) -> io::Result<()> {
        let mut scratch = vec![0u8; MAX_OPTION_LEN as usize];
        while len > 0 {
            let n = len.min(scratch.len() as u64) as usize;
            self.read_full(&mut scratch[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.channel.write_all(bytes)?;
        self.channel.flush()
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let m = proto::option_reply(option, kind, data);
        self.send(&m)
    }

    /// Answers NBD_OPT_INFO or NBD_OPT_GO; returns whether it succeeded.
    fn info_or_go(&mut self, option: u32, data: &[u8]) -> io::Result<bool> {
        let mut rest = data;
        let Some(name) = take_string(&mut rest) else {
            self.reply(option, rep::ERR_INVALID, b"malformed export name")?;
            return Ok(false);
        };
        if rest.len() < 2 {
            self.reply(
                option,
                rep::ERR_INVALID,
                b"missing information request count",
            )?;
            return Ok(false);
        }
        let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let requests = &rest[2..];
        if requests.len() != n * 2 {
            self.reply(
                option,
                rep::ERR_INVALID,
                b"information request count mismatch",
            )?;
            return Ok(false);
        }
        if !self.export.matches(&name) {
            self.reply(option, rep::ERR_UNKNOWN, b"no such export")?;
            return Ok(false);
        }
        let wanted: Vec<u16> = requests
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&info::EXPORT.to_be_bytes());
        export.extend_from_slice(&self.export.device.size().to_be_bytes());
        export.extend_from_slice(&self.flags().to_be_bytes());
        self.reply(option, rep::INFO, &export)?;
        if wanted.contains(&info::NAME) {
            let mut d = info::NAME.to_be_bytes().to_vec();
            d.extend_from_slice(self.export.name.as_bytes());
            self.reply(option, rep::INFO, &d)?;
        }
        if wanted.contains(&info::DESCRIPTION) && !self.export.description.is_empty() {
            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(self.export.description.as_bytes());
            self.reply(option, rep::INFO, &d)?;
        }
        // Block sizes are sent unasked too: the defaults they state need no promise.
        let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.reply(option, rep::INFO, &d)?;
        self.reply(option, rep::ACK, &[])?;
        Ok(true)
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let setting = option == opt::SET_META_CONTEXT;
        if setting {
            // Setting replaces the selection, even when it fails.
            self.session.contexts.clear();
        }
        if !self.session.structured {
            return self.reply(
                option,
                rep::ERR_INVALID,
                b"negotiate structured replies first",
            );
        }
        let mut rest = data;
        let Some(name) = take_string(&mut rest) else {
            return self.reply(option, rep::ERR_INVALID, b"malformed export name");
        };
        if rest.len() < 4 {
            return self.reply(option, rep::ERR_INVALID, b"missing query count");
        }
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        let mut queries = Vec::new();
        for _ in 0..n {
            match take_string(&mut rest) {
                Some(q) => queries.push(q),
                None => return self.reply(option, rep::ERR_INVALID, b"malformed query"),
            }
        }
        if !rest.is_empty() {
            return self.reply(option, rep::ERR_INVALID, b"trailing data after the queries");
        }
        if !self.export.matches(&name) {
            return self.reply(option, rep::ERR_UNKNOWN, b"no such export");
        }
        let mut found: Vec<MetaContext> = Vec::new();
        if queries.is_empty() && !setting {
            found = vec![MetaContext::Allocation, MetaContext::AllocationDepth];
        }
        for q in &queries {
            for c in MetaContext::matching(q, !setting) {
                if !found.contains(&c) {
                    found.push(c);
                }
            }
        }
        for c in &found {
            let mut d = if setting { c.id() } else { 0 }.to_be_bytes().to_vec();
            d.extend_from_slice(c.name().as_bytes());
            self.reply(option, rep::META_CONTEXT, &d)?;
        }
        if setting {
            self.session.contexts = found;
        }
        self.reply(option, rep::ACK, &[])
    }
}
