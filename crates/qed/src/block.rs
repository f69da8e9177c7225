//! What a disk is, whatever stores it: the [`BlockDevice`] trait and the types it speaks.
//! Nothing here knows QED; the engine, the other devices and every caller above meet
//! here.

use crate::error::{Error, Result};
use crate::storage::RemoteIdentity;
use std::fmt::{self, Debug};

/// An image format this library can open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain file: guest offset = file offset.
    Raw,
    /// A QED image.
    Qed,
    /// A qcow2 image (existing ones are read and written with the `qcow2` feature; new
    /// ones are written without it).
    Qcow2,
}

impl Format {
    /// The name qemu-img uses for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qed => "qed",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qed" => Ok(Format::Qed),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::invalid_argument(format!(
                "unknown format '{other}': expected raw, qed or qcow2"
            ))),
        }
    }
}

/// What an export (NBD, FUSE) does with a guest's discard: an NBD trim, a punched hole.
/// One policy for every export, so that `--discard` means the same wherever it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Nothing is discarded in the image: NBD acknowledges the trim (like qemu-nbd's
    /// default); a punched hole is a zero write (which in a QED image still releases the
    /// space of whole data clusters; see the zero writes).
    #[default]
    Ignore,
    /// The range is discarded in the image (a punched hole then zeroes what the discard
    /// left readable).
    Unmap,
}

/// How one run of a device's address space is stored, as `qemu-img map` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the run in bytes (at least 1).
    pub len: u64,
    /// Whether this layer supplies the run (false: it falls through to the backing file).
    pub allocated: bool,
    /// Whether the run is stored as data.
    pub data: bool,
    /// Whether the run is known to read as zeros.
    pub zero: bool,
    /// Where the run starts in this layer's file, when it is stored there.
    pub offset: Option<u64>,
}

/// A disk: a fixed-size array of bytes with reads, writes and allocation queries.
/// Every method takes `&self`; implementations are safe to share between threads.
pub trait BlockDevice: Send + Sync + Debug {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// The format of this device.
    fn format(&self) -> Format;

    /// A name for messages and `map` output (the path it was opened by).
    fn filename(&self) -> &str;

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// Fills `buf` from guest offset `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at guest offset `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeros, without storing data where possible.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Tells the device the range is no longer needed. What it then reads as is up to the
    /// device; see each implementation.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Describes the run that starts at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;

    /// The device unallocated runs fall through to, if any.
    fn backing(&self) -> Option<&dyn BlockDevice>;

    /// Lets go of the locks this device holds on its own file (not on its backing
    /// files), once nothing reads it any more, so that other processes may write it. A
    /// device without locks ignores it.
    fn release_file_locks(&self) {}

    /// Where the `len` bytes at `offset` can be read (or, with `write`, written) directly:
    /// one extent of an open file, reached without allocating, copying or locking. `None`
    /// when the request needs the device's own path (allocation, backing data, a range
    /// that is not one extent). For callers that submit I/O themselves (io_uring); they
    /// must keep the extent's I/O from overlapping requests that take the device's path,
    /// whose read-modify-writes of partial blocks could otherwise undo it.
    fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<DirectExtent> {
        let _ = (offset, len, write);
        None
    }

    /// Prepares a read of the `len` bytes at `offset` that the caller carries out itself
    /// at the returned extent (io_uring): as [`BlockDevice::direct_extent`], except that
    /// the extent stays the data's until the [`DirectRead`] is dropped, on a device that
    /// moves or frees clusters while open. `None` when the read needs the device's own
    /// path. Never waits for other requests.
    fn begin_read(&self, offset: u64, len: u64) -> Option<DirectRead<'_>> {
        self.direct_extent(offset, len, false)
            .map(DirectRead::unheld)
    }

    /// Prepares a write of the `len` bytes at `offset` that the caller carries out itself
    /// at the returned extent, then finishes with [`PendingWrite::finish`]: a write into
    /// place (as [`BlockDevice::direct_extent`], holding off the storage's own
    /// read-modify-writes of the blocks until then), or into space the device set aside
    /// for it (an allocation it completes at `finish`). `None` when the write needs the
    /// device's own path. Never waits for other requests. The default has nothing to
    /// hold off.
    fn begin_write(&self, offset: u64, len: u64) -> Option<PendingWrite<'_>> {
        self.direct_extent(offset, len, true)
            .map(|x| PendingWrite::new(x, 0..0, |_| Ok(())))
    }

    /// The guest bytes a write of `len` bytes at `offset` through the device's own path
    /// would hold while it runs (an allocation claims whole clusters), as
    /// [`PendingWrite::claimed`] tells of a write begun with
    /// [`BlockDevice::begin_write`]: other writes there would wait for it, so a caller
    /// that can hold back its own should. Empty when the write would hold nothing (the
    /// default). An answer for now: a concurrent writer may change it.
    fn write_claim(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let _ = (offset, len);
        0..0
    }

    /// Whether [`BlockDevice::write_zeroes`] on this range would only change metadata or
    /// release space, never write zeros or copy data (NBD's FAST_ZERO asks this). An
    /// answer for now: a concurrent writer may change it.
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> Result<bool> {
        check_range(offset, len, self.size())?;
        Ok(false)
    }

    /// For a device whose file is an object on a server, what that object was when it
    /// was opened: what an overlay on it records, to refuse another object later.
    /// `None` for local files.
    fn remote_identity(&self) -> Option<RemoteIdentity> {
        None
    }
}

/// A byte range of an open file, as [`BlockDevice::direct_extent`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectExtent {
    /// The file.
    pub fd: std::os::fd::RawFd,
    /// Where the range starts in it.
    pub offset: u64,
    /// The alignment direct I/O on the file needs, of offsets, lengths and buffers.
    pub align: u64,
}

/// A read the caller carries out at [`DirectRead::extent`], from
/// [`BlockDevice::begin_read`]. The extent holds the data until this is dropped: drop it
/// once the read has completed.
pub struct DirectRead<'a> {
    /// Where to read the data.
    pub extent: DirectExtent,
    _hold: Option<Box<dyn Send + 'a>>,
}

impl<'a> DirectRead<'a> {
    /// A read at `extent` that keeps `hold` until it is dropped.
    pub fn held(extent: DirectExtent, hold: impl Send + 'a) -> Self {
        Self {
            extent,
            _hold: Some(Box::new(hold)),
        }
    }

    /// A read at an extent that needs nothing held (it never moves while the device is
    /// borrowed).
    pub fn unheld(extent: DirectExtent) -> Self {
        Self {
            extent,
            _hold: None,
        }
    }
}

impl Debug for DirectRead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectRead")
            .field("extent", &self.extent)
            .finish_non_exhaustive()
    }
}

/// A write the caller carries out at [`PendingWrite::extent`], from
/// [`BlockDevice::begin_write`]. Dropping it unfinished is `finish(false)`.
pub struct PendingWrite<'a> {
    /// Where to write the data.
    pub extent: DirectExtent,
    /// Guest bytes the write holds until it is finished (an allocation claims whole
    /// clusters): other writes there wait for it, so a caller should hold back its own.
    pub claimed: std::ops::Range<u64>,
    finish: Option<Box<dyn FnOnce(bool) -> Result<()> + 'a>>,
}

impl<'a> PendingWrite<'a> {
    /// A write at `extent` holding `claimed`, completed by `finish` (called with whether
    /// the data was written).
    pub fn new(
        extent: DirectExtent,
        claimed: std::ops::Range<u64>,
        finish: impl FnOnce(bool) -> Result<()> + 'a,
    ) -> Self {
        Self {
            extent,
            claimed,
            finish: Some(Box::new(finish)),
        }
    }

    /// Completes the write: with `written`, the range reads the data from now on;
    /// without, it reads as before (space set aside for it is given up).
    pub fn finish(mut self, written: bool) -> Result<()> {
        match self.finish.take() {
            Some(f) => f(written),
            None => Ok(()),
        }
    }
}

impl Drop for PendingWrite<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            let _ = f(false);
        }
    }
}

impl Debug for PendingWrite<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingWrite")
            .field("extent", &self.extent)
            .finish_non_exhaustive()
    }
}

/// Checks that `len` bytes at `offset` lie inside a device of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Whether `buf` is all zeros.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    // OR-folding fixed-size blocks lets the compiler vectorize; stop at the first non-zero.
    let blocks = buf.chunks_exact(64);
    let tail = blocks.remainder();
    blocks
        .into_iter()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && tail.iter().all(|&b| b == 0)
}
