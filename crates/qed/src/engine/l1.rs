//! The L1 table: held in memory whole (only the entries covering the image size), read
//! and written in chunks, written back a sector at a time.

use crate::format::table::{decode_entries, encode_entries, ENTRIES_PER_SECTOR};
use crate::format::Geometry;
use crate::storage::Storage;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

/// L1 entries encoded or decoded at a time: the L1 in memory can reach 16 MiB, and its
/// bytes are never held whole besides it.
const CHUNK_ENTRIES: usize = 8192;

/// The image's L1 table.
#[derive(Debug)]
pub(super) struct L1Table {
    /// Where the table starts in the file.
    offset: u64,
    /// The entries covering the image size, rounded up to whole sectors.
    entries: RwLock<Vec<u64>>,
    /// Serializes sector writes: several entries share a sector.
    write_lock: Mutex<()>,
    /// A write of L1 sectors failed, so the file may hold them or not: the copy in
    /// memory is re-read before its next use, or a later request could act on an entry
    /// the file no longer has (or miss one it has).
    stale: AtomicBool,
}

impl L1Table {
    /// How many entries are held for an image of `image_size` bytes: those covering it,
    /// rounded up to whole sectors so that writes are whole sectors, and never more than
    /// the table has.
    fn len_for(geometry: &Geometry, image_size: u64) -> usize {
        geometry
            .l1_entries_for(image_size)
            .next_multiple_of(ENTRIES_PER_SECTOR)
            .min(geometry.entries_per_table()) as usize
    }

    /// Reads the table at `offset` for an image of `image_size` bytes.
    pub(super) fn load(
        storage: &dyn Storage,
        offset: u64,
        geometry: &Geometry,
        image_size: u64,
    ) -> io::Result<Self> {
        let mut entries = vec![0u64; Self::len_for(geometry, image_size)];
        read_into(storage, offset, &mut entries)?;
        Ok(Self {
            offset,
            entries: RwLock::new(entries),
            write_lock: Mutex::new(()),
            stale: AtomicBool::new(false),
        })
    }

    /// Re-reads the entries for an image of `image_size` bytes, in place, so that the
    /// table (up to 16 MiB) is not held twice; an entry is only ever replaced by what
    /// the file holds.
    pub(super) fn reload(
        &self,
        storage: &dyn Storage,
        geometry: &Geometry,
        image_size: u64,
    ) -> io::Result<()> {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.resize(Self::len_for(geometry, image_size), 0);
        read_into(storage, self.offset, &mut entries)
    }

    /// The entry at `index` (0 past the entries held). A table marked stale is re-read
    /// first, for an image of `image_size` bytes.
    pub(super) fn entry(
        &self,
        storage: &dyn Storage,
        geometry: &Geometry,
        image_size: u64,
        index: u64,
    ) -> io::Result<u64> {
        if self.stale.load(Ordering::Acquire) {
            let _writes = self.lock_writes();
            if self.stale.load(Ordering::Acquire) {
                self.reload(storage, geometry, image_size)?;
                self.stale.store(false, Ordering::Release);
            }
        }
        Ok(self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(index as usize)
            .copied()
            .unwrap_or(0))
    }

    /// Points entry `index` at a new L2 table: its sector is written, then memory
    /// changes. Only a new table's creator calls this, holding the table's claim.
    pub(super) fn set(&self, storage: &dyn Storage, index: u64, table: u64) -> io::Result<()> {
        let _writes = self.lock_writes();
        let first = index / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        let sector = {
            let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
            let end = (first + ENTRIES_PER_SECTOR).min(entries.len() as u64);
            let mut sector = entries[first as usize..end as usize].to_vec();
            sector[(index - first) as usize] = table;
            sector
        };
        self.write_sectors(storage, &sector, first)?;
        self.entries.write().unwrap_or_else(|p| p.into_inner())[index as usize] = table;
        Ok(())
    }

    /// Writes `entries`, the first of them at index `first` (a multiple of a sector's
    /// entries, so that only whole sectors are written), a chunk at a time. A failure
    /// marks the table stale.
    pub(super) fn write_sectors(
        &self,
        storage: &dyn Storage,
        entries: &[u64],
        first: u64,
    ) -> io::Result<()> {
        debug_assert_eq!(first % ENTRIES_PER_SECTOR, 0);
        let base = self.offset + first * 8;
        let mut bytes = vec![0u8; entries.len().min(CHUNK_ENTRIES) * 8];
        for (i, chunk) in entries.chunks(CHUNK_ENTRIES).enumerate() {
            let b = &mut bytes[..chunk.len() * 8];
            encode_entries(chunk, b);
            storage
                .write_at(b, base + (i * CHUNK_ENTRIES * 8) as u64)
                .inspect_err(|_| self.mark_stale())?;
        }
        Ok(())
    }

    /// The entries, for a change that has the image to itself (`&mut`): no copy of a
    /// table that can be 16 MiB.
    pub(super) fn entries_mut(&mut self) -> &mut Vec<u64> {
        self.entries.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the table starts in the file.
    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    /// Makes the next use re-read the table from the file.
    pub(super) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    fn lock_writes(&self) -> MutexGuard<'_, ()> {
        self.write_lock.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Fills `entries` with the table entries at `offset`.
fn read_into(storage: &dyn Storage, offset: u64, entries: &mut [u64]) -> io::Result<()> {
    let mut bytes = vec![0u8; CHUNK_ENTRIES.min(entries.len()) * 8];
    for (i, chunk) in entries.chunks_mut(CHUNK_ENTRIES).enumerate() {
        let b = &mut bytes[..chunk.len() * 8];
        storage.read_at(b, offset + (i * CHUNK_ENTRIES * 8) as u64)?;
        decode_entries(b, chunk);
    }
    Ok(())
}
