//! The allocation frontier: the end of the last whole cluster of the file, where new
//! clusters and tables go. The file grows ahead of it (`Storage::extend`), so most
//! reservations make no system call; close trims the file back to it.

use crate::error::{Error, IoContext, Result};
use crate::format::Geometry;
use crate::storage::Storage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The frontier, and the file's length behind it.
#[derive(Debug)]
pub(super) struct Frontier {
    /// End of the last whole cluster in use: where the next allocation goes.
    end: AtomicU64,
    /// The end of the file, changed only under this lock so that it only ever grows
    /// while allocations run.
    file: Mutex<FileEnd>,
}

#[derive(Debug)]
struct FileEnd {
    /// Whether the file still has a partial cluster past the frontier to drop.
    trailing_garbage: bool,
    /// The length of the file: the frontier, or past it where the storage grew ahead.
    /// Clusters between the frontier and here are unused and read as zeros; a crash
    /// leaves them as leaks, and close gives them back.
    len: u64,
}

impl Frontier {
    /// The frontier of a file `file_len` bytes long, as found at open.
    pub(super) fn at_open(geometry: &Geometry, file_len: u64) -> Self {
        let end = geometry.cluster_start(file_len);
        Self {
            end: AtomicU64::new(end),
            file: Mutex::new(FileEnd {
                trailing_garbage: file_len != end,
                len: file_len,
            }),
        }
    }

    /// Where the next allocation goes: the end of the clusters in use.
    pub(super) fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Sets `bytes` aside at the frontier, growing the file first. Returns where.
    /// `flush` makes the storage durable; it is needed when a partial cluster is cut.
    pub(super) fn reserve(
        &self,
        storage: &dyn Storage,
        bytes: u64,
        name: &str,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<u64> {
        let mut file = self.lock();
        if file.trailing_garbage {
            // A partial cluster past the frontier is unreferenced; drop it so that new
            // clusters there read as zeros. The truncation must be durable before the
            // space is reused: a crash that kept the growth below and an L2 entry for a
            // new cluster there, but lost the truncation, would expose the old bytes.
            let end = self.end();
            storage
                .set_len(end)
                .context(|| format!("truncating the partial last cluster of {name}"))?;
            flush()?;
            file.trailing_garbage = false;
            file.len = end;
        }
        let old = self.end();
        let new = old.checked_add(bytes).ok_or_else(|| {
            Error::Unsupported(format!("{name}: the file would exceed 2^64 bytes"))
        })?;
        if new > file.len {
            file.len = storage
                .extend(file.len, new)
                .context(|| format!("growing {name} to {new} bytes"))?;
        }
        self.end.store(new, Ordering::Release);
        Ok(old)
    }

    /// Gives back the space the file grew ahead of the frontier, so that the file ends
    /// where its last cluster does (as QEMU, and a check, expect of a closed image).
    pub(super) fn trim(&self, storage: &dyn Storage, name: &str) -> Result<()> {
        let mut file = self.lock();
        Self::trim_locked(&mut file, self.end(), storage, name)
    }

    fn trim_locked(file: &mut FileEnd, end: u64, storage: &dyn Storage, name: &str) -> Result<()> {
        if file.len > end {
            storage
                .set_len(end)
                .context(|| format!("trimming {name} to {end} bytes"))?;
            file.len = end;
        }
        Ok(())
    }

    /// Trims the growth, then takes the frontier from the file again (after a repair
    /// rewrote, appended or truncated behind it).
    pub(super) fn reload(
        &self,
        storage: &dyn Storage,
        geometry: &Geometry,
        name: &str,
    ) -> Result<()> {
        let mut file = self.lock();
        Self::trim_locked(&mut file, self.end(), storage, name)?;
        let len = storage
            .len()
            .context(|| format!("reading the size of {name}"))?;
        let end = geometry.cluster_start(len);
        file.len = len;
        file.trailing_garbage = len != end;
        self.end.store(end, Ordering::Release);
        Ok(())
    }

    /// Cuts the file at `end` (a cluster boundary) if it is longer, durably, and moves
    /// the frontier there. Returns by how much the image's used space shrank: space the
    /// file had only grown ahead is not counted.
    pub(super) fn cut(&self, storage: &dyn Storage, end: u64, name: &str) -> Result<u64> {
        let mut file = self.lock();
        let old_len = storage
            .len()
            .context(|| format!("reading the size of {name}"))?;
        let mut shrank = 0;
        if end < old_len {
            storage
                .set_len(end)
                .and_then(|_| storage.flush())
                .context(|| format!("truncating {name}"))?;
            let used_end = if file.len > self.end() {
                self.end()
            } else {
                old_len
            };
            shrank = used_end.saturating_sub(end);
        }
        file.len = old_len.min(end);
        self.end.store(end, Ordering::Release);
        Ok(shrank)
    }

    /// Moves the frontier down to `new_end(end)` (freed clusters that ended the file,
    /// taken out of the free set) and cuts the file there, durably (`flush`): the cut
    /// clusters need not have been punched, and a crash that lost the cut but kept an
    /// allocation there would expose their old bytes. Returns the new end.
    pub(super) fn cut_free(
        &self,
        storage: &dyn Storage,
        name: &str,
        new_end: impl FnOnce(u64) -> u64,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<u64> {
        let mut file = self.lock();
        let end = new_end(self.end());
        if end < file.len {
            storage
                .set_len(end)
                .context(|| format!("truncating {name} after its last cluster in use"))?;
            file.len = end;
            file.trailing_garbage = false;
            flush()?;
        }
        self.end.store(end, Ordering::Release);
        Ok(end)
    }

    /// Sets the file's length to `end` (a cluster boundary), durably, and the frontier
    /// with it.
    pub(super) fn reset(&self, storage: &dyn Storage, end: u64, name: &str) -> Result<()> {
        let mut file = self.lock();
        storage
            .set_len(end)
            .and_then(|_| storage.flush())
            .context(|| format!("truncating {name}"))?;
        file.len = end;
        file.trailing_garbage = false;
        self.end.store(end, Ordering::Release);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, FileEnd> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }
}
