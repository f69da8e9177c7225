//! The tables: the L1 table, the cache of L2 entries, their write-back, new L2 tables
//! and the chunked table reads and writes of whole-image walks, behind one type whose
//! methods are the only way in.
//!
//! The invariants it keeps:
//!
//! - an entry reaches the file only after the data it exposes: in an image opened with a
//!   backing file, every write-back flushes the file first (`follow_data`);
//! - write-backs are serialized, so that a flush never overtakes entries another
//!   caller's write-back has taken but not yet written;
//! - a new L2 table is written and flushed before the L1 entry naming it is;
//! - dirty pages stay within half the cache (they cannot be evicted): past that, a
//!   blocking allocation writes them back at once.

use super::l1::L1Table;
use super::l2cache::{L2Cache, Page, PAGE_ENTRIES};
use crate::error::{IoContext, Result};
use crate::format::table::{decode_entries, encode_entries, ENTRIES_PER_SECTOR};
use crate::format::Geometry;
use crate::storage::Storage;
use std::sync::{Arc, Mutex};

/// The image's file as the tables see it: where they read and write, its geometry, and
/// the name messages give it.
#[derive(Clone, Copy)]
pub(super) struct TableFile<'a> {
    pub(super) storage: &'a dyn Storage,
    pub(super) geometry: Geometry,
    pub(super) name: &'a str,
}

/// L1, the L2 cache and their write-back.
#[derive(Debug)]
pub(super) struct Tables {
    l1: L1Table,
    l2: L2Cache,
    /// Serializes write-backs of L2 entries.
    write_back_lock: Mutex<()>,
}

impl Tables {
    /// The tables of an image whose L1 was read at open, caching about
    /// `l2_cache_bytes` of L2 entries.
    pub(super) fn at_open(l1: L1Table, l2_cache_bytes: usize) -> Self {
        Self {
            l1,
            l2: L2Cache::new(l2_cache_bytes),
            write_back_lock: Mutex::new(()),
        }
    }

    /// The L1 entry at `index` of an image of `image_size` bytes (0 past the entries
    /// covering it).
    #[inline]
    pub(super) fn l1_entry(&self, f: TableFile<'_>, image_size: u64, index: u64) -> Result<u64> {
        self.l1
            .entry(f.storage, &f.geometry, image_size, index)
            .context(|| format!("reading the L1 table of {}", f.name))
    }

    /// Re-reads the L1 entries covering `image_size` bytes from the file.
    pub(super) fn reload_l1(&self, f: TableFile<'_>, image_size: u64) -> Result<()> {
        self.l1
            .reload(f.storage, &f.geometry, image_size)
            .context(|| format!("reading the L1 table of {}", f.name))
    }

    /// Writes L1 entries `entries`, the first of them at index `first` (a multiple of a
    /// sector's entries).
    pub(super) fn write_l1_sectors(
        &self,
        f: TableFile<'_>,
        entries: &[u64],
        first: u64,
    ) -> Result<()> {
        self.l1
            .write_sectors(f.storage, entries, first)
            .context(|| format!("writing the L1 table of {}", f.name))
    }

    /// Points L1 entry `index` at the L2 table at `table` (new, or moved there), whose
    /// contents must be durable already.
    pub(super) fn set_l1(&self, f: TableFile<'_>, index: u64, table: u64) -> Result<()> {
        self.l1
            .set(f.storage, index, table)
            .context(|| format!("writing the L1 table of {}", f.name))
    }

    /// Where the L1 table starts in the file.
    pub(super) fn l1_offset(&self) -> u64 {
        self.l1.offset()
    }

    /// Makes the next use of L1 re-read it from the file (after a change that may have
    /// reached the file or not).
    pub(super) fn mark_l1_stale(&self) {
        self.l1.mark_stale()
    }

    /// The L1 entries, for a change that has the image to itself.
    pub(super) fn l1_entries_mut(&mut self) -> &mut Vec<u64> {
        self.l1.entries_mut()
    }

    /// The cached page holding entry `index` of the L2 table at `table`, and where that
    /// page lies in the file (see [`Page::read`]).
    #[inline]
    pub(super) fn page(&self, table: u64, index: u64) -> (Arc<Page>, u64) {
        self.l2.page(table, index)
    }

    /// Whether dirty pages have reached the limit past which they are written back.
    #[inline]
    pub(super) fn dirty_at_limit(&self) -> bool {
        self.l2.dirty_pages() >= self.l2.dirty_limit()
    }

    /// Sets entries of the page holding entry `index` of the existing L2 table at
    /// `table` (`updates`: page-relative indices and values). With `write_back`
    /// (`Some(follow_data)`, as for [`Tables::write_back`]), dirty pages past the
    /// cache's limit are written back now.
    pub(super) fn set_entries(
        &self,
        storage: &dyn Storage,
        table: u64,
        index: u64,
        updates: &[(usize, u64)],
        write_back: Option<bool>,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let dirty = self.l2.set(storage, table, index, updates)?;
        if let Some(follow_data) = write_back {
            if dirty > self.l2.dirty_limit() {
                // Dirty pages cannot be evicted: keep them within the cache's bound.
                self.write_back(storage, follow_data, flush)?;
            }
        }
        Ok(())
    }

    /// Creates the L2 table of `l1_index` at `table` (space just reserved), holding
    /// `updates` (page-relative indices of the page holding `l2_index`): its non-zero
    /// sectors are written, flushed, and only then is the L1 entry written. The caller
    /// holds the claim on the L1 entry.
    pub(super) fn create_table(
        &self,
        f: TableFile<'_>,
        table: u64,
        l1_index: u64,
        l2_index: u64,
        updates: &[(usize, u64)],
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        // Space reused from a table that was moved away: pages a late reader of the old
        // table cached under this offset are not this table's.
        self.l2.forget_table(table);
        let page_base = (l2_index - l2_index % PAGE_ENTRIES) * 8;
        let lo = updates.iter().map(|u| u.0).min().unwrap_or(0) as u64;
        let hi = updates.iter().map(|u| u.0).max().unwrap_or(0) as u64;
        let sec_start = lo / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        let sec_end = (hi / ENTRIES_PER_SECTOR + 1) * ENTRIES_PER_SECTOR;
        let mut entries = vec![0u64; (sec_end - sec_start) as usize];
        for &(i, v) in updates {
            entries[i - sec_start as usize] = v;
        }
        let mut bytes = vec![0u8; entries.len() * 8];
        encode_entries(&entries, &mut bytes);
        let at = table + page_base + sec_start * 8;
        f.storage
            .write_at(&bytes, at)
            .context(|| format!("writing the new L2 table at {table:#x} of {}", f.name))?;
        flush()?;
        self.set_l1(f, l1_index, table)
    }

    /// Writes the L2 entries changed in memory since the last write-back. With a backing
    /// file the data they expose must be durable first (a crash must never show a
    /// cluster of zeros where the backing file had data), so with `follow_data` `flush`
    /// runs before they are written: one flush for every allocation since the last write-back, where
    /// QEMU flushes once per allocation. Without a backing file no flush is needed:
    /// NEED_CHECK is set, and an entry whose data did not reach the disk reads as zeros,
    /// as the cluster did before.
    pub(super) fn write_back(
        &self,
        storage: &dyn Storage,
        follow_data: bool,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let _one = self
            .write_back_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.l2
            .write_back(storage, || if follow_data { flush() } else { Ok(()) })
    }

    /// Moves the L2 table of `l1_index` from `from` to `to`, where its bytes were copied
    /// and made durable: L1 names the copy, and no page is cached under either offset.
    /// The caller holds the gate exclusively and wrote back before the copy.
    pub(super) fn retarget(
        &self,
        f: TableFile<'_>,
        l1_index: u64,
        from: u64,
        to: u64,
    ) -> Result<()> {
        self.l2.forget_table(to);
        self.set_l1(f, l1_index, to)?;
        // Nothing is dirty under the old offset now, and lookups use the new one.
        self.l2.forget_table(from);
        Ok(())
    }

    /// Drops every cached page, dirty ones included (the tables were rewritten in the
    /// file behind the cache's back).
    pub(super) fn forget_cached(&self) {
        self.l2.clear()
    }
}

/// Reads table entries `first..first + out.len()` of the table at `table`.
pub(super) fn read_entries(
    storage: &dyn Storage,
    table: u64,
    first: u64,
    out: &mut [u64],
) -> std::io::Result<()> {
    let mut bytes = vec![0u8; out.len() * 8];
    storage.read_at(&mut bytes, table + first * 8)?;
    decode_entries(&bytes, out);
    Ok(())
}

/// Writes `entries` as entries `first..` of the table at `table` (whole sectors).
pub(super) fn write_entries(
    storage: &dyn Storage,
    table: u64,
    first: u64,
    entries: &[u64],
) -> std::io::Result<()> {
    debug_assert_eq!(first % ENTRIES_PER_SECTOR, 0);
    let mut bytes = vec![0u8; entries.len() * 8];
    encode_entries(entries, &mut bytes);
    storage.write_at(&bytes, table + first * 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use std::cell::Cell;

    /// One-cluster tables of 4 KiB: L1 at 4 KiB, room for L2 tables after it.
    fn setup() -> (MemoryStorage, Geometry, Tables) {
        let g = Geometry::new(4096, 1).unwrap();
        let storage = MemoryStorage::from_bytes(vec![0; 4 * 4096]);
        let l1 = L1Table::load(&storage, 4096, &g, 4 * g.l2_coverage()).unwrap();
        (storage, g, Tables::at_open(l1, 0))
    }

    fn entry_at(storage: &MemoryStorage, table: u64, index: u64) -> u64 {
        let mut e = [0u64];
        read_entries(storage, table, index, &mut e).unwrap();
        e[0]
    }

    #[test]
    fn a_new_table_is_durable_before_its_l1_entry() {
        let (storage, g, tables) = setup();
        let f = TableFile {
            storage: &storage,
            geometry: g,
            name: "t",
        };
        let flushed = Cell::new(false);
        tables
            .create_table(f, 2 * 4096, 1, 3, &[(3, 0x3000)], || {
                // The table's sector is written, and L1 does not name it yet.
                assert_eq!(entry_at(&storage, 2 * 4096, 3), 0x3000);
                assert_eq!(entry_at(&storage, 4096, 1), 0);
                flushed.set(true);
                Ok(())
            })
            .unwrap();
        assert!(flushed.get());
        assert_eq!(entry_at(&storage, 4096, 1), 2 * 4096);
        assert_eq!(
            tables.l1_entry(f, 4 * g.l2_coverage(), 1).unwrap(),
            2 * 4096
        );
    }

    #[test]
    fn entries_are_written_back_after_their_data_when_asked() {
        let (storage, _, tables) = setup();
        let table = 2 * 4096;
        tables
            .set_entries(&storage, table, 5, &[(5, 0x5000)], None, || Ok(()))
            .unwrap();
        // Set in memory only: the file learns of it at the write-back.
        assert_eq!(entry_at(&storage, table, 5), 0);
        let flushes = Cell::new(0);
        let flush = || {
            assert_eq!(entry_at(&storage, table, 5), 0, "flushed after the entry");
            flushes.set(flushes.get() + 1);
            Ok(())
        };
        tables.write_back(&storage, true, flush).unwrap();
        assert_eq!((entry_at(&storage, table, 5), flushes.get()), (0x5000, 1));
        // Nothing dirty: no flush, no write.
        tables.write_back(&storage, true, flush).unwrap();
        assert_eq!(flushes.get(), 1);
        // Without a backing file, no flush is asked for.
        tables
            .set_entries(&storage, table, 6, &[(6, 0x6000)], None, || Ok(()))
            .unwrap();
        tables
            .write_back(&storage, false, || {
                panic!("no flush without a backing file")
            })
            .unwrap();
        assert_eq!(entry_at(&storage, table, 6), 0x6000);
    }
}
