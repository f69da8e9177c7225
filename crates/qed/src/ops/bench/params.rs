//! The workload: qemu-img bench's parameters, and where each request goes.

/// The workload.
#[derive(Debug, Clone)]
pub struct BenchParams {
    /// Requests to issue.
    pub count: u64,
    /// Requests in flight at once (one thread each).
    pub depth: usize,
    /// Bytes per request.
    pub size: usize,
    /// Offset increment between consecutive requests.
    pub step: u64,
    /// Offset of the first request.
    pub offset: u64,
    /// Write instead of read.
    pub write: bool,
    /// Byte written.
    pub pattern: u8,
    /// Flush after every this many requests.
    pub flush_interval: Option<u64>,
    /// Flush after every write (writethrough cache mode).
    pub writethrough: bool,
    /// How requests are issued.
    pub engine: Engine,
}

/// How the benchmark keeps `depth` requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One thread submits through io_uring, straight to the file for requests that land
    /// in one extent of it ([`crate::BlockDevice::direct_extent`]); the rest go to worker
    /// threads. Falls back to `Threads` where io_uring is missing, and with flushes in
    /// the workload.
    IoUring,
    /// One thread per request in flight, each calling the device.
    Threads,
}

/// The offset of request `i`: offsets advance by `step` and wrap like qemu-img bench's;
/// a request that would cross the end starts over at 0.
pub(super) fn offset_of(p: &BenchParams, i: u64, dev_size: u64) -> u64 {
    let off = ((p.offset as u128 + i as u128 * p.step as u128) % dev_size as u128) as u64;
    if off + p.size as u64 > dev_size {
        0
    } else {
        off
    }
}
