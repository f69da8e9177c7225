//! Address translation: where a guest range lives.

use super::image::Image;
use super::l2cache::PAGE_ENTRIES;
use crate::error::{Error, Result};
use crate::format::L2Entry;

/// Where a run of guest bytes lives in this image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored in this image's file, starting at this file offset.
    Data(u64),
    /// A zero cluster: reads as zeros.
    Zero,
    /// Not allocated here: reads from the backing file, or as zeros without one.
    Unallocated,
}

/// Looks up the run of guest bytes that starts at `pos`: how it is stored and how
/// long the run is (at least 1 byte, at most `len`). A run never crosses a page of
/// 512 L2 entries, so one lookup reads at most one page of metadata.
pub(super) fn lookup(image: &Image, pos: u64, len: u64) -> Result<(Mapping, u64)> {
    let g = &image.geometry;
    let cs = g.cluster_size();
    let l1_index = g.l1_index(pos);
    let l2_offset = image.l1_entry(l1_index)?;
    let l2_index = g.l2_index(pos);
    let in_cluster = g.offset_in_cluster(pos);
    let page_first = l2_index % PAGE_ENTRIES;
    // Bytes from pos to the end of the current page's reach.
    let to_page_end = (PAGE_ENTRIES - page_first) * cs - in_cluster;
    let len = len.min(to_page_end);
    if l2_offset == 0 {
        return Ok((Mapping::Unallocated, len));
    }
    image.check_l2_offset(l1_index, l2_offset)?;
    let (page, file_offset) = image.tables.page(l2_offset, l2_index);
    let entries = page.read(&*image.storage, file_offset)?;
    let first = page_first as usize;
    let max_clusters = g.clusters_for(in_cluster + len) as usize;
    let kind = L2Entry::decode(entries[first]);
    let mut n = 1;
    while n < max_clusters {
        let next = L2Entry::decode(entries[first + n]);
        let same = match (kind, next) {
            // A corrupt entry near u64::MAX must not overflow: it is reported below.
            (L2Entry::Data(a), L2Entry::Data(b)) => a.checked_add(n as u64 * cs) == Some(b),
            (a, b) => a == b,
        };
        if !same {
            break;
        }
        n += 1;
    }
    let run = (n as u64 * cs - in_cluster).min(len);
    let mapping = match kind {
        L2Entry::Unallocated => Mapping::Unallocated,
        L2Entry::Zero => Mapping::Zero,
        L2Entry::Data(off) => {
            let last = off + (n as u64 - 1) * cs;
            for (i, o) in [(0, off), (n - 1, last)] {
                if !data_offset_is_valid(image, o) {
                    return Err(Error::CorruptTable {
                        table: format!("L2 table at {l2_offset:#x}"),
                        index: l2_index + i as u64,
                        value: o,
                        reason: "data cluster offset is misaligned, inside the header or \
                                 past the end of the file",
                    });
                }
            }
            Mapping::Data(off + in_cluster)
        }
    };
    Ok((mapping, run))
}

fn data_offset_is_valid(image: &Image, off: u64) -> bool {
    image.geometry.is_cluster_aligned(off)
        && off >= image.data_start
        && off < image.alloc.frontier()
}
