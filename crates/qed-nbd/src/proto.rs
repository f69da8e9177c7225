//! Wire constants and message framing of the NBD protocol (fixed newstyle, with
//! structured replies and extended headers), as NetworkBlockDevice/nbd doc/proto.md
//! defines them.

use std::io::{self, Read};

/// "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": starts the handshake and every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Magic of extended transmission requests (after NBD_OPT_EXTENDED_HEADERS).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Bytes of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Magic of extended reply chunks.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// The server may omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zero padding.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Option types (`NBD_OPT_*`) a client sends during the handshake.
pub mod opt {
    /// NBD_OPT_EXPORT_NAME: pick an export and end the handshake; it has no error reply.
    pub const EXPORT_NAME: u32 = 1;
    /// NBD_OPT_ABORT: the client gives up on the handshake.
    pub const ABORT: u32 = 2;
    /// NBD_OPT_LIST: list the exports.
    pub const LIST: u32 = 3;
    /// NBD_OPT_STARTTLS: upgrade the connection to TLS.
    pub const STARTTLS: u32 = 5;
    /// NBD_OPT_INFO: describe an export without picking it.
    pub const INFO: u32 = 6;
    /// NBD_OPT_GO: describe an export and pick it, ending the handshake.
    pub const GO: u32 = 7;
    /// NBD_OPT_STRUCTURED_REPLY: ask for structured replies in transmission.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// NBD_OPT_LIST_META_CONTEXT: list the metadata contexts a query matches.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// NBD_OPT_SET_META_CONTEXT: select metadata contexts for block status.
    pub const SET_META_CONTEXT: u32 = 10;
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests and replies with 64-bit lengths.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); errors have the top bit set.
pub mod rep {
    /// NBD_REP_ACK: the option is done.
    pub const ACK: u32 = 1;
    /// NBD_REP_SERVER: one export of a list.
    pub const SERVER: u32 = 2;
    /// NBD_REP_INFO: one piece of information about an export.
    pub const INFO: u32 = 3;
    /// NBD_REP_META_CONTEXT: one metadata context, with its id.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// NBD_REP_ERR_UNSUP: the option is not known.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// NBD_REP_ERR_POLICY: the option is known but not allowed.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// NBD_REP_ERR_INVALID: the option's data is malformed or out of place.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// NBD_REP_ERR_TLS_REQD: the server requires TLS before this option.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// NBD_REP_ERR_UNKNOWN: no such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// NBD_REP_ERR_SHUTDOWN: the server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    /// NBD_REP_ERR_TOO_BIG: the option's data is longer than the server takes.
    pub const ERR_TOO_BIG: u32 = ERR + 9;
    /// NBD_REP_ERR_EXT_HEADER_REQD: extended headers are in use (or needed) instead.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR + 10;
}

/// Information types (`NBD_INFO_*`) of NBD_OPT_INFO / NBD_OPT_GO.
pub mod info {
    /// NBD_INFO_EXPORT: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// NBD_INFO_NAME: the export's canonical name.
    pub const NAME: u16 = 1;
    /// NBD_INFO_DESCRIPTION: the export's description.
    pub const DESCRIPTION: u16 = 2;
    /// NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`): what an export supports.
pub mod tflag {
    /// NBD_FLAG_HAS_FLAGS: always set.
    pub const HAS_FLAGS: u16 = 1;
    /// NBD_FLAG_READ_ONLY: writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_FLAG_SEND_FLUSH: NBD_CMD_FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_FLAG_SEND_FUA: the FUA command flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// NBD_FLAG_SEND_TRIM: NBD_CMD_TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_FLAG_SEND_WRITE_ZEROES: NBD_CMD_WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_FLAG_SEND_DF: the DF command flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// NBD_FLAG_CAN_MULTI_CONN: a flush on one connection covers all of them.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// NBD_FLAG_SEND_CACHE: NBD_CMD_CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// NBD_FLAG_SEND_FAST_ZERO: the FAST_ZERO command flag is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Request types (`NBD_CMD_*`).
pub mod cmd {
    /// NBD_CMD_READ.
    pub const READ: u16 = 0;
    /// NBD_CMD_WRITE: the payload follows the header.
    pub const WRITE: u16 = 1;
    /// NBD_CMD_DISC: the client disconnects.
    pub const DISC: u16 = 2;
    /// NBD_CMD_FLUSH: make completed writes durable.
    pub const FLUSH: u16 = 3;
    /// NBD_CMD_TRIM: the range's data is no longer needed.
    pub const TRIM: u16 = 4;
    /// NBD_CMD_CACHE: prefetch the range.
    pub const CACHE: u16 = 5;
    /// NBD_CMD_WRITE_ZEROES: zero the range, without a payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// NBD_CMD_BLOCK_STATUS: describe the range in the selected metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cflag {
    /// NBD_CMD_FLAG_FUA: the write is durable before it is acknowledged.
    pub const FUA: u16 = 1;
    /// NBD_CMD_FLAG_NO_HOLE: write zeroes as data, not as a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// NBD_CMD_FLAG_DF: the read's data comes in one chunk.
    pub const DF: u16 = 1 << 2;
    /// NBD_CMD_FLAG_REQ_ONE: one extent per context is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// NBD_CMD_FLAG_FAST_ZERO: fail rather than zero slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// NBD_CMD_FLAG_PAYLOAD_LEN: with extended headers, the length is that of a payload
    /// following the header rather than of the range acted on.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types and flags (`NBD_REPLY_TYPE_*`, `NBD_REPLY_FLAG_*`).
pub mod chunk {
    /// NBD_REPLY_FLAG_DONE: the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
    /// NBD_REPLY_TYPE_NONE: a chunk with no content.
    pub const NONE: u16 = 0;
    /// NBD_REPLY_TYPE_OFFSET_DATA: data read at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// NBD_REPLY_TYPE_OFFSET_HOLE: a run of zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// NBD_REPLY_TYPE_BLOCK_STATUS: the extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// NBD_REPLY_TYPE_BLOCK_STATUS_EXT: the same with 64-bit lengths and values, the
    /// only form with extended headers.
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// NBD_REPLY_TYPE_ERROR: an error value and message.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Error values, as the protocol numbers them (the Linux values).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on the device.
    pub const ENOSPC: u32 = 28;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
}

/// `base:allocation` flag NBD_STATE_HOLE: the range is not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag NBD_STATE_ZERO: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;

/// An option reply: header and data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// One transmission request header: compact (28 bytes) or extended (32 bytes).
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Request type.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the request: of the payload for a write (or with
    /// [`cflag::PAYLOAD_LEN`]), else of the range acted on. 64 bits only with extended
    /// headers.
    pub length: u64,
}

impl Request {
    /// Bytes of a request header in this header style.
    pub fn header_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Reads a request header of the style agreed; `Ok(None)` on a wrong magic (the
    /// client is confused: the connection must be dropped).
    pub fn read(r: &mut impl Read, extended: bool) -> io::Result<Option<Self>> {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        let b = &mut b[..Self::header_len(extended)];
        r.read_exact(b)?;
        Ok(Self::parse(b, extended))
    }

    /// The request in `b` (a header of [`Request::header_len`] bytes), or `None` if its
    /// magic is not the one of the header style agreed, or `b` is not a whole header.
    pub fn parse(b: &[u8], extended: bool) -> Option<Self> {
        if b.len() != Self::header_len(extended) {
            return None;
        }
        let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let be64 = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if be32(0) != magic {
            return None;
        }
        Some(Request {
            flags: be16(4),
            kind: be16(6),
            cookie: be64(8),
            offset: be64(16),
            length: if extended {
                be64(24)
            } else {
                u64::from(be32(24))
            },
        })
    }

    /// Bytes of payload following the header: a write's data, or with extended headers
    /// whatever a request flagged [`cflag::PAYLOAD_LEN`] carries.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.kind == cmd::WRITE || (extended && self.flags & cflag::PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }
}

/// Whom a reply answers and in which header style: the request's cookie and offset
/// (extended replies repeat the offset), and whether extended headers are in use.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset.
    pub offset: u64,
    /// Extended headers were negotiated: every reply is an extended chunk.
    pub extended: bool,
}

impl ReplyTo {
    /// The reply to `req` in the style agreed.
    pub fn new(req: &Request, extended: bool) -> Self {
        Self {
            cookie: req.cookie,
            offset: req.offset,
            extended,
        }
    }
}

/// A simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    m[4..8].copy_from_slice(&error.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m
}

/// Appends a structured reply chunk header to `out`, or with extended headers an
/// extended one.
pub fn chunk_header(out: &mut Vec<u8>, to: &ReplyTo, flags: u16, kind: u16, len: u64) {
    if to.extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&to.cookie.to_be_bytes());
    if to.extended {
        out.extend_from_slice(&to.offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        // Structured chunks carry at most a read's data and a block status of bounded
        // extents, well within 32 bits.
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Appends the header of a final OFFSET_DATA chunk holding `len` bytes read at `offset`;
/// the data follows it.
pub fn last_data_chunk_header(out: &mut Vec<u8>, to: &ReplyTo, offset: u64, len: u64) {
    chunk_header(out, to, chunk::FLAG_DONE, chunk::OFFSET_DATA, 8 + len);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final error chunk to `out`.
pub fn error_chunk(out: &mut Vec<u8>, to: &ReplyTo, error: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    chunk_header(
        out,
        to,
        chunk::FLAG_DONE,
        chunk::ERROR,
        6 + msg.len() as u64,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// The reply of a request that succeeded without data: a simple reply, or with
/// extended headers (which have no simple replies) a final NONE chunk.
pub fn done_reply(to: &ReplyTo) -> Vec<u8> {
    if to.extended {
        let mut out = Vec::with_capacity(32);
        chunk_header(&mut out, to, chunk::FLAG_DONE, chunk::NONE, 0);
        out
    } else {
        simple_reply(to.cookie, 0).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, flags: u16, kind: u16, len: &[u8]) -> Vec<u8> {
        let mut b = magic.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&(5u64 << 30).to_be_bytes());
        b.extend_from_slice(len);
        b
    }

    #[test]
    fn each_header_style_takes_only_its_own_magic_and_size() {
        let compact = header(REQUEST_MAGIC, 0, cmd::READ, &4096u32.to_be_bytes());
        let extended = header(
            EXTENDED_REQUEST_MAGIC,
            0,
            cmd::WRITE_ZEROES,
            &(6u64 << 30).to_be_bytes(),
        );
        let r = Request::parse(&compact, false).unwrap();
        assert_eq!(
            (r.kind, r.cookie, r.offset, r.length),
            (cmd::READ, 7, 5 << 30, 4096)
        );
        let r = Request::parse(&extended, true).unwrap();
        assert_eq!((r.kind, r.length), (cmd::WRITE_ZEROES, 6 << 30));
        assert_eq!(r.payload_len(true), 0);
        assert!(Request::parse(&compact, true).is_none());
        assert!(Request::parse(&extended, false).is_none());
        // The right size with the other style's magic.
        let mut wrong = extended.clone();
        wrong[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        assert!(Request::parse(&wrong, true).is_none());
    }

    #[test]
    fn a_payload_is_a_writes_or_flagged_under_extended_headers_only() {
        let flagged = header(REQUEST_MAGIC, cflag::PAYLOAD_LEN, cmd::TRIM, &[0, 0, 0, 9]);
        // Compact: the flag means nothing here, and no bytes follow.
        assert_eq!(
            Request::parse(&flagged, false).unwrap().payload_len(false),
            0
        );
        let flagged = header(
            EXTENDED_REQUEST_MAGIC,
            cflag::PAYLOAD_LEN,
            cmd::TRIM,
            &9u64.to_be_bytes(),
        );
        assert_eq!(Request::parse(&flagged, true).unwrap().payload_len(true), 9);
        let write = header(REQUEST_MAGIC, 0, cmd::WRITE, &512u32.to_be_bytes());
        assert_eq!(
            Request::parse(&write, false).unwrap().payload_len(false),
            512
        );
    }

    #[test]
    fn extended_replies_repeat_the_offset_and_have_no_simple_form() {
        let to = ReplyTo {
            cookie: 3,
            offset: 1 << 33,
            extended: true,
        };
        let done = done_reply(&to);
        assert_eq!(done.len(), 32);
        assert_eq!(done[..4], EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(done[4..8], [0, 1, 0, 0], "DONE, NONE");
        assert_eq!(done[16..24], (1u64 << 33).to_be_bytes());
        assert_eq!(done[24..32], [0; 8]);
        let mut err = Vec::new();
        error_chunk(&mut err, &to, errno::EINVAL, "no");
        assert_eq!(err.len(), 32 + 8);
        assert_eq!(err[24..32], 8u64.to_be_bytes());
        let compact = ReplyTo {
            extended: false,
            ..to
        };
        assert_eq!(done_reply(&compact), simple_reply(3, 0));
    }
}
