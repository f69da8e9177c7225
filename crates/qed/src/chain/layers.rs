//! Questions asked of a whole chain, layer by layer: which layer supplies each run (the
//! map `qemu-img map` reports), whether a range is known to read as zeros, and whether a
//! file belongs to the chain.

use crate::block::BlockDevice;
use crate::error::Result;

/// One run of the map: maximal, with uniform properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset of the run.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which layer supplies it: 0 is the image itself, 1 its backing file, and so on.
    pub depth: u32,
    /// Whether any layer supplies it (false: it reads as zeros past the chain's end).
    pub present: bool,
    /// Whether it reads as zeros.
    pub zero: bool,
    /// Whether it is stored as data.
    pub data: bool,
    /// Where it starts in the file of the supplying layer.
    pub offset: Option<u64>,
    /// The supplying layer's file name.
    pub filename: String,
}

impl MapEntry {
    fn extends(&self, next: &MapEntry) -> bool {
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Describes the run at `pos` (at most `len` bytes), descending the backing chain.
pub fn describe(dev: &dyn BlockDevice, pos: u64, len: u64, depth: u32) -> Result<MapEntry> {
    let s = dev.block_status(pos, len)?;
    let entry = |present: bool, zero: bool, data: bool, offset: Option<u64>| MapEntry {
        start: pos,
        length: s.len,
        depth,
        present,
        zero,
        data,
        offset,
        filename: dev.filename().to_string(),
    };
    if s.allocated {
        return Ok(entry(true, s.zero, s.data, s.offset));
    }
    match dev.backing() {
        Some(b) if pos < b.size() => describe(b, pos, s.len.min(b.size() - pos), depth + 1),
        _ => Ok(entry(false, true, false, None)),
    }
}

/// Calls `f` with each maximal run of `dev` from `start` for `len` bytes, in order.
pub fn for_each_run(
    dev: &dyn BlockDevice,
    start: u64,
    len: u64,
    mut f: impl FnMut(&MapEntry) -> Result<()>,
) -> Result<()> {
    let end = start.saturating_add(len).min(dev.size());
    let mut pos = start;
    let mut pending: Option<MapEntry> = None;
    while pos < end {
        let e = describe(dev, pos, end - pos, 0)?;
        pos += e.length;
        match &mut pending {
            Some(p) if p.extends(&e) => p.length += e.length,
            _ => {
                if let Some(p) = pending.replace(e) {
                    f(&p)?;
                }
            }
        }
    }
    if let Some(p) = pending {
        f(&p)?;
    }
    Ok(())
}

/// The whole map of `dev` as a list of runs.
pub fn map(dev: &dyn BlockDevice) -> Result<Vec<MapEntry>> {
    let mut out = Vec::new();
    for_each_run(dev, 0, dev.size(), |e| {
        out.push(e.clone());
        Ok(())
    })?;
    Ok(out)
}

/// Whether the chain says the whole range reads as zeros, without reading it.
pub fn known_zero(dev: &dyn BlockDevice, pos: u64, len: u64) -> Result<bool> {
    let end = pos + len;
    let mut p = pos;
    while p < end {
        let e = describe(dev, p, end - p, 0)?;
        if !e.zero {
            return Ok(false);
        }
        p += e.length;
    }
    Ok(true)
}

/// Whether `path` names one of the files of `dev`'s chain (the device itself or any of
/// its backing files), compared by canonical path so that other spellings, symlinks
/// included, are caught. Writing to such a file would change what `dev` reads.
///
/// A qcow2 device's backing files are opened inside imago and are not listed.
pub fn chain_contains(dev: &dyn BlockDevice, path: &std::path::Path) -> bool {
    let Ok(target) = path.canonicalize() else {
        return false;
    };
    std::iter::successors(Some(dev), |d| d.backing())
        .any(|d| std::path::Path::new(d.filename()).canonicalize().ok() == Some(target.clone()))
}
