//! A raw file as a device.

use crate::block::{
    check_range, BlockDevice, BlockStatus, DirectExtent, DirectRead, Format, PendingWrite,
};
use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;

/// A raw disk image: guest offset equals storage offset. Its size is fixed at open.
#[derive(Debug)]
pub struct RawDevice {
    storage: Box<dyn Storage>,
    size: u64,
    read_only: bool,
    name: String,
}

impl RawDevice {
    /// Wraps storage as a raw device of its current length.
    pub fn new(storage: Box<dyn Storage>, name: String, read_only: bool) -> Result<Self> {
        let size = storage
            .len()
            .context(|| format!("reading the size of {name}"))?;
        Ok(Self {
            storage,
            size,
            read_only,
            name,
        })
    }

    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}

impl BlockDevice for RawDevice {
    fn release_file_locks(&self) {
        self.storage.release_locks()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn remote_identity(&self) -> Option<crate::storage::RemoteIdentity> {
        self.storage.remote_identity()
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn filename(&self) -> &str {
        &self.name
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.storage
            .read_at(buf, offset)
            .context(|| format!("reading {} bytes at {offset} of {}", buf.len(), self.name))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable(offset, buf.len() as u64)?;
        self.storage
            .write_at(buf, offset)
            .context(|| format!("writing {} bytes at {offset} of {}", buf.len(), self.name))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable(offset, len)?;
        self.storage
            .zero_range(offset, len)
            .context(|| format!("zeroing {len} bytes at {offset} of {}", self.name))
    }

    /// Zeroing punches a hole, which is fast wherever the filesystem supports it.
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> Result<bool> {
        check_range(offset, len, self.size)?;
        Ok(true)
    }

    /// Punches a hole: the range reads as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage
            .flush()
            .context(|| format!("flushing {}", self.name))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size)?;
        let (zero, n) = self
            .storage
            .zero_status(offset, len)
            .context(|| format!("querying holes of {}", self.name))?;
        Ok(BlockStatus {
            len: n.clamp(1, len.max(1)),
            allocated: true,
            data: !zero,
            zero,
            offset: Some(offset),
        })
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }

    fn begin_write(&self, offset: u64, len: u64) -> Option<PendingWrite<'_>> {
        let x = self.direct_extent(offset, len, true)?;
        let hold = self.storage.try_hold_blocks(x.offset, len)?;
        Some(PendingWrite::new(x, 0..0, move |_| {
            drop(hold);
            Ok(())
        }))
    }

    fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<DirectExtent> {
        if (write && self.read_only) || check_range(offset, len, self.size).is_err() {
            return None;
        }
        let (fd, align) = self.storage.direct_fd()?;
        Some(DirectExtent { fd, offset, align })
    }

    fn begin_read(&self, offset: u64, len: u64) -> Option<DirectRead<'_>> {
        if check_range(offset, len, self.size).is_err() {
            return None;
        }
        // Per range: a remote raw base's bytes are in a file only where its host cache
        // has them.
        let span = self.storage.direct_span(offset, len)?;
        let extent = DirectExtent {
            fd: span.fd,
            offset: span.offset,
            align: span.align,
        };
        Some(DirectRead::held(extent, span.keep))
    }
}
