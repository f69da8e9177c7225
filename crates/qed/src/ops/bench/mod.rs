//! A request-level benchmark with qemu-img bench's workload: `count` requests of `size`
//! bytes, `depth` in flight, each at the previous offset plus `step`, wrapping at the end
//! of the device.

mod params;
#[cfg(target_os = "linux")]
mod ring;
mod threads;

pub use params::{BenchParams, Engine};

use crate::block::BlockDevice;
use crate::error::{Error, Result};
use std::time::{Duration, Instant};

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
        && ring::run(dev, p)?
    {
        let elapsed = start.elapsed();
        if p.write {
            dev.flush()?;
        }
        return Ok(elapsed);
    }
    let elapsed = threads::run(dev, p)?;
    if p.write {
        dev.flush()?;
    }
    Ok(elapsed)
}
