//! Writing a new, empty image exactly as `qemu-img create -f qed` does.

use super::header_area::new_header_tail;
use crate::block::Format;
use crate::error::{Error, IoContext, Result};
use crate::format::geometry::{DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, SECTOR_SIZE};
use crate::format::header::{HEADER_LEN, MAX_BACKING_NAME_LEN};
use crate::format::{Geometry, Header};
use crate::storage::{RemoteIdentity, Storage};

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes; rounded up to a multiple of 512.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Table size in clusters.
    pub table_size: u32,
    /// Backing file name as it will be stored (relative names are relative to the image).
    pub backing_file: Option<String>,
    /// Format of the backing file. `Raw` sets NO_PROBE; anything else is probed at open.
    pub backing_format: Option<Format>,
}

impl CreateOptions {
    /// Default geometry, no backing file.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            table_size: DEFAULT_TABLE_SIZE,
            backing_file: None,
            backing_format: None,
        }
    }

    /// The header these options produce, after validating them.
    pub fn header(&self) -> Result<Header> {
        let geometry = Geometry::new(self.cluster_size, self.table_size)
            .map_err(|e| Error::invalid_argument(format!("invalid create options: {e}")))?;
        let size = self
            .size
            .checked_next_multiple_of(SECTOR_SIZE)
            .filter(|&s| s <= geometry.max_image_size())
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "size {} is too large: with cluster_size={} and table_size={} the \
                     maximum is {} bytes",
                    self.size,
                    self.cluster_size,
                    self.table_size,
                    geometry.max_image_size()
                ))
            })?;
        let name_len = match &self.backing_file {
            None => None,
            Some(name) => {
                let room = (u64::from(self.cluster_size) - HEADER_LEN as u64)
                    .min(MAX_BACKING_NAME_LEN.into());
                if name.is_empty() || name.len() as u64 > room {
                    return Err(Error::invalid_argument(format!(
                        "backing file name of {} bytes does not fit: it must be from 1 to \
                         {room} bytes",
                        name.len()
                    )));
                }
                Some(name.len() as u32)
            }
        };
        Ok(Header::new_for_create(
            geometry,
            size,
            name_len,
            self.backing_format == Some(Format::Raw),
        ))
    }

    /// Reasons QEMU would refuse to open the image these options describe.
    pub fn qemu_incompatibilities(&self) -> Vec<String> {
        let mut why = Vec::new();
        if let Ok(g) = Geometry::new(self.cluster_size, self.table_size) {
            if self.table_size == 1 {
                why.push(
                    "QEMU cannot open images with table_size=1 (its table offset check \
                     rejects them)"
                        .to_string(),
                );
            }
            if g.qemu_max_image_size() == 0 {
                why.push(format!(
                    "QEMU refuses every image with cluster_size={} and table_size={} (its \
                     maximum size computation overflows)",
                    self.cluster_size, self.table_size
                ));
            }
        }
        why
    }
}

/// Writes the header cluster and a zeroed L1 table into empty `storage`, with the record
/// pinning the remote base `pin` after the backing file name.
pub(crate) fn create_on(
    storage: &dyn Storage,
    opts: &CreateOptions,
    pin: Option<&RemoteIdentity>,
) -> Result<()> {
    let header = opts.header()?;
    let geometry = header.validate(u64::MAX)?;
    let mut first = header.encode().to_vec();
    first.extend_from_slice(&new_header_tail(
        header.header_bytes(),
        opts.backing_file.as_deref(),
        pin.map(RemoteIdentity::kept).as_ref(),
    )?);
    // The file length is the allocation map: it must end right after the L1 table. The
    // rest of the header cluster and the L1 table read as zeros without being written.
    storage
        .set_len(0)
        .and_then(|_| storage.write_at(&first, 0))
        .and_then(|_| storage.set_len(header.l1_table_offset + geometry.table_bytes()))
        .context(|| "writing the new image".to_string())
}
