//! Changing the tables: L2 entries set in memory and written back before each flush, new
//! L2 tables (written, flushed, then linked from L1), and the chunked table reads and
//! writes of whole-image walks.

use super::image::Image;
use super::l2cache::PAGE_ENTRIES;
use crate::error::{Error, IoContext, Result};
use crate::format::header::table_offset_is_valid;
use crate::format::table::{decode_entries, encode_entries, ENTRIES_PER_SECTOR};

impl Image {
    /// The L1 entry at `index` (0 past the entries covering the image size).
    pub(super) fn l1_entry(&self, index: u64) -> Result<u64> {
        let size = self.header.get().image_size;
        self.l1
            .entry(&*self.storage, &self.geometry, size, index)
            .context(|| format!("reading the L1 table of {}", self.name))
    }

    /// Re-reads the L1 entries covering the current size from the file.
    pub(super) fn load_l1(&self) -> Result<()> {
        let size = self.header.get().image_size;
        self.l1
            .reload(&*self.storage, &self.geometry, size)
            .context(|| format!("reading the L1 table of {}", self.name))
    }

    /// Writes L1 entries `entries`, the first of them at index `first` (a multiple of a
    /// sector's entries).
    pub(super) fn write_l1_sectors(&self, entries: &[u64], first: u64) -> Result<()> {
        self.l1
            .write_sectors(&*self.storage, entries, first)
            .context(|| format!("writing the L1 table of {}", self.name))
    }

    /// Checks that an L2 table offset read from the L1 table is usable.
    pub(super) fn check_l2_offset(&self, l1_index: u64, offset: u64) -> Result<()> {
        let header = self.header.get();
        if table_offset_is_valid(&header, &self.geometry, self.alloc.frontier(), offset) {
            Ok(())
        } else {
            Err(Error::CorruptTable {
                table: "L1".into(),
                index: l1_index,
                value: offset,
                reason:
                    "L2 table offset is misaligned, inside the header or past the end of the file",
            })
        }
    }

    /// Sets the L2 entries of `n` clusters from guest offset `first` (all inside one page
    /// of entries) to `value(i)`, creating the L2 table if there is none. The caller holds
    /// the claim on those clusters and the allocation gate. With `write_back`, dirty
    /// entries past the cache's limit are written back now; without, the next flush or
    /// blocking allocation does it.
    pub(super) fn set_l2_entries(
        &self,
        first: u64,
        n: u64,
        write_back: bool,
        value: impl Fn(u64) -> u64,
    ) -> Result<()> {
        let g = self.geometry;
        let l1_index = g.l1_index(first);
        let l2_index = g.l2_index(first);
        let page_first = l2_index % PAGE_ENTRIES;
        let updates: Vec<(usize, u64)> = (0..n)
            .map(|i| ((page_first + i) as usize, value(i)))
            .collect();
        loop {
            let l2_offset = self.l1_entry(l1_index)?;
            if l2_offset != 0 {
                self.check_l2_offset(l1_index, l2_offset)?;
                let dirty = self.l2.set(&*self.storage, l2_offset, l2_index, &updates)?;
                if write_back && dirty > self.l2.dirty_limit() {
                    // Dirty pages cannot be evicted: keep them within the cache's bound.
                    self.write_back_tables()?;
                }
                return Ok(());
            }
            let Some(_table_claim) = self.alloc.claim_table(l1_index) else {
                continue; // someone else was creating the table: look again
            };
            if self.l1_entry(l1_index)? != 0 {
                continue;
            }
            return self.create_l2_table(l1_index, l2_index, &updates);
        }
    }

    /// Creates the L2 table for `l1_index` holding `updates` (page-relative indices of the
    /// page holding `l2_index`): its non-zero sectors are written, flushed, and only then
    /// is the L1 entry written.
    fn create_l2_table(
        &self,
        l1_index: u64,
        l2_index: u64,
        updates: &[(usize, u64)],
    ) -> Result<()> {
        let table = self.reserve(self.geometry.table_bytes())?;
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
        self.storage
            .write_at(&bytes, at)
            .context(|| format!("writing the new L2 table at {table:#x} of {}", self.name))?;
        self.flush_storage()?;
        self.l1
            .set(&*self.storage, l1_index, table)
            .context(|| format!("writing the L1 table of {}", self.name))
    }

    /// Writes the L2 entries changed in memory since the last write-back. With a backing
    /// file the data they expose must be durable first (a crash must never show a
    /// cluster of zeros where the backing file had data), so the file is flushed before
    /// they are written: one flush for every allocation since the last write-back, where
    /// QEMU flushes once per allocation. Without a backing file no flush is needed:
    /// NEED_CHECK is set, and an entry whose data did not reach the disk reads as zeros,
    /// as the cluster did before.
    ///
    /// Write-backs are serialized, so that a flush never overtakes entries another
    /// caller's write-back has taken but not yet written.
    pub(super) fn write_back_tables(&self) -> Result<()> {
        let _one = self
            .write_back_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Opened with a backing file, entries follow their data to disk even after a
        // stream cut the backing file off: an allocation made before the cut took no
        // NEED_CHECK, so only this order keeps its entries from exposing unwritten data.
        self.l2.write_back(&*self.storage, || {
            if self.backing.is_some() {
                self.flush_storage()
            } else {
                Ok(())
            }
        })
    }

    /// Reads table entries `first..first + out.len()` of the table at `table`.
    pub(super) fn read_entries(
        &self,
        table: u64,
        first: u64,
        out: &mut [u64],
    ) -> std::io::Result<()> {
        let mut bytes = vec![0u8; out.len() * 8];
        self.storage.read_at(&mut bytes, table + first * 8)?;
        decode_entries(&bytes, out);
        Ok(())
    }

    /// Writes `entries` as entries `first..` of the table at `table` (whole sectors).
    pub(super) fn write_entries(
        &self,
        table: u64,
        first: u64,
        entries: &[u64],
    ) -> std::io::Result<()> {
        debug_assert_eq!(first % ENTRIES_PER_SECTOR, 0);
        let mut bytes = vec![0u8; entries.len() * 8];
        encode_entries(entries, &mut bytes);
        self.storage.write_at(&bytes, table + first * 8)
    }
}
