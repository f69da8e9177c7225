//! Storage in memory, for tests and tools.

use super::Storage;
use std::io;
use std::sync::RwLock;

/// A growable byte vector behind a lock. Refuses to grow past a set limit, so that a
/// test with a corrupt image cannot exhaust memory.
#[derive(Debug)]
pub struct MemoryStorage {
    bytes: RwLock<Vec<u8>>,
    limit: u64,
}

/// Default growth limit: 1 GiB.
const DEFAULT_LIMIT: u64 = 1 << 30;

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStorage {
    /// Empty storage with the default 1 GiB limit.
    pub fn new() -> Self {
        Self::from_bytes(Vec::new())
    }

    /// Storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
            limit: DEFAULT_LIMIT,
        }
    }

    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock_read().clone()
    }

    fn lock_read(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.bytes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<u8>> {
        self.bytes.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check_limit(&self, end: Option<u64>) -> io::Result<u64> {
        match end {
            Some(e) if e <= self.limit => Ok(e),
            _ => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "memory storage limit reached",
            )),
        }
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.lock_read();
        let len = bytes.len() as u64;
        let avail = if offset >= len {
            0
        } else {
            (len - offset).min(buf.len() as u64) as usize
        };
        if avail > 0 {
            let o = offset as usize;
            buf[..avail].copy_from_slice(&bytes[o..o + avail]);
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = self.check_limit(offset.checked_add(buf.len() as u64))? as usize;
        let mut bytes = self.lock_write();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock_read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = self.check_limit(Some(len))?;
        self.lock_write().resize(len as usize, 0);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.lock_write();
        let size = bytes.len() as u64;
        if offset < size {
            let end = offset.saturating_add(len).min(size);
            bytes[offset as usize..end as usize].fill(0);
        }
        Ok(())
    }
}
