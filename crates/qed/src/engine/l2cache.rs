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
use crate::storage::Storage;
use lru::LruCache;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

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
        {
            let guard = self.entries.read().unwrap_or_else(|p| p.into_inner());
            if guard.is_some() {
                return Ok(PageRef(guard));
            }
        }
        drop(self.load(storage, file_offset)?);
        // Loaded pages are never unloaded, so this guard sees Some.
        Ok(PageRef(
            self.entries.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }

    /// Exclusive access to the page's entries, loading them if needed.
    pub(crate) fn write(&self, storage: &dyn Storage, file_offset: u64) -> Result<PageMut<'_>> {
        Ok(PageMut(self.load(storage, file_offset)?))
    }
}

/// The cache: a bounded LRU map of pages.
#[derive(Debug)]
pub(crate) struct L2Cache {
    pages: Mutex<LruCache<Key, Arc<Page>>>,
    capacity: usize,
}

impl L2Cache {
    /// A cache holding at most about `bytes` of entries (never fewer than 16 pages).
    pub(crate) fn new(bytes: usize) -> Self {
        let capacity = (bytes / PAGE_BYTES as usize).max(16);
        Self {
            pages: Mutex::new(LruCache::unbounded()),
            capacity,
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

    /// Drops every cached page (after metadata was rewritten behind the cache's back).
    pub(crate) fn clear(&self) {
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
