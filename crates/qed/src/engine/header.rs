//! The header in memory, and the NEED_CHECK protocol: the one change to the header that
//! happens while the image is in use.
//!
//! Without a backing file, an allocation's L2 entry may reach the disk before its data
//! (entries are written back, not through), so before the first data allocation after
//! the image was clean the bit is set, durably; a crash then makes the next open check
//! the image. The bit is cleared once every allocation in flight has its metadata
//! written and flushed: by a flush holding the allocation gate exclusively, at close, or
//! by a successful repair. An image opened with the bit set and not checked since keeps
//! it: its metadata may be inconsistent.

use crate::error::{IoContext, Result};
use crate::format::geometry::SECTOR_SIZE;
use crate::format::header::{features, HEADER_LEN};
use crate::format::Header;
use crate::storage::Storage;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

/// The header as the image knows it, and the NEED_CHECK protocol's state.
#[derive(Debug)]
pub(super) struct HeaderCell {
    header: RwLock<Header>,
    /// Serializes setting NEED_CHECK.
    setting: Mutex<()>,
    /// Opened with NEED_CHECK set and not successfully checked since: only a repair may
    /// clear the bit, never a flush or close.
    unchecked: AtomicBool,
}

impl HeaderCell {
    /// The header of an image just opened.
    pub(super) fn at_open(header: Header) -> Self {
        Self {
            unchecked: AtomicBool::new(header.needs_check()),
            header: RwLock::new(header),
            setting: Mutex::new(()),
        }
    }

    /// The header now.
    pub(super) fn get(&self) -> RwLockReadGuard<'_, Header> {
        self.header.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the header in memory (the caller has written it).
    pub(super) fn set(&self, header: Header) {
        *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
    }

    /// Whether the image was opened with NEED_CHECK set and has not been checked since.
    pub(super) fn unchecked(&self) -> bool {
        self.unchecked.load(Ordering::Acquire)
    }

    /// Sets NEED_CHECK, durably, unless it is set. The caller holds the allocation gate.
    pub(super) fn mark_need_check(&self, storage: &dyn Storage, name: &str) -> Result<()> {
        if self.get().needs_check() {
            return Ok(());
        }
        let _setting = self.setting.lock().unwrap_or_else(|p| p.into_inner());
        let mut header = self.get().clone();
        if !header.needs_check() {
            header.features |= features::NEED_CHECK;
            write_header(storage, &header, name)?;
            storage.flush().context(|| format!("flushing {name}"))?;
            self.set(header);
        }
        Ok(())
    }

    /// Clears NEED_CHECK, if set, once what set it is durable: the caller holds the gate
    /// exclusively (or has the image to itself) and has flushed. `flush` makes the
    /// header durable.
    pub(super) fn clear_need_check(
        &self,
        storage: &dyn Storage,
        name: &str,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let mut header = self.get().clone();
        if !header.needs_check() {
            return Ok(());
        }
        header.features &= !features::NEED_CHECK;
        let result = write_header(storage, &header, name).and_then(|()| flush());
        // Even a failed write may have cleared the bit in the file: the next allocation
        // must set it again rather than trust it is still there.
        self.set(header);
        result
    }

    /// Records a successful check: the metadata is consistent, so flushes may clear the
    /// bit again.
    pub(super) fn checked(&self) {
        self.unchecked.store(false, Ordering::Release);
    }
}

/// Rewrites the header in `storage`, keeping the rest of its sector as QEMU does.
pub(super) fn write_header(storage: &dyn Storage, header: &Header, name: &str) -> Result<()> {
    write_header_to(storage, header).context(|| format!("writing the header of {name}"))
}

/// Reads the header's sector, patches the 64 header bytes and writes the sector back.
pub(super) fn write_header_to(storage: &dyn Storage, header: &Header) -> std::io::Result<()> {
    let mut sector = [0u8; SECTOR_SIZE as usize];
    storage.read_at(&mut sector, 0)?;
    sector[..HEADER_LEN].copy_from_slice(&header.encode());
    storage.write_at(&sector, 0)
}
