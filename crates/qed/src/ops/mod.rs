//! Whole-image operations over devices. None of them prints: long ones report progress
//! through a callback.

pub mod bench;
#[cfg(target_os = "linux")]
mod bench_ring;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod map;
pub mod measure;
pub mod rebase;

use crate::device::BlockDevice;
use crate::error::Result;

/// Progress callback: called with (bytes done, bytes in all) as an operation advances.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// A progress callback that ignores progress.
pub fn no_progress(_done: u64, _total: u64) {}

/// Bytes an operation moves per step.
pub(crate) const STEP: u64 = 2 << 20;

/// Whether `buf` is all zeros.
pub fn is_zero(buf: &[u8]) -> bool {
    // OR-folding fixed-size blocks lets the compiler vectorize; stop at the first non-zero.
    let blocks = buf.chunks_exact(64);
    let tail = blocks.remainder();
    blocks
        .into_iter()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Whether the chain says the whole range reads as zeros, without reading it.
pub fn known_zero(dev: &dyn BlockDevice, pos: u64, len: u64) -> Result<bool> {
    let end = pos + len;
    let mut p = pos;
    while p < end {
        let e = map::describe(dev, p, end - p, 0)?;
        if !e.zero {
            return Ok(false);
        }
        p += e.length;
    }
    Ok(true)
}
