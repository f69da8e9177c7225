//! Recording a new backing file (or none) in the header. No data moves here; the
//! rebase job copies what must be copied first.

use super::image::{Backing, Image};
use crate::block::{BlockDevice, Format};
use crate::error::{Error, IoContext, Result};
use crate::format::geometry::SECTOR_SIZE;
use crate::format::header::{features, HEADER_LEN, MAX_BACKING_NAME_LEN};
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
}

impl Image {
    /// The largest backing file name this image's header area can hold.
    pub fn max_backing_name_len(&self) -> u64 {
        (self.data_start - HEADER_LEN as u64).min(MAX_BACKING_NAME_LEN.into())
    }

    /// Records a new backing file (or none) in the header: header and name are written
    /// in one write, then flushed. No data is copied; see `ops::rebase` for that.
    pub fn set_backing_file(&mut self, new: Option<NewBacking>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut header = self.header();
        header.features &= !(features::BACKING_FILE | features::BACKING_FORMAT_NO_PROBE);
        let mut bytes = Vec::with_capacity(HEADER_LEN);
        match &new {
            Some(b) => {
                let room = self.max_backing_name_len();
                if b.name.is_empty() || b.name.len() as u64 > room {
                    return Err(Error::invalid_argument(format!(
                        "backing file name of {} bytes does not fit in the header area: it \
                         must be from 1 to {room} bytes",
                        b.name.len()
                    )));
                }
                header.features |= features::BACKING_FILE;
                if b.format == Some(Format::Raw) {
                    header.features |= features::BACKING_FORMAT_NO_PROBE;
                }
                header.backing_filename_offset = HEADER_LEN as u32;
                header.backing_filename_size = b.name.len() as u32;
                bytes.extend_from_slice(&header.encode());
                bytes.extend_from_slice(b.name.as_bytes());
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
        self.storage
            .read_at(&mut sectors, 0)
            .context(|| format!("reading the header of {}", self.name))?;
        sectors[..bytes.len()].copy_from_slice(&bytes);
        self.storage
            .write_at(&sectors, 0)
            .and_then(|_| self.storage.flush())
            .context(|| format!("writing the header of {}", self.name))?;
        self.header.set(header);
        self.backing = new.map(|b| Backing {
            name: b.name,
            path: b.path,
            declared_format: b.format,
            device: b.device,
        });
        Ok(())
    }
}
