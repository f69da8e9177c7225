//! The bytes under an image: a small trait for positioned I/O, with a file, an
//! in-memory and a remote (http, https, s3; read-only) implementation, the aligned
//! buffers direct I/O needs, and the file locks QEMU takes on image files.

mod aligned;
mod file;
mod lock;
mod memory;
mod remote;

pub use aligned::AlignedBuf;
pub use file::FileStorage;
pub use lock::LockMode;
pub use memory::MemoryStorage;
pub use remote::{
    clear_host_cache, host_cache_info, part_size_for, prune_host_cache, CachedObject,
    HostCacheInfo, HostCacheOptions, HttpStorage, PruneReport, RemoteIdentity, RemoteOptions,
    RemoteReport, S3Config, S3Credentials, S3Storage, S3Upload, MAX_CHUNK_SIZE, MAX_PARTS,
    MAX_PART_SIZE, MIN_CHUNK_SIZE, MIN_PART_SIZE,
};
pub(crate) use remote::{is_http_url, is_s3_url};

use std::fmt::Debug;
use std::io;

/// Positioned byte storage. All methods take `&self` and may be called from many threads.
pub trait Storage: Send + Sync + Debug {
    /// Fills `buf` from `offset`. Bytes past the end of the storage read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Lets go of the locks that keep other processes from using the storage (a backing
    /// file the image no longer reads). Storage without locks ignores it.
    fn release_locks(&self) {}

    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Grows or shrinks the storage; new bytes read as zeros.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Grows the storage, now `from` bytes long, to at least `to` bytes for appending;
    /// the new bytes read as zeros. Storage may grow further than asked, so that later
    /// appends cost nothing, and may reserve the space so that writing it later allocates
    /// nothing. Returns the new length. The default grows exactly to `to`.
    fn extend(&self, from: u64, to: u64) -> io::Result<u64> {
        if to > from {
            self.set_len(to)?;
        }
        Ok(to.max(from))
    }

    /// Sets space aside for `len` bytes at `offset`, inside the storage, so that writing
    /// them later allocates nothing; what they read does not change. Best effort: the
    /// default does nothing.
    fn preallocate(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// Makes `len` bytes at `offset` read as zeros, releasing the space where the storage
    /// can. The length of the storage does not change. The default writes zeros.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len.min(self.len()?.saturating_sub(offset));
        let zeros = vec![0u8; ZERO_CHUNK.min(end.saturating_sub(offset)) as usize];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Starts writing `[offset, offset + len)` back to the disk without waiting for it:
    /// a long copy that ends with a flush then overlaps the disk's work with its own
    /// instead of leaving it all to the flush. A hint; storage that cannot ignores it.
    fn start_writeback(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// The file descriptor behind the storage and the alignment its direct I/O needs
    /// (offsets, lengths and buffers; 1 when there is none), for callers that submit I/O
    /// themselves (io_uring). `None` for storage that is not one plain file.
    fn direct_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        None
    }

    /// Where the `len` bytes at `offset` can be read by a caller that submits the read
    /// itself (io_uring), when they lie in one plain file: the whole of
    /// [`Storage::direct_fd`] by default. A remote object's chunks that its host cache
    /// has on disk, checked, are such spans too. `None` when they are not.
    fn direct_span(&self, offset: u64, len: u64) -> Option<DirectSpan> {
        let _ = len;
        let (fd, align) = self.direct_fd()?;
        Some(DirectSpan {
            fd,
            offset,
            align,
            keep: None,
        })
    }

    /// For a caller writing `[offset, offset + len)` itself through
    /// [`Storage::direct_fd`]: holds off, until the returned guard is dropped, the
    /// storage's own read-modify-writes of the blocks it touches, which could otherwise
    /// write back bytes the caller's write replaced. `None` when that would wait. The
    /// default has nothing to hold off.
    fn try_hold_blocks(&self, offset: u64, len: u64) -> Option<BlockHold<'_>> {
        let _ = (offset, len);
        Some(BlockHold::default())
    }

    /// Whether the `len` bytes at `offset` start with a known-zero run (a hole, or past
    /// the end) or with data, and how long that run is (at least 1, at most `len`).
    /// Storage that cannot tell reports data.
    fn zero_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let size = self.len()?;
        if offset >= size {
            Ok((true, len))
        } else {
            Ok((false, len.min(size - offset)))
        }
    }

    /// For an object on a server, what it was when opened (see [`RemoteIdentity`]);
    /// `None` for local storage.
    fn remote_identity(&self) -> Option<RemoteIdentity> {
        None
    }
}

/// What [`Storage::try_hold_blocks`] holds; dropping it lets go. Public because it is in
/// that method's signature: storage of an embedder's own that overrides it returns one
/// (`BlockHold::default()`, holding nothing).
#[derive(Default)]
pub struct BlockHold<'a>(pub(crate) Vec<std::sync::RwLockReadGuard<'a, ()>>);

impl Debug for BlockHold<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHold({} locks)", self.0.len())
    }
}

/// Where some of a storage's bytes can be read directly, from [`Storage::direct_span`].
#[derive(Debug, Clone)]
pub struct DirectSpan {
    /// The file.
    pub fd: std::os::fd::RawFd,
    /// Where the bytes start in it.
    pub offset: u64,
    /// The alignment direct I/O on the file needs, of offsets, lengths and buffers.
    pub align: u64,
    /// What keeps `fd` open until the read completes, when the storage might close it
    /// meanwhile.
    pub keep: Option<std::sync::Arc<std::fs::File>>,
}

/// Storage whose flushes do nothing ([`crate::OpenOptions::no_flush`]).
#[derive(Debug)]
pub(crate) struct NoFlush(pub(crate) Box<dyn Storage>);

impl Storage for NoFlush {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn release_locks(&self) {
        self.0.release_locks()
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn extend(&self, from: u64, to: u64) -> io::Result<u64> {
        self.0.extend(from, to)
    }
    fn preallocate(&self, offset: u64, len: u64) {
        self.0.preallocate(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.zero_range(offset, len)
    }
    fn zero_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.0.zero_status(offset, len)
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        self.0.start_writeback(offset, len)
    }
    fn direct_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        self.0.direct_fd()
    }
    fn direct_span(&self, offset: u64, len: u64) -> Option<DirectSpan> {
        self.0.direct_span(offset, len)
    }
    fn try_hold_blocks(&self, offset: u64, len: u64) -> Option<BlockHold<'_>> {
        self.0.try_hold_blocks(offset, len)
    }
    fn remote_identity(&self) -> Option<RemoteIdentity> {
        self.0.remote_identity()
    }
}

/// Largest buffer the default `zero_range` allocates.
const ZERO_CHUNK: u64 = 1 << 20;

/// Shared storage: lets a test keep a handle on the bytes while an image uses them.
impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn release_locks(&self) {
        (**self).release_locks()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn extend(&self, from: u64, to: u64) -> io::Result<u64> {
        (**self).extend(from, to)
    }
    fn preallocate(&self, offset: u64, len: u64) {
        (**self).preallocate(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).zero_range(offset, len)
    }
    fn zero_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        (**self).zero_status(offset, len)
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        (**self).start_writeback(offset, len)
    }
    fn direct_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        (**self).direct_fd()
    }
    fn direct_span(&self, offset: u64, len: u64) -> Option<DirectSpan> {
        (**self).direct_span(offset, len)
    }
    fn try_hold_blocks(&self, offset: u64, len: u64) -> Option<BlockHold<'_>> {
        (**self).try_hold_blocks(offset, len)
    }
    fn remote_identity(&self) -> Option<RemoteIdentity> {
        (**self).remote_identity()
    }
}
