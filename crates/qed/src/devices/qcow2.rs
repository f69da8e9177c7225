//! qcow2 images through the imago crate: read-only, or read-write for writing into an
//! existing image.

use crate::block::{check_range, BlockDevice, BlockStatus, Format};
use crate::error::{Error, IoContext, Result};
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::{
    FormatAccess, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate, StorageOpenOptions,
};
use std::path::Path;

/// A qcow2 image (v2 or v3, with its backing chain, zero and compressed clusters),
/// opened read-only or read-write (its backing files stay read-only).
pub struct Qcow2Device {
    access: FormatAccess<File>,
    name: String,
    writable: bool,
    /// Flushes write imago's caches back but do not wait for the disk (cache=unsafe).
    no_flush: bool,
    /// The file and its backing files opened a second time, holding their locks for as
    /// long as the device lives (the driver's own descriptors take none).
    locks: Vec<Box<dyn crate::storage::Storage>>,
}

impl std::fmt::Debug for Qcow2Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Device")
            .field("name", &self.name)
            .finish()
    }
}

impl Qcow2Device {
    /// Opens the qcow2 image at `path` and its backing chain, read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.to_string_lossy().into_owned();
        let driver = Qcow2::<File>::builder_path(path)
            .write(false)
            .open(PermissiveImplicitOpenGate::default())
            .context(|| format!("opening qcow2 image {name}"))?;
        Ok(Self {
            access: FormatAccess::new(driver),
            name,
            writable: false,
            no_flush: false,
            locks: Vec::new(),
        })
    }

    /// Opens the qcow2 image at `path` for writing (with O_DIRECT when `direct`); its
    /// backing chain is opened read-only. With `no_flush`, a flush writes imago's cached
    /// metadata to the file but does not wait for the disk.
    pub fn open_writable(path: &Path, direct: bool, no_flush: bool) -> Result<Self> {
        let name = path.to_string_lossy().into_owned();
        let driver = Qcow2::<File>::builder_path(path)
            .write(true)
            .storage_open_options(StorageOpenOptions::new().direct(direct))
            .open(PermissiveImplicitOpenGate::default())
            .context(|| format!("opening qcow2 image {name} for writing"))?;
        Ok(Self {
            access: FormatAccess::new(driver),
            name,
            writable: true,
            no_flush,
            locks: Vec::new(),
        })
    }

    /// The device, keeping `locks` (its file and its backing files, opened with the
    /// locks their use takes) for as long as it lives.
    pub(crate) fn holding(self, locks: Vec<Box<dyn crate::storage::Storage>>) -> Self {
        Self { locks, ..self }
    }
}

impl BlockDevice for Qcow2Device {
    fn release_file_locks(&self) {
        for l in &self.locks {
            l.release_locks()
        }
    }

    fn size(&self) -> u64 {
        self.access.size()
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn filename(&self) -> &str {
        &self.name
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.access
            .read(&mut *buf, offset)
            .context(|| format!("reading {} bytes at {offset} of {}", buf.len(), self.name))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size())?;
        self.access
            .write(buf, offset)
            .context(|| format!("writing {} bytes at {offset} of {}", buf.len(), self.name))
    }

    /// Whole clusters become zero clusters (version 3); the rest, and everything in a
    /// version 2 image (which has no zero clusters), is written as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        let context = || format!("writing {len} zero bytes at {offset} of {}", self.name);
        match self.access.write_zeroes(offset, len) {
            // imago checks the version before it changes anything.
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
            r => return r.context(context),
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.access.write(&zeros[..n], pos).context(context)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Nothing is given back: imago's discards need the device to itself, and a caller
    /// may be reading through it meanwhile.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.access
            .flush()
            .context(|| format!("writing back the metadata of {}", self.name))?;
        if self.no_flush {
            return Ok(());
        }
        self.access
            .sync()
            .context(|| format!("flushing {}", self.name))
    }

    /// The whole chain is resolved here: runs are data (stored anywhere in the chain, or
    /// compressed) or zero.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size())?;
        let (mapping, n) = self
            .access
            .get_mapping(offset, len)
            .context(|| format!("looking up {offset} in {}", self.name))?;
        let zero = matches!(mapping, Mapping::Zero { .. } | Mapping::Eof { .. });
        Ok(BlockStatus {
            len: n.clamp(1, len.max(1)),
            allocated: true,
            data: !zero,
            zero,
            offset: None,
        })
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }
}
