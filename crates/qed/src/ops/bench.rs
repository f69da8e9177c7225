//! A request-level benchmark with qemu-img bench's workload: `count` requests of `size`
//! bytes, `depth` in flight, each at the previous offset plus `step`, wrapping at the end
//! of the device.

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// in one extent of it ([`BlockDevice::direct_extent`]); the rest go to worker
    /// threads. Falls back to `Threads` where io_uring is missing, and with flushes in
    /// the workload.
    IoUring,
    /// One thread per request in flight, each calling the device.
    Threads,
}

/// A buffer aligned for O_DIRECT, so the device can use it without copying.
pub(super) fn aligned(size: usize, fill: u8) -> (Vec<u8>, usize) {
    let v = vec![fill; size + 4096];
    let start = v.as_ptr().align_offset(4096);
    (v, start)
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

/// Runs the workload and returns how long it took.
pub fn bench(dev: &dyn BlockDevice, p: &BenchParams) -> Result<Duration> {
    let dev_size = dev.size();
    if p.size == 0 || p.size as u64 > dev_size {
        return Err(Error::invalid_argument(format!(
            "request size {} does not fit the {dev_size}-byte device",
            p.size
        )));
    }
    if p.offset >= dev_size {
        return Err(Error::invalid_argument(format!(
            "offset {} is past the end of the {dev_size}-byte device",
            p.offset
        )));
    }
    let start = Instant::now();
    #[cfg(target_os = "linux")]
    if p.engine == Engine::IoUring
        && p.flush_interval.is_none()
        && !p.writethrough
        && super::bench_ring::run(dev, p)?
    {
        let elapsed = start.elapsed();
        if p.write {
            dev.flush()?;
        }
        return Ok(elapsed);
    }
    let next = AtomicU64::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..p.depth.max(1) {
            s.spawn(|| {
                let (mut storage, at) = aligned(p.size, p.pattern);
                let buf = &mut storage[at..at + p.size];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= p.count {
                        break;
                    }
                    let off = offset_of(p, i, dev_size);
                    let r = if p.write {
                        dev.write_at(buf, off).and_then(|_| {
                            if p.writethrough {
                                dev.flush()
                            } else {
                                Ok(())
                            }
                        })
                    } else {
                        dev.read_at(buf, off)
                    };
                    let r = r.and_then(|_| match p.flush_interval {
                        Some(n) if n > 0 && (i + 1) % n == 0 => dev.flush(),
                        _ => Ok(()),
                    });
                    if let Err(e) = r {
                        failed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        next.store(p.count, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed();
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if p.write {
        dev.flush()?;
    }
    Ok(elapsed)
}
