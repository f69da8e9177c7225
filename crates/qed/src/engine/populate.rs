//! Filling clusters from the backing chain: what copy-on-read and streaming do to a
//! cluster the image does not hold yet.
//!
//! The clusters are claimed before the backing file is read, as an allocating write
//! claims them, so
//! - a guest write to them waits for the fill and then writes over the new cluster, or
//!   was first and the fill finds the cluster allocated and leaves it alone: the guest's
//!   write always wins;
//! - concurrent readers of one cluster fetch it once: the second waits on the claim and
//!   then reads the image.
//!
//! The data follows the allocation protocol's order (written, then the entries set in
//! memory, written back after a flush of the data), so a crash at any point leaves each
//! cluster either unallocated, reading through as before, or holding what it read
//! through to. Clusters whose backing data is all zeros become zero clusters: they cost
//! an entry, not a cluster, and the image stays as sparse as what it copies.

use super::allocation::Wait;
use super::image::Image;
use super::io::COPY_CHUNK;
use super::mapping::Mapping;
use crate::block::is_zero;
use crate::error::{IoContext, Result};
use crate::format::table::ZERO_CLUSTER;
use crate::storage::AlignedBuf;

/// Fills the unallocated clusters of the run at `pos` (at most `len` bytes, and at
/// most a megabyte plus the clusters around it, as a read would) from the backing chain, and copies
/// the guest bytes from `pos` into `out` when given (`out` is at least as long as
/// what is covered). Returns how many bytes from `pos` it covered, or `None` when the
/// first cluster is no longer unallocated (someone else wrote or filled it: look it
/// up again).
pub(super) fn populate(
    image: &Image,
    pos: u64,
    len: u64,
    out: Option<&mut [u8]>,
) -> Result<Option<u64>> {
    fill(image, pos, len, COPY_CHUNK, false, out)
}

/// [`Image::populate`] for a stream: at most `most` bytes at a time (plus the
/// clusters around), so that a server sends fewer, larger answers, and what is
/// written starts on its way to the disk at once, so that the flush that ends the
/// stream has little left to do.
pub(super) fn populate_up_to(image: &Image, pos: u64, len: u64, most: u64) -> Result<Option<u64>> {
    fill(image, pos, len, most, true, None)
}

fn fill(
    image: &Image,
    pos: u64,
    len: u64,
    most: u64,
    write_back: bool,
    out: Option<&mut [u8]>,
) -> Result<Option<u64>> {
    let Some(mut alloc) = image.claim_allocation(pos, len.min(most.max(1)), Wait::Block)? else {
        return Ok(None);
    };
    if alloc.was != Mapping::Unallocated {
        return Ok(None);
    }
    let cs = image.geometry.cluster_size();
    let first = alloc.first();
    let mut data = AlignedBuf::new(alloc.span() as usize);
    image.read_unallocated(&mut data, first)?;
    let head = (pos - first) as usize;
    if let Some(out) = out {
        out[..alloc.len as usize].copy_from_slice(&data[head..head + alloc.len as usize]);
    }
    let zero: Vec<bool> = data.chunks(cs as usize).map(is_zero).collect();
    let filled = zero.iter().filter(|z| !**z).count() as u64;
    alloc.enter_gate(filled > 0)?;
    let at = if filled > 0 {
        alloc.reserve_clusters(filled)?
    } else {
        0
    };
    // Clusters with data go to consecutive new clusters, in order; each run of them
    // is one write.
    let mut entries = Vec::with_capacity(zero.len());
    let mut next = at;
    let mut i = 0;
    while i < zero.len() {
        if zero[i] {
            entries.push(ZERO_CLUSTER);
            i += 1;
            continue;
        }
        let run = zero[i..].iter().take_while(|z| !**z).count();
        let bytes = &data[i * cs as usize..(i + run) * cs as usize];
        image.storage.write_at(bytes, next).context(|| {
            format!(
                "writing {} copied bytes at {next:#x} of {}",
                bytes.len(),
                image.name
            )
        })?;
        if write_back {
            image.storage.start_writeback(next, bytes.len() as u64);
        }
        for k in 0..run as u64 {
            entries.push(next + k * cs);
        }
        next += run as u64 * cs;
        i += run;
    }
    let covered = alloc.len;
    alloc.map_entries(|i| entries[i as usize])?;
    Ok(Some(covered))
}
