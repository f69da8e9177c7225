//! The header area after the 64-byte header: the backing file name, and after it the
//! record pinning a remote base (see `format::pin`). Plain bytes, read and laid out here
//! for opening, creating and renaming alike.

use crate::error::{Error, Result};
use crate::format::header::HEADER_LEN;
use crate::format::pin::{decode_pin, encode_pin, pin_offset, MAX_PIN_LEN, PIN_MAGIC};
use crate::format::Header;
use crate::storage::{RemoteIdentity, Storage};

/// Reads the record pinning the remote base that `header` names as `name`, if the
/// header area holds one made for that name (see `format::pin`).
pub(super) fn read_pin(
    storage: &dyn Storage,
    header: &Header,
    name: &str,
) -> std::io::Result<Option<RemoteIdentity>> {
    // A name QEMU would read over the header's own fields has no record after it.
    if header.backing_filename_offset < HEADER_LEN as u32 {
        return Ok(None);
    }
    let at = pin_offset(header.backing_filename_offset, header.backing_filename_size);
    let room = header
        .header_bytes()
        .saturating_sub(at)
        .min(MAX_PIN_LEN as u64);
    if room == 0 {
        return Ok(None);
    }
    let mut bytes = vec![0u8; room as usize];
    storage.read_at(&mut bytes, at)?;
    Ok(decode_pin(name, &bytes))
}

/// The header area's bytes from the end of the 64-byte header for a backing file
/// `name` pinned to `pin`: the name, then the record (or, without a pin, zeros over
/// where a record of an older name could be read as this one's).
pub(super) fn name_and_pin(
    header_bytes: u64,
    name: &str,
    pin: Option<&RemoteIdentity>,
) -> Result<Vec<u8>> {
    let at = pin_offset(HEADER_LEN as u32, name.len() as u32);
    let mut bytes = name.as_bytes().to_vec();
    bytes.resize((at - HEADER_LEN as u64) as usize, 0);
    match pin {
        Some(identity) => {
            let record = encode_pin(name, identity);
            if at + record.len() as u64 > header_bytes {
                return Err(Error::invalid_argument(format!(
                    "the header area ({header_bytes} bytes) has no room after the backing \
                     file name for the record of the remote base's identity ({} bytes): \
                     use a shorter name or larger clusters (-o cluster_size=64k)",
                    record.len()
                )));
            }
            bytes.extend_from_slice(&record);
        }
        None => {
            let clear = (header_bytes.saturating_sub(at)).min(PIN_MAGIC.len() as u64);
            bytes.resize(bytes.len() + clear as usize, 0);
        }
    }
    Ok(bytes)
}

/// The bytes after the 64-byte header of a new image: the backing file name, and the
/// record pinning a remote base.
pub(super) fn new_header_tail(
    header_bytes: u64,
    name: Option<&str>,
    pin: Option<&RemoteIdentity>,
) -> Result<Vec<u8>> {
    match name {
        Some(name) if pin.is_some() => name_and_pin(header_bytes, name, pin),
        Some(name) => Ok(name.as_bytes().to_vec()),
        None => Ok(Vec::new()),
    }
}
