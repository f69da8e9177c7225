//! Storage in a regular file, with positioned I/O.

use super::aligned::AlignedBuf;
use super::lock::{relock, LockError, LockMode};
use super::Storage;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

/// A file used through `pread`/`pwrite`, safe to share between threads.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    direct: Option<Direct>,
    /// The QEMU-compatible locks this open of the file holds (see [`LockMode`]).
    lock: Mutex<LockMode>,
}

/// Alignment of offsets, lengths and buffers for O_DIRECT: 4 KiB suits 512-byte and
/// 4 KiB devices alike.
const DIRECT_ALIGN: u64 = super::aligned::DIRECT_ALIGN as u64;
/// Lock stripes over the aligned blocks: a read-modify-write takes its blocks' stripes
/// exclusively, a write of whole blocks shares them.
const STRIPES: usize = 64;
/// How far [`Storage::extend`] grows a file beyond what is asked: appends then find
/// their blocks reserved (no block allocation, and on ext4 O_DIRECT writes into them run
/// in parallel instead of one at a time), and the file grows once per step.
const GROW_STEP: u64 = 8 << 20;

/// State of an O_DIRECT file: unaligned writes become read-modify-write of whole
/// blocks, excluding every other write of those blocks so none loses another's bytes.
/// Writes of whole blocks need only exclude read-modify-writes, so they share a stripe.
#[derive(Debug)]
struct Direct {
    stripes: Vec<std::sync::RwLock<()>>,
}

/// The lock stripes of the aligned blocks a write of `len` bytes at `offset` touches,
/// in the order they are taken.
fn stripe_ids(offset: u64, len: u64) -> Vec<usize> {
    let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
    let end = (offset + len).next_multiple_of(DIRECT_ALIGN);
    let blocks = (end - start) / DIRECT_ALIGN;
    let mut ids: Vec<usize> = (0..blocks.min(STRIPES as u64))
        .map(|b| ((start / DIRECT_ALIGN + b) % STRIPES as u64) as usize)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn is_aligned(offset: u64, buf: &[u8]) -> bool {
    offset % DIRECT_ALIGN == 0
        && buf.len() as u64 % DIRECT_ALIGN == 0
        && buf.as_ptr().align_offset(DIRECT_ALIGN as usize) == 0
}

impl FileStorage {
    /// Opens an existing file, read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Ok(Self::new(file, None))
    }

    /// Opens an existing file, with O_DIRECT when `direct`.
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> io::Result<Self> {
        if direct {
            Self::open_direct(path, read_only)
        } else {
            Self::open(path, read_only)
        }
    }

    /// Opens an existing file with O_DIRECT, bypassing the host page cache. Any offset,
    /// length and buffer still works: unaligned requests go through aligned bounce
    /// buffers.
    pub fn open_direct(path: &Path, read_only: bool) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    io::Error::new(
                        e.kind(),
                        format!("O_DIRECT is not supported here ({e}); use the page cache"),
                    )
                } else {
                    e
                }
            })?;
        let stripes = (0..STRIPES).map(|_| std::sync::RwLock::new(())).collect();
        Ok(Self::new(file, Some(Direct { stripes })))
    }

    fn pread_full(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    break;
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A direct read: aligned requests go straight to the file, others through a
    /// bounce buffer covering the aligned blocks around them.
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(offset, buf) {
            return self.pread_direct(buf, offset);
        }
        let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
        let end = (offset + buf.len() as u64).next_multiple_of(DIRECT_ALIGN);
        let mut bounce = AlignedBuf::new((end - start) as usize);
        self.pread_direct(&mut bounce, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&bounce[at..at + buf.len()]);
        Ok(())
    }

    /// pread of aligned blocks; a short read at the end of the file reads as zeros.
    fn pread_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                // A short read can only happen at the end of the file, where the rest
                // of the block reads as zeros.
                Ok(n) if n % DIRECT_ALIGN as usize != 0 => {
                    done += n;
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn write_direct(&self, d: &Direct, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
        let end = (offset + buf.len() as u64).next_multiple_of(DIRECT_ALIGN);
        let ids = stripe_ids(offset, buf.len() as u64);
        if is_aligned(offset, buf) {
            let _shared: Vec<_> = ids
                .into_iter()
                .map(|i| d.stripes[i].read().unwrap_or_else(|p| p.into_inner()))
                .collect();
            return self.file.write_all_at(buf, offset);
        }
        // Lock the stripes of every block written, in order, so that no other write of
        // these blocks runs while this one reads and writes them back.
        let _exclusive: Vec<_> = ids
            .into_iter()
            .map(|i| d.stripes[i].write().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let len_before = self.file.metadata()?.len();
        let mut bounce = AlignedBuf::new((end - start) as usize);
        // Only the first and last blocks hold bytes outside the write.
        let first_partial = offset != start;
        let last_partial = offset + buf.len() as u64 != end;
        let bs = DIRECT_ALIGN as usize;
        if first_partial {
            self.pread_direct(&mut bounce[..bs], start)?;
        }
        if last_partial && (end - start > DIRECT_ALIGN || !first_partial) {
            let n = bounce.len();
            self.pread_direct(&mut bounce[n - bs..], end - DIRECT_ALIGN)?;
        }
        let at = (offset - start) as usize;
        bounce[at..at + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce, start)?;
        // Whole blocks may have carried the file past where this write ends.
        let wanted = len_before.max(offset + buf.len() as u64);
        if end > wanted {
            self.file.set_len(wanted)?;
        }
        Ok(())
    }

    /// Creates a file, truncating one that exists: for QED, file length is allocation.
    /// The file is locked as QEMU locks a file it creates ([`LockMode::CREATOR`]) before
    /// it is truncated, so a file another process has open is refused, not emptied.
    pub fn create(path: &Path) -> io::Result<Self> {
        #[allow(clippy::suspicious_open_options)] // truncated below, once it is locked
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .open(path)?;
        let storage = Self::new(file, None);
        storage.lock(LockMode::CREATOR)?;
        storage.file.set_len(0)?;
        Ok(storage)
    }

    /// Wraps an open file (opened without O_DIRECT). It holds no locks until
    /// [`FileStorage::lock`].
    pub fn from_file(file: File) -> Self {
        Self::new(file, None)
    }

    fn new(file: File, direct: Option<Direct>) -> Self {
        Self {
            file,
            direct,
            lock: Mutex::new(LockMode::NONE),
        }
    }

    /// Takes the locks QEMU takes for `mode` on this open of the file, in place of those
    /// held now, so that QEMU and other `qed` processes see the use and conflicting uses
    /// are refused. A conflict is an error of kind [`io::ErrorKind::ResourceBusy`] with
    /// QEMU's text (`Failed to get "write" lock`); the locks held before are kept. A file
    /// system that cannot lock is warned about once and passes. The locks go with the
    /// last descriptor of this open, or with [`LockMode::NONE`].
    pub fn lock(&self, mode: LockMode) -> io::Result<()> {
        let mut held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match relock(self.file.as_raw_fd(), *held, mode) {
            Ok(()) => {
                *held = mode;
                Ok(())
            }
            Err(LockError::Conflict(text)) => {
                Err(io::Error::new(io::ErrorKind::ResourceBusy, text))
            }
            Err(LockError::Io(e)) => Err(e),
        }
    }

    /// Allocates the blocks of `[from, to)` and makes the file at least `to` long.
    fn reserve(&self, from: u64, to: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (
            libc::off_t::try_from(from),
            libc::off_t::try_from(to - from),
        ) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        // SAFETY: fallocate on a descriptor we own, with in-range arguments.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off, len) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on a file descriptor we own; the position it moves is never used,
        // because every read and write here is positioned.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after the offset.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct {
            Some(_) => self.read_direct(buf, offset),
            None => self.pread_full(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => self.write_direct(d, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn release_locks(&self) {
        let _ = self.lock(LockMode::NONE);
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn try_hold_blocks(&self, offset: u64, len: u64) -> Option<super::BlockHold<'_>> {
        let Some(d) = &self.direct else {
            // Without O_DIRECT nothing is read-modify-written.
            return Some(super::BlockHold::default());
        };
        let mut guards = Vec::new();
        for i in stripe_ids(offset, len) {
            match d.stripes[i].try_read() {
                Ok(g) => guards.push(g),
                Err(std::sync::TryLockError::Poisoned(p)) => guards.push(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => return None,
            }
        }
        Some(super::BlockHold(guards))
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // O_DIRECT writes are on their way already.
        if self.direct.is_some() {
            return;
        }
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a plain system call on a descriptor this storage owns; it reads no
        // memory of ours.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn direct_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        let align = if self.direct.is_some() {
            DIRECT_ALIGN
        } else {
            1
        };
        Some((self.file.as_raw_fd(), align))
    }

    /// Reserves a step of [`GROW_STEP`] past `from` (or up to `to`, if further) with
    /// fallocate; when that fails (no room for the step, or no fallocate here), grows
    /// exactly to `to`.
    fn extend(&self, from: u64, to: u64) -> io::Result<u64> {
        if to <= from {
            return Ok(from);
        }
        let ahead = to.max(from.saturating_add(GROW_STEP));
        if self.reserve(from, ahead).is_ok() {
            return Ok(ahead);
        }
        if self.reserve(from, to).is_err() {
            self.file.set_len(to)?;
        }
        Ok(to)
    }

    /// Unwritten extents: they read as zeros, and writes into them run in parallel
    /// under O_DIRECT (on ext4, writes into holes take the inode lock one at a time).
    fn preallocate(&self, offset: u64, len: u64) {
        let _ = self.reserve(offset, offset.saturating_add(len));
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.len()?;
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        if let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            // SAFETY: fallocate on a descriptor we own, with in-range arguments.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    l,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
            ) {
                return Err(e);
            }
        }
        // The filesystem cannot punch holes: write the zeros.
        let zeros = AlignedBuf::new(len.min(1 << 20) as usize);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn zero_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let size = self.len()?;
        if offset >= size {
            return Ok((true, len));
        }
        let end = offset.saturating_add(len);
        let data = match self.seek(offset, libc::SEEK_DATA) {
            Ok(d) => d,
            // No SEEK_DATA here: say data, which is always safe.
            Err(_) => return Ok((false, len.min(size - offset))),
        };
        match data {
            None => Ok((true, len)),
            Some(d) if d > offset => Ok((true, (d - offset).min(len))),
            Some(_) => {
                let hole = self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(size);
                Ok((false, (hole.min(end) - offset).max(1)))
            }
        }
    }
}
