//! A bounded cache of L2 table entries, in pages of [`PAGE_ENTRIES`] entries.
//!
//! Tables can be up to 1 GiB (64 MiB clusters, 16-cluster tables), so the cache never
//! holds whole tables: it holds 4 KiB pages of them, loaded on demand.
//!
//! At most one page object exists per key at a time. A page in use (someone holds its
//! `Arc`) is never evicted, so a page is only ever loaded from disk when nobody holds an
//! in-memory copy that could be newer than the disk.

use crate::error::{IoContext, Result};
use crate::format::table::decode_entries;
use crate::format::table::encode_entries;
use crate::storage::Storage;
use lru::LruCache;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Entries in one 512-byte sector.
const SECTOR_ENTRIES: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Entries in one cached page (4 KiB of table).
pub const PAGE_ENTRIES: u64 = 512;
/// Bytes of table in one cached page.
pub const PAGE_BYTES: u64 = PAGE_ENTRIES * 8;

/// Key of a page: file offset of the table and page number inside it.
type Key = (u64, u64);

/// One page of an L2 table; `None` until loaded.
#[derive(Debug, Default)]
pub(crate) struct Page {
    entries: RwLock<Option<Box<[u64]>>>,
    /// Sectors of the page (bit i: entries 64 i to 64 i + 63) changed in memory and not
    /// yet written. Changed only under the `entries` write lock, so a reader holding the
    /// read lock sees entries and mask that belong together.
    dirty: Mutex<u8>,
}

/// Read access to a loaded page.
pub(crate) struct PageRef<'a>(RwLockReadGuard<'a, Option<Box<[u64]>>>);

impl std::ops::Deref for PageRef<'_> {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        self.0.as_deref().unwrap_or(&[])
    }
}

/// Write access to a loaded page.
pub(crate) struct PageMut<'a>(RwLockWriteGuard<'a, Option<Box<[u64]>>>);

impl std::ops::Deref for PageMut<'_> {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for PageMut<'_> {
    fn deref_mut(&mut self) -> &mut [u64] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Page {
    fn load(
        &self,
        storage: &dyn Storage,
        file_offset: u64,
    ) -> Result<RwLockWriteGuard<'_, Option<Box<[u64]>>>> {
        let mut guard = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let mut bytes = vec![0u8; PAGE_BYTES as usize];
            storage
                .read_at(&mut bytes, file_offset)
                .context(|| format!("reading L2 table entries at {file_offset:#x}"))?;
            let mut entries = vec![0u64; PAGE_ENTRIES as usize].into_boxed_slice();
            decode_entries(&bytes, &mut entries);
            *guard = Some(entries);
        }
        Ok(guard)
    }

    /// The page's entries, loading them from `file_offset` if needed.
    pub(crate) fn read(&self, storage: &dyn Storage, file_offset: u64) -> Result<PageRef<'_>> {
        loop {
            let guard = self.entries.read().unwrap_or_else(|p| p.into_inner());
            if guard.is_some() {
                return Ok(PageRef(guard));
            }
            drop(guard);
            // A failed update may unload the page between the load and the read lock.
            drop(self.load(storage, file_offset)?);
        }
    }

    /// Exclusive access to the page's entries, loading them if needed.
    pub(crate) fn write(&self, storage: &dyn Storage, file_offset: u64) -> Result<PageMut<'_>> {
        Ok(PageMut(self.load(storage, file_offset)?))
    }

    /// Sets entries (index in the page, value) in memory and marks their sectors dirty.
    fn set(&self, storage: &dyn Storage, file_offset: u64, updates: &[(usize, u64)]) -> Result<()> {
        let mut entries = self.write(storage, file_offset)?;
        let mut mask = 0u8;
        for &(i, v) in updates {
            entries[i] = v;
            mask |= 1 << (i / SECTOR_ENTRIES);
        }
        *lock(&self.dirty) |= mask;
        Ok(())
    }

    /// The dirty sectors' bytes, as one run from the first to the last dirty sector, and
    /// the mask they came from (now cleared). `None` when nothing is dirty.
    fn take_dirty(&self) -> Option<(u64, Vec<u8>, u8)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let entries = entries.as_deref()?;
        let mask = std::mem::take(&mut *lock(&self.dirty));
        if mask == 0 {
            return None;
        }
        let lo = mask.trailing_zeros() as usize * SECTOR_ENTRIES;
        let hi = (8 - mask.leading_zeros() as usize) * SECTOR_ENTRIES;
        let mut bytes = vec![0u8; (hi - lo) * 8];
        encode_entries(&entries[lo..hi], &mut bytes);
        Some((lo as u64 * 8, bytes, mask))
    }
}

/// The cache: a bounded LRU map of pages.
///
/// Updates are written back, not through: [`L2Cache::set`] changes a page in memory and
/// marks it dirty; [`L2Cache::write_back`] writes every dirty sector (the engine does
/// that before each flush, and before anything reads tables from the file). A dirty page
/// is held by the dirty set, so it is never evicted before it is written.
#[derive(Debug)]
pub(crate) struct L2Cache {
    pages: Mutex<LruCache<Key, Arc<Page>>>,
    capacity: usize,
    /// Pages changed in memory and not yet written, with their file offsets.
    dirty: Mutex<HashMap<Key, (Arc<Page>, u64)>>,
}

/// Dirty sectors taken from a page, ready to be written.
struct Snapshot {
    key: Key,
    page: Arc<Page>,
    file_offset: u64,
    at: u64,
    bytes: Vec<u8>,
    mask: u8,
}

impl L2Cache {
    /// A cache holding at most about `bytes` of entries (never fewer than 16 pages).
    pub(crate) fn new(bytes: usize) -> Self {
        let capacity = (bytes / PAGE_BYTES as usize).max(16);
        Self {
            pages: Mutex::new(LruCache::unbounded()),
            capacity,
            dirty: Mutex::new(HashMap::new()),
        }
    }

    /// Sets entries of the page holding entry `index` of the table at `table_offset`
    /// (indices relative to that page) in memory, to be written by the next write-back.
    /// Returns how many pages are dirty now.
    pub(crate) fn set(
        &self,
        storage: &dyn Storage,
        table_offset: u64,
        index: u64,
        updates: &[(usize, u64)],
    ) -> Result<usize> {
        let (page, file_offset) = self.page(table_offset, index);
        page.set(storage, file_offset, updates)?;
        let key = (table_offset, index / PAGE_ENTRIES);
        let mut dirty = lock(&self.dirty);
        dirty.entry(key).or_insert((page, file_offset));
        Ok(dirty.len())
    }

    /// How many pages are dirty now.
    pub(crate) fn dirty_pages(&self) -> usize {
        lock(&self.dirty).len()
    }

    /// How many dirty pages the engine lets accumulate before it writes them back: half
    /// the cache, since dirty pages stay in it until written.
    pub(crate) fn dirty_limit(&self) -> usize {
        (self.capacity / 2).max(1)
    }

    /// Writes every dirty sector. The sectors are copied first, then `before` runs (the
    /// engine flushes there when a backing file requires data to be durable before the
    /// entries that expose it), then the copies are written: every entry written was in
    /// memory, with its data written, before `before` started. What fails to be written
    /// stays dirty, to be written next time.
    pub(crate) fn write_back(
        &self,
        storage: &dyn Storage,
        before: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let pages: Vec<(Key, (Arc<Page>, u64))> = lock(&self.dirty).drain().collect();
        let snapshots: Vec<Snapshot> = pages
            .into_iter()
            .filter_map(|(key, (page, file_offset))| {
                let (rel, bytes, mask) = page.take_dirty()?;
                Some(Snapshot {
                    key,
                    at: file_offset + rel,
                    page,
                    file_offset,
                    bytes,
                    mask,
                })
            })
            .collect();
        if snapshots.is_empty() {
            return Ok(());
        }
        if let Err(e) = before() {
            self.redirty(snapshots);
            return Err(e);
        }
        let mut left = snapshots.into_iter();
        while let Some(snap) = left.next() {
            if let Err(e) = storage.write_at(&snap.bytes, snap.at) {
                // The file may hold all, some or none of these sectors; memory still
                // holds the truth, and writes it again next time.
                let at = snap.at;
                self.redirty(std::iter::once(snap).chain(left));
                return Err(e).context(|| format!("writing L2 table entries at {at:#x}"));
            }
        }
        Ok(())
    }

    fn redirty(&self, snapshots: impl IntoIterator<Item = Snapshot>) {
        let mut dirty = lock(&self.dirty);
        for s in snapshots {
            {
                let _entries = s.page.entries.write().unwrap_or_else(|p| p.into_inner());
                *lock(&s.page.dirty) |= s.mask;
            }
            dirty.entry(s.key).or_insert((s.page, s.file_offset));
        }
    }

    /// The page holding entry `index` of the table at `table_offset`. The page may not be
    /// loaded yet; [`Page::read`] and [`Page::write`] load it.
    pub(crate) fn page(&self, table_offset: u64, index: u64) -> (Arc<Page>, u64) {
        let key = (table_offset, index / PAGE_ENTRIES);
        let file_offset = table_offset + key.1 * PAGE_BYTES;
        let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pages.get(&key) {
            return (p.clone(), file_offset);
        }
        let page = Arc::new(Page::default());
        pages.put(key, page.clone());
        if pages.len() > self.capacity {
            // Evict the least recently used pages nobody is using.
            let victims: Vec<Key> = pages
                .iter()
                .rev()
                .filter(|(_, p)| Arc::strong_count(p) == 1)
                .map(|(k, _)| *k)
                .take(pages.len() - self.capacity)
                .collect();
            for k in victims {
                pages.pop(&k);
            }
        }
        (page, file_offset)
    }

    /// Drops the cached pages of the table at `table_offset`, which must have nothing
    /// dirty (it was written back, and the table moved away or is new there).
    pub(crate) fn forget_table(&self, table_offset: u64) {
        let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<Key> = pages
            .iter()
            .filter(|(k, _)| k.0 == table_offset)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            pages.pop(&k);
        }
    }

    /// Drops every cached page, dirty ones included (after metadata was written back and
    /// then rewritten behind the cache's back, or discarded).
    pub(crate) fn clear(&self) {
        lock(&self.dirty).clear();
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
