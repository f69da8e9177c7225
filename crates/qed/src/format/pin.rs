//! The record that pins a remote base: what the object an overlay was written against
//! was (its size, and its ETag or else its Last-Modified), kept in the overlay's header
//! area right after the backing file name, so that another process opening the overlay
//! refuses a replaced object instead of mixing the two.
//!
//! QEMU ignores the bytes after the name and keeps them: it rewrites only the 64 header
//! bytes of the first sector, or the header and a new name when the backing file
//! changes. A change of name made by QEMU can leave a record behind or cut one in two,
//! so a record proves which name it belongs to: its checksum covers that name, and a
//! record is looked for only where the current name ends. Anything else found there
//! (zeros, the tail of an older name, a record of another name, a torn record) is no
//! record at all.
//!
//! Layout (little-endian), at the name's end rounded up to 8 bytes:
//!
//! ```text
//! 0x00  8  magic "QEDpin\0\x01"
//! 0x08  8  the object's size in bytes
//! 0x10  1  what follows: 0 nothing (size only), 1 ETag, 2 Last-Modified
//! 0x11  1  0
//! 0x12  2  N, the length of the value (at most 1024)
//! 0x14  4  0
//! 0x18  N  the value, as the server sent it
//! ..   32  SHA-256 of the backing file name followed by bytes 0x00..0x18+N
//! ```

use crate::storage::RemoteIdentity;
use sha2::{Digest, Sha256};

/// The record's first bytes.
pub const PIN_MAGIC: [u8; 8] = *b"QEDpin\0\x01";
/// Longest ETag or Last-Modified kept; a longer one is not kept (the size still is).
pub const MAX_PIN_VALUE: usize = 1024;
/// Bytes before the value.
const FIXED: usize = 0x18;
/// Bytes of the checksum.
const SUM: usize = 32;
/// Longest record.
pub const MAX_PIN_LEN: usize = FIXED + MAX_PIN_VALUE + SUM;

const KIND_SIZE: u8 = 0;
const KIND_ETAG: u8 = 1;
const KIND_LAST_MODIFIED: u8 = 2;

/// Where the record of a backing name stored at `name_offset`, `name_len` bytes long,
/// starts.
pub fn pin_offset(name_offset: u32, name_len: u32) -> u64 {
    (u64::from(name_offset) + u64::from(name_len)).next_multiple_of(8)
}

/// The record pinning `identity` for the backing file `name`.
pub fn encode_pin(name: &str, identity: &RemoteIdentity) -> Vec<u8> {
    let (kind, value) = match (&identity.etag, &identity.last_modified) {
        (Some(tag), _) if tag.len() <= MAX_PIN_VALUE => (KIND_ETAG, tag.as_bytes()),
        (None, Some(date)) if date.len() <= MAX_PIN_VALUE => (KIND_LAST_MODIFIED, date.as_bytes()),
        _ => (KIND_SIZE, &[][..]),
    };
    let mut rec = Vec::with_capacity(FIXED + value.len() + SUM);
    rec.extend_from_slice(&PIN_MAGIC);
    rec.extend_from_slice(&identity.size.to_le_bytes());
    rec.push(kind);
    rec.push(0);
    rec.extend_from_slice(&(value.len() as u16).to_le_bytes());
    rec.extend_from_slice(&[0; 4]);
    rec.extend_from_slice(value);
    let sum = checksum(name, &rec);
    rec.extend_from_slice(&sum);
    rec
}

/// The identity a record pins, when `bytes` (read where the record of `name` would
/// start, possibly more than the record) hold a whole, intact record made for `name`.
pub fn decode_pin(name: &str, bytes: &[u8]) -> Option<RemoteIdentity> {
    if bytes.len() < FIXED + SUM || bytes[..8] != PIN_MAGIC {
        return None;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&bytes[8..16]);
    let size = u64::from_le_bytes(size);
    let kind = bytes[0x10];
    let len = usize::from(u16::from_le_bytes([bytes[0x12], bytes[0x13]]));
    if bytes[0x11] != 0 || bytes[0x14..0x18] != [0; 4] || len > MAX_PIN_VALUE {
        return None;
    }
    let end = FIXED + len;
    let sum = bytes.get(end..end + SUM)?;
    if checksum(name, &bytes[..end]).as_slice() != sum {
        return None;
    }
    let value = std::str::from_utf8(&bytes[FIXED..end]).ok()?.to_string();
    let (etag, last_modified) = match (kind, len) {
        (KIND_SIZE, 0) => (None, None),
        (KIND_ETAG, 1..) => (Some(value), None),
        (KIND_LAST_MODIFIED, 1..) => (None, Some(value)),
        _ => return None,
    };
    Some(RemoteIdentity {
        size,
        etag,
        last_modified,
    })
}

fn checksum(name: &str, record: &[u8]) -> [u8; SUM] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(record);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(etag: Option<&str>, lm: Option<&str>) -> RemoteIdentity {
        RemoteIdentity {
            size: 1 << 30,
            etag: etag.map(str::to_string),
            last_modified: lm.map(str::to_string),
        }
    }

    #[test]
    fn records_round_trip_for_their_name_only() {
        let name = "s3://b/base.qed";
        for identity in [
            id(Some("\"abc\""), None),
            id(None, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            id(None, None),
        ] {
            let mut rec = encode_pin(name, &identity);
            assert!(rec.len() <= MAX_PIN_LEN);
            assert_eq!(decode_pin(name, &rec), Some(identity.clone()));
            // Trailing bytes (the rest of the header area) do not matter.
            rec.extend_from_slice(&[0xee; 100]);
            assert_eq!(decode_pin(name, &rec), Some(identity.clone()));
            assert_eq!(decode_pin("s3://b/base.qeD", &rec), None);
            assert_eq!(decode_pin("", &rec), None);
        }
    }

    #[test]
    fn torn_or_altered_records_are_no_records() {
        let name = "http://h/base";
        let rec = encode_pin(name, &id(Some("\"x\""), None));
        for cut in 0..rec.len() {
            assert_eq!(decode_pin(name, &rec[..cut]), None, "cut at {cut}");
        }
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x10;
            assert_eq!(decode_pin(name, &bad), None, "byte {i}");
        }
        assert_eq!(decode_pin(name, &[0u8; 200]), None);
        // A value length past the limit is refused before it is used.
        let mut long = rec.clone();
        long[0x12..0x14].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(decode_pin(name, &long), None);
    }

    #[test]
    fn a_value_too_long_to_keep_leaves_the_size() {
        let tag = "x".repeat(MAX_PIN_VALUE + 1);
        let rec = encode_pin("n", &id(Some(&tag), None));
        assert_eq!(decode_pin("n", &rec), Some(id(None, None)));
    }

    #[test]
    fn records_start_at_the_names_end_rounded_to_8() {
        assert_eq!(pin_offset(0x40, 0), 0x40);
        assert_eq!(pin_offset(0x40, 1), 0x48);
        assert_eq!(pin_offset(0x40, 8), 0x48);
        assert_eq!(pin_offset(u32::MAX, u32::MAX), 0x2_0000_0000);
    }
}
