//! Comparing the contents of two devices.

use super::step::{read_padded, Progress, STEP};
use crate::block::BlockDevice;
use crate::chain::known_zero;
use crate::error::Result;

/// How two devices differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// The sizes differ (only reported in strict mode).
    Size {
        /// Size of the first device.
        a: u64,
        /// Size of the second device.
        b: u64,
    },
    /// The contents differ first at this guest offset.
    Content {
        /// The first offset whose bytes differ.
        offset: u64,
    },
}

/// Compares two devices. Outside strict mode, a size difference is not a difference when
/// the longer device reads as zeros past the shorter one's end, as qemu-img compare.
pub fn compare(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    strict: bool,
    progress: Progress<'_>,
) -> Result<Option<Difference>> {
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(Some(Difference::Size { a: sa, b: sb }));
    }
    let total = sa.max(sb);
    let mut ba = vec![0u8; STEP as usize];
    let mut bb = vec![0u8; STEP as usize];
    let mut pos = 0;
    progress(0, total);
    while pos < total {
        let n = (total - pos).min(STEP);
        let za = pos >= sa || known_zero(a, pos, n.min(sa - pos))?;
        let zb = pos >= sb || known_zero(b, pos, n.min(sb - pos))?;
        if !(za && zb) {
            let (ca, cb) = (&mut ba[..n as usize], &mut bb[..n as usize]);
            read_padded(a, ca, pos)?;
            read_padded(b, cb, pos)?;
            if ca != cb {
                let i = ca.iter().zip(cb.iter()).position(|(x, y)| x != y);
                let offset = pos + i.unwrap_or(0) as u64;
                return Ok(Some(Difference::Content { offset }));
            }
        }
        pos += n;
        progress(pos, total);
    }
    Ok(None)
}
