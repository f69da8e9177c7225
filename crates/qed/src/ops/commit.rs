//! Writing an image's own data into its backing file.

use super::step::{Progress, STEP};
use crate::block::BlockDevice;
use crate::error::{Error, Result};

/// Copies every run `top` holds itself (data and zero clusters) into `base`, which must
/// be at least as large, then flushes `base`. `top` is left as it is.
pub fn commit(top: &dyn BlockDevice, base: &dyn BlockDevice, progress: Progress<'_>) -> Result<()> {
    let size = top.size();
    if base.size() < size {
        return Err(Error::invalid_argument(format!(
            "the backing file ({} bytes) is smaller than the image ({size} bytes)",
            base.size()
        )));
    }
    let mut buf = vec![0u8; STEP as usize];
    let mut pos = 0;
    progress(0, size);
    while pos < size {
        let s = top.block_status(pos, (size - pos).min(STEP))?;
        if s.allocated {
            if s.data {
                let chunk = &mut buf[..s.len as usize];
                top.read_at(chunk, pos)?;
                base.write_at(chunk, pos)?;
            } else {
                base.write_zeroes(pos, s.len)?;
            }
        }
        pos += s.len;
        progress(pos, size);
    }
    base.flush()
}
