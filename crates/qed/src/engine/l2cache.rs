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
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

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
    pending: Mutex<Pending>,
    written: Condvar,
}

/// Entry updates waiting to be written, and the batches written so far.
#[derive(Debug, Default)]
struct Pending {
    queue: Vec<(usize, u64)>,
    writing: bool,
    /// Id of the batch the next queued update joins.
    next_batch: u64,
    /// Every batch below this id has been written (or failed).
    done_below: u64,
    /// Recent failed batches, with their errors.
    failures: VecDeque<(u64, io::ErrorKind, String)>,
}

/// How many failed batches are remembered for their waiters.
const REMEMBERED_FAILURES: usize = 64;

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

    /// Sets entries (index in the page, value) on disk, then in memory. Concurrent
    /// callers are batched: one of them writes every sector the batch touches in one
    /// write, and the others wait for that write.
    pub(crate) fn update(
        &self,
        storage: &dyn Storage,
        file_offset: u64,
        updates: &[(usize, u64)],
    ) -> Result<()> {
        let mut p = lock(&self.pending);
        p.queue.extend_from_slice(updates);
        let mine = p.next_batch;
        if !p.writing {
            p.writing = true;
            loop {
                let batch = std::mem::take(&mut p.queue);
                let id = p.next_batch;
                p.next_batch += 1;
                drop(p);
                let result = self.write_batch(storage, file_offset, &batch);
                p = lock(&self.pending);
                p.done_below = id + 1;
                if let Err(e) = result {
                    let (kind, msg) = match &e {
                        crate::Error::Io { cause, .. } => (cause.kind(), e.to_string()),
                        _ => (io::ErrorKind::Other, e.to_string()),
                    };
                    if p.failures.len() == REMEMBERED_FAILURES {
                        p.failures.pop_front();
                    }
                    p.failures.push_back((id, kind, msg));
                }
                self.written.notify_all();
                if p.queue.is_empty() {
                    p.writing = false;
                    break;
                }
            }
        } else {
            while p.done_below <= mine {
                p = self.written.wait(p).unwrap_or_else(|e| e.into_inner());
            }
        }
        match p.failures.iter().find(|f| f.0 == mine) {
            Some((_, kind, msg)) => Err(crate::Error::Io {
                context: "updating an L2 table".into(),
                cause: io::Error::new(*kind, msg.clone()),
            }),
            None => Ok(()),
        }
    }

    fn write_batch(
        &self,
        storage: &dyn Storage,
        file_offset: u64,
        batch: &[(usize, u64)],
    ) -> Result<()> {
        let (Some(lo), Some(hi)) = (
            batch.iter().map(|u| u.0).min(),
            batch.iter().map(|u| u.0).max(),
        ) else {
            return Ok(());
        };
        let start = lo / SECTOR_ENTRIES * SECTOR_ENTRIES;
        let end = (hi / SECTOR_ENTRIES + 1) * SECTOR_ENTRIES;
        let mut entries = {
            let current = self.read(storage, file_offset)?;
            current[start..end].to_vec()
        };
        for &(i, v) in batch {
            entries[i - start] = v;
        }
        let mut bytes = vec![0u8; entries.len() * 8];
        encode_entries(&entries, &mut bytes);
        let at = file_offset + start as u64 * 8;
        if let Err(e) = storage.write_at(&bytes, at) {
            // The file may hold all, some or none of the batch: forget the entries so
            // that they are read back from the file before anyone relies on them.
            *self.entries.write().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(e).context(|| format!("writing L2 table entries at {at:#x}"));
        }
        let mut current = self.write(storage, file_offset)?;
        for &(i, v) in batch {
            current[i] = v;
        }
        Ok(())
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
