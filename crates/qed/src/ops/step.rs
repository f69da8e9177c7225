//! How jobs move through devices: in steps, reporting progress, skipping zeros.

pub(crate) use crate::block::is_zero;
use crate::block::BlockDevice;
use crate::error::Result;

/// Progress callback: called with (bytes done, bytes in all) as an operation advances.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// A progress callback that ignores progress.
pub fn no_progress(_done: u64, _total: u64) {}

/// Bytes an operation moves per step.
pub(crate) const STEP: u64 = 2 << 20;

/// Reads `buf.len()` bytes of `dev` at `pos`, zeros past its end.
pub(crate) fn read_padded(dev: &dyn BlockDevice, buf: &mut [u8], pos: u64) -> Result<()> {
    let avail = dev.size().saturating_sub(pos).min(buf.len() as u64) as usize;
    if avail > 0 {
        dev.read_at(&mut buf[..avail], pos)?;
    }
    buf[avail..].fill(0);
    Ok(())
}
