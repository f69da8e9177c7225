//! Recording a new backing file (or none) in the header. No data moves here; the
//! rebase job copies what must be copied first.

use super::header_area::{name_and_pin, read_pin};
use super::image::Image;
use super::layers::Backing;
use crate::block::{BlockDevice, Format};
use crate::error::{Error, IoContext, Result};
use crate::format::geometry::SECTOR_SIZE;
use crate::format::header::{features, HEADER_LEN, MAX_BACKING_NAME_LEN};
use crate::format::pin::{encode_pin, pin_offset, PIN_MAGIC};
use crate::storage::RemoteIdentity;
use std::path::PathBuf;

/// A backing file to record in an image's header.
#[derive(Debug)]
pub struct NewBacking {
    /// The name to store (relative names are relative to the image's directory).
    pub name: String,
    /// The name resolved against the image's directory.
    pub path: PathBuf,
    /// `Some(Raw)` sets NO_PROBE; anything else leaves the format to probing.
    pub format: Option<Format>,
    /// The opened backing device, if the caller has one.
    pub device: Option<Box<dyn BlockDevice>>,
    /// For a backing file on a server, the object to pin the image to (see
    /// [`Image::base_pin`]); when `None`, the device's, if it has one.
    pub pin: Option<RemoteIdentity>,
}

/// The largest backing file name this image's header area can hold.
pub(super) fn max_backing_name_len(image: &Image) -> u64 {
    (image.data_start - HEADER_LEN as u64).min(MAX_BACKING_NAME_LEN.into())
}

/// Records a new backing file (or none) in the header: header and name are written
/// in one write, then flushed. No data is copied; see `ops::rebase` for that.
pub(super) fn set_backing_file(image: &mut Image, new: Option<NewBacking>) -> Result<()> {
    if image.read_only {
        return Err(Error::ReadOnly);
    }
    let pin = new.as_ref().and_then(|b| {
        b.pin
            .clone()
            .or_else(|| b.device.as_ref().and_then(|d| d.remote_identity()))
    });
    write_backing_name(
        image,
        new.as_ref().map(|b| (b.name.as_str(), b.format)),
        pin.as_ref(),
    )?;
    image.backing.replace(new.map(|b| Backing {
        name: b.name,
        path: b.path,
        declared_format: b.format,
        device: b.device,
    }));
    Ok(())
}

/// Makes a layer of the open backing chain the backing file, while the image is in
/// use: `Some((depth, name))` for the layer `depth` down (1 is the current backing
/// file, as [`crate::BlockDevice::backing`] walks the chain), stored in the header as `name`; `None` for no backing file. The header
/// is rewritten and flushed, and from then on unallocated clusters read through to
/// that layer (or as zeros).
///
/// The caller has copied into the image every cluster the layers above it supply
/// (`ops::stream`): what the guest reads does not change. Every allocation in
/// flight finishes first and the image is flushed, so the new header never names
/// less than the entries on disk need.
pub(super) fn cut_backing(image: &Image, keep: Option<(u32, &str)>) -> Result<()> {
    if image.read_only {
        return Err(Error::ReadOnly);
    }
    let (format, pin) = match keep {
        None => (None, None),
        Some((depth, _)) => {
            let mut dev = image.backing_device();
            for _ in 1..depth {
                dev = dev.and_then(|d| d.backing());
            }
            let dev = dev.filter(|_| depth >= 1).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "{}: its backing chain has no layer {depth}",
                    image.name
                ))
            })?;
            (Some(dev.format()), dev.remote_identity())
        }
    };
    let _exclusive = image.alloc.gate_exclusive();
    image.write_back_tables()?;
    image.flush_storage()?;
    let raw = (format == Some(Format::Raw)).then_some(Format::Raw);
    write_backing_name(image, keep.map(|(_, name)| (name, raw)), pin.as_ref())?;
    // Depths count from the layer unallocated clusters read through to now.
    image.backing.cut(keep.map(|(depth, _)| depth));
    Ok(())
}

/// The identity of the remote base this image is pinned to: what the object its
/// backing file name points to was when the image was created on it or first read
/// it. Opening the image refuses another object under that name. `None` when the
/// header area holds no record for the backing file it names now.
pub(super) fn base_pin(image: &Image) -> Result<Option<RemoteIdentity>> {
    let Some(name) = image.header_backing_name() else {
        return Ok(None);
    };
    read_pin(&*image.storage, &image.header(), &name)
        .context(|| format!("reading the header area of {}", image.name))
}

/// Pins the image to `identity`, the remote object its backing file names (see
/// [`Image::base_pin`]): the record is written after the name and flushed.
pub(super) fn set_base_pin(image: &Image, identity: &RemoteIdentity) -> Result<()> {
    if image.read_only {
        return Err(Error::ReadOnly);
    }
    let Some(name) = image.header_backing_name() else {
        return Err(Error::invalid_argument(format!(
            "{}: has no backing file to pin",
            image.name
        )));
    };
    let header = image.header();
    let record = encode_pin(&name, &identity.kept());
    // After the name where the header has it, which QEMU may have put elsewhere
    // than right after the header.
    let at = pin_offset(header.backing_filename_offset, header.backing_filename_size);
    if header.backing_filename_offset < HEADER_LEN as u32
        || at + record.len() as u64 > image.data_start
    {
        return Err(Error::invalid_argument(format!(
            "{}: the header area has no room after the backing file name for the \
             record of the remote base's identity ({} bytes)",
            image.name,
            record.len()
        )));
    }
    image
        .storage
        .write_at(&record, at)
        .and_then(|_| image.storage.flush())
        .context(|| format!("writing the header area of {}", image.name))
}

/// Writes the header naming `backing` (name and format, `Some(Raw)` setting NO_PROBE)
/// or no backing file, with the name after it and the record pinning a remote base
/// after that, in one write, then flushes.
fn write_backing_name(
    image: &Image,
    backing: Option<(&str, Option<Format>)>,
    pin: Option<&RemoteIdentity>,
) -> Result<()> {
    let mut header = image.header();
    // Where the old name's record starts, if it can have one.
    let old_pin = (header.has_backing_file()
        && header.backing_filename_offset >= HEADER_LEN as u32)
        .then(|| pin_offset(header.backing_filename_offset, header.backing_filename_size))
        .filter(|&at| at + PIN_MAGIC.len() as u64 <= image.data_start);
    header.features &= !(features::BACKING_FILE | features::BACKING_FORMAT_NO_PROBE);
    let dropping = backing.is_none();
    let mut bytes = Vec::with_capacity(HEADER_LEN);
    match backing {
        Some((name, format)) => {
            let room = max_backing_name_len(image);
            if name.is_empty() || name.len() as u64 > room {
                return Err(Error::invalid_argument(format!(
                    "backing file name of {} bytes does not fit in the header area: it \
                     must be from 1 to {room} bytes",
                    name.len()
                )));
            }
            header.features |= features::BACKING_FILE;
            if format == Some(Format::Raw) {
                header.features |= features::BACKING_FORMAT_NO_PROBE;
            }
            header.backing_filename_offset = HEADER_LEN as u32;
            header.backing_filename_size = name.len() as u32;
            bytes.extend_from_slice(&header.encode());
            let pin = pin.map(RemoteIdentity::kept);
            let tail = match name_and_pin(image.data_start, name, pin.as_ref()) {
                // No room for the record: the name goes unpinned, as an open that
                // cannot pin leaves it, rather than fail after a stream's copy.
                Err(_) if pin.is_some() => name_and_pin(image.data_start, name, None)?,
                r => r?,
            };
            bytes.extend_from_slice(&tail);
        }
        None => {
            header.backing_filename_offset = 0;
            header.backing_filename_size = 0;
            bytes.extend_from_slice(&header.encode());
        }
    }
    // Keep whatever follows in the last sector touched, as a header rewrite does.
    let len = (bytes.len() as u64).next_multiple_of(SECTOR_SIZE);
    let mut sectors = vec![0u8; len as usize];
    image
        .storage
        .read_at(&mut sectors, 0)
        .context(|| format!("reading the header of {}", image.name))?;
    sectors[..bytes.len()].copy_from_slice(&bytes);
    // An image without a backing file pins nothing: the old record's magic goes too,
    // in a write of its own (a crash between the two leaves either no backing file
    // named or no record: both mean no pin).
    let stale = old_pin.filter(|_| dropping);
    image
        .storage
        .write_at(&sectors, 0)
        .and_then(|_| match stale {
            Some(at) => image.storage.write_at(&[0u8; PIN_MAGIC.len()], at),
            None => Ok(()),
        })
        .and_then(|_| image.storage.flush())
        .context(|| format!("writing the header of {}", image.name))?;
    image.header.set(header);
    image
        .backing
        .set_header_name(backing.map(|(name, _)| name.to_string()));
    Ok(())
}
