//! Changing what an image reads through to, without changing what the guest sees.

use super::step::{read_padded, Progress, STEP};
use crate::block::BlockDevice;
use crate::chain::known_zero;
use crate::engine::Image;
use crate::error::{Error, Result};

/// Copies into `image` every cluster it does not hold itself whose contents differ
/// between its current backing chain and `new_backing` (zeros for none). Afterwards the
/// image reads the same whichever of the two it is backed by; recording the new backing
/// file is [`Image::set_backing_file`].
pub fn rebase(
    image: &Image,
    new_backing: Option<&dyn BlockDevice>,
    progress: Progress<'_>,
) -> Result<()> {
    if image.backing_file().is_some() && image.backing().is_none() {
        return Err(Error::invalid_argument(
            "the image's current backing file must be open for a safe rebase",
        ));
    }
    let old = image.backing();
    let size = image.size();
    let cs = image.geometry().cluster_size();
    let mut a = vec![0u8; STEP as usize];
    let mut b = vec![0u8; STEP as usize];
    let mut pos = 0;
    progress(0, size);
    while pos < size {
        let s = image.block_status(pos, (size - pos).min(STEP))?;
        if !s.allocated && !both_zero(old, new_backing, pos, s.len)? {
            let (ca, cb) = (&mut a[..s.len as usize], &mut b[..s.len as usize]);
            image.read_at(ca, pos)?;
            match new_backing {
                Some(n) => read_padded(n, cb, pos)?,
                None => cb.fill(0),
            }
            // Unallocated runs are whole clusters (or end at the end of the image).
            let mut i = 0;
            while i < ca.len() {
                let end = (i + cs as usize).min(ca.len());
                if ca[i..end] != cb[i..end] {
                    image.write_at(&ca[i..end], pos + i as u64)?;
                }
                i = end;
            }
        }
        pos += s.len;
        progress(pos, size);
    }
    image.flush()
}

fn both_zero(
    old: Option<&dyn BlockDevice>,
    new: Option<&dyn BlockDevice>,
    pos: u64,
    len: u64,
) -> Result<bool> {
    let zero = |d: Option<&dyn BlockDevice>| -> Result<bool> {
        match d {
            None => Ok(true),
            Some(d) if pos >= d.size() => Ok(true),
            // Past the end of a shorter device reads as zeros too.
            Some(d) => known_zero(d, pos, len.min(d.size() - pos)),
        }
    };
    Ok(zero(old)? && zero(new)?)
}
