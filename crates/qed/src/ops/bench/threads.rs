//! The threaded request loop: one thread per request in flight, each calling the device.

use super::params::{offset_of, BenchParams};
use crate::block::BlockDevice;
use crate::error::Result;
use crate::storage::AlignedBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Runs the workload on `depth` threads; returns how long the requests took.
pub(super) fn run(dev: &dyn BlockDevice, p: &BenchParams) -> Result<Duration> {
    let dev_size = dev.size();
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..p.depth.max(1) {
            s.spawn(|| {
                let mut buf = AlignedBuf::filled(p.size, p.pattern);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= p.count {
                        break;
                    }
                    let off = offset_of(p, i, dev_size);
                    let r = if p.write {
                        dev.write_at(&buf, off).and_then(|_| {
                            if p.writethrough {
                                dev.flush()
                            } else {
                                Ok(())
                            }
                        })
                    } else {
                        dev.read_at(&mut buf, off)
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
    Ok(elapsed)
}
