//! What is exported, and how the export runs.

use std::path::PathBuf;
use std::sync::Arc;

/// The largest read or write the kernel sends in one request. 1 MiB is what the kernel
/// allows by default (256 pages); larger requests arrive split.
pub const MAX_REQUEST: u32 = 1 << 20;

/// What punching a hole does, the library's policy: the same for every export.
pub use qed::DiscardMode;

/// A disk to mount.
#[derive(Debug, Clone)]
pub struct Export {
    /// The disk.
    pub device: Arc<dyn qed::BlockDevice>,
    /// Refuse writes (the mount is read-only too).
    pub read_only: bool,
    /// What punching a hole does.
    pub discard: DiscardMode,
    /// Bypass the kernel's page cache for the mounted file: every read and write reaches
    /// the device as it was made (FUSE's direct_io). Without it the kernel caches the
    /// file's pages and writes through to the device.
    pub direct_io: bool,
    /// Let users other than the one mounting reach the file (permissions still apply).
    pub allow_other: bool,
    /// The file's name when the mountpoint is a directory.
    pub file_name: String,
    /// The image file whose allocated size the mounted file reports, so that tools see
    /// how sparse the disk is. `None` reports the disk as fully allocated.
    pub allocation_from: Option<PathBuf>,
}

/// How the export runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Threads that carry out requests on the device when they cannot go through the
    /// io_uring thread (allocations needing backing data, unaligned requests, flushes,
    /// zeroing, seeking), or for everything where io_uring is missing.
    pub workers: usize,
    /// Threads reading requests from the kernel. One keeps up with a disk's worth of
    /// requests; more take turns on the kernel's queue, costing a context switch each.
    pub readers: usize,
    /// Requests in flight at most; the kernel is not read from while this many are.
    pub max_requests: usize,
    /// Bytes of request data (write payloads and read buffers) in flight at most.
    pub max_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            workers: 16,
            readers: 1,
            max_requests: 256,
            max_bytes: 64 << 20,
        }
    }
}
