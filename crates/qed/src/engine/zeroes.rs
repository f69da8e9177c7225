//! Zero writes and discards: ranges made to read as zeros with as little writing as the
//! format allows (see "Write zeroes" and "Discard" in docs/design.md).

use super::allocation::Wait;
use super::image::Image;
use super::io::COPY_CHUNK;
use super::mapping::Mapping;
use crate::error::{IoContext, Result};
use crate::format::table::{UNALLOCATED, ZERO_CLUSTER};

pub(super) fn write_zeroes_guest(image: &Image, pos: u64, len: u64) -> Result<()> {
    image.writable(pos, len)?;
    zero_walk(image, pos, len, true).map(|_| ())
}

/// Walks the range as a zero write does. With `apply`, zeroes it; without, changes
/// nothing and answers whether zeroing would be fast: false as soon as a part would
/// need data written (a partial cluster over backing data). Returns true when applied.
pub(super) fn zero_walk(image: &Image, pos: u64, len: u64, apply: bool) -> Result<bool> {
    let cs = image.geometry.cluster_size();
    let end = pos + len;
    let mut p = pos;
    while p < end {
        let mut inside = Some(image.alloc.enter());
        let (mapping, run) = image.lookup(p, end - p)?;
        if !matches!(mapping, Mapping::Data(_)) {
            drop(inside.take());
        }
        let whole = image.geometry.is_cluster_aligned(p) && end - p >= cs;
        // Whole clusters in one go; a partial cluster on its own.
        let n = if whole {
            run / cs * cs
        } else {
            run.min(cs - image.geometry.offset_in_cluster(p))
        };
        let needs_work = p < image.backing_size();
        if !apply {
            if matches!(mapping, Mapping::Unallocated) && needs_work && !whole {
                return Ok(false);
            }
            p += n;
            continue;
        }
        p += match mapping {
            Mapping::Data(_) if image.is_frozen(p, n) => {
                drop(inside.take());
                image.wait_thawed(p, n);
                0
            }
            Mapping::Data(off) => {
                image
                    .storage
                    .zero_range(off, n)
                    .context(|| format!("zeroing {n} bytes at {off:#x} of {}", image.name))?;
                n
            }
            Mapping::Zero => n,
            // Without backing data below, unallocated already reads as zeros.
            Mapping::Unallocated if !needs_work => n,
            Mapping::Unallocated if whole => zero_clusters(image, p, n)?,
            Mapping::Unallocated => {
                // At most a megabyte of zeros (a cluster can be 64 MiB): the rest of
                // the cluster is then allocated, and zeroed in place.
                let zeros = vec![0u8; n.min(COPY_CHUNK) as usize];
                image.write_allocating(&zeros, p)? as u64
            }
        };
    }
    Ok(true)
}

/// Turns unallocated whole clusters at `pos` into zero clusters. Returns how many
/// bytes it covered: 0 when another writer changed them first.
fn zero_clusters(image: &Image, pos: u64, len: u64) -> Result<u64> {
    let Some(mut alloc) = image.claim_allocation(pos, len, Wait::Block)? else {
        return Ok(0);
    };
    if alloc.was != Mapping::Unallocated {
        return Ok(0);
    }
    alloc.enter_gate(false)?;
    let covered = alloc.span();
    alloc.map_zero()?;
    Ok(covered)
}

pub(super) fn discard_guest(image: &Image, pos: u64, len: u64) -> Result<()> {
    image.writable(pos, len)?;
    let cs = image.geometry.cluster_size();
    let mut p = pos.next_multiple_of(cs);
    let end = image.geometry.cluster_start(pos + len);
    while p < end {
        let (mapping, n) = image.lookup(p, end - p)?;
        p += match mapping {
            Mapping::Data(_) => {
                free_clusters(image, p, n)?;
                n
            }
            // What the guest discarded reads as zeros, as in qcow2: the backing file
            // must not show through where the image never held data either. 0 when
            // another writer got there first: look again.
            Mapping::Unallocated if p < image.backing_size() => zero_clusters(image, p, n)?,
            Mapping::Unallocated | Mapping::Zero => n,
        };
    }
    Ok(())
}

/// Unmaps the data clusters of the whole clusters at `pos` and frees them: their
/// bytes are punched, their entries become unallocated, or zero clusters where a
/// backing file would show through, and the clusters go to the free set.
fn free_clusters(image: &Image, pos: u64, len: u64) -> Result<()> {
    let cs = image.geometry.cluster_size();
    // Under the claim no allocation, move or other discard changes these entries,
    // so each cluster is freed once.
    let _claim = image.alloc.claim(pos / cs, len / cs);
    let _gate = image.alloc.gate_shared();
    let backing_end = image.backing_size();
    let mut p = pos;
    while p < pos + len {
        let (mapping, n) = image.lookup(p, pos + len - p)?;
        if let Mapping::Data(off) = mapping {
            // Punched first: a reader that still follows the old entry reads zeros
            // or the old bytes, either of which a discard allows.
            image
                .storage
                .zero_range(off, n)
                .context(|| format!("discarding {n} bytes at {off:#x} of {}", image.name))?;
            image.set_l2_entries(p, n / cs, true, |i| {
                if p + i * cs < backing_end {
                    ZERO_CLUSTER
                } else {
                    UNALLOCATED
                }
            })?;
            // Punched again before anyone else gets them: a write in place that
            // looked before the entries changed may land after the punch above.
            image.alloc.free(off, n, false, Some(p));
        }
        p += n;
    }
    Ok(())
}
