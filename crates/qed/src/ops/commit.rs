//! Writing the data of an image, and of the layers between it and a base, into that
//! base.

use super::step::{Progress, STEP};
use crate::block::BlockDevice;
use crate::chain::describe;
use crate::error::{Error, Result};

/// Copies every run `top` holds itself (data and zero clusters) into `base`, its backing
/// file, which must be at least as large, then flushes `base`. `top` is left as it is.
pub fn commit(top: &dyn BlockDevice, base: &dyn BlockDevice, progress: Progress<'_>) -> Result<()> {
    commit_into(top, base, 1, progress)
}

/// Writes into `base`, the layer `depth` levels down `top`'s backing chain (1 is its
/// backing file), what `top` reads from every layer above `base`: the data of those
/// layers, and zeros where one of them has zero clusters or, being shorter than `top`,
/// reads as zeros. `base` must be at least as large as `top`, and is flushed at the end.
/// Afterwards `base` reads as `top` did; `top` is left as it is, so it still reads the
/// same, while a layer between the two may not (it now reads through to data that was
/// above it).
pub fn commit_into(
    top: &dyn BlockDevice,
    base: &dyn BlockDevice,
    depth: u32,
    progress: Progress<'_>,
) -> Result<()> {
    let size = top.size();
    if base.size() < size {
        return Err(Error::invalid_argument(format!(
            "the base image ({} bytes) is smaller than the image ({size} bytes)",
            base.size()
        )));
    }
    if depth == 0 {
        return Err(Error::invalid_argument(
            "an image cannot be committed into itself: the base must be below it",
        ));
    }
    let mut buf = vec![0u8; STEP as usize];
    let mut pos = 0;
    progress(0, size);
    while pos < size {
        let e = describe(top, pos, (size - pos).min(STEP), 0)?;
        // A run no layer supplies ends at the layer whose backing file is missing or
        // shorter: above the base, that shorter layer makes the run read as zeros.
        let from_above = if e.present {
            e.depth < depth
        } else {
            e.depth + 1 < depth
        };
        if from_above {
            if e.zero && !e.data {
                base.write_zeroes(pos, e.length)?;
            } else {
                let chunk = &mut buf[..e.length as usize];
                top.read_at(chunk, pos)?;
                base.write_at(chunk, pos)?;
            }
        }
        pos += e.length;
        progress(pos, size);
    }
    base.flush()
}
