//! Moving guest bytes: reads, and writes in place or into new clusters.
//!
//! An allocating write follows the ordering of docs/design.md ("Write ordering"):
//! 1. without a backing file, NEED_CHECK is set and flushed once, before the first data
//!    allocation after the image was clean (the allocation's step 2);
//! 2. new clusters are reserved at the frontier (the file has grown ahead of it, so the
//!    rest of a partly written new cluster reads as zeros without being written), and
//!    the data is written there, with what the backing file shows around it;
//! 3. the L2 entries are set in memory, dirty; a new L2 table is written, flushed, and
//!    only then linked from L1;
//! 4. the next write-back writes the dirty entries (after a flush of their data when
//!    there is a backing file), so no entry reaches the disk before what it exposes.
//!
//! The steps of the allocation itself are in `allocation.rs`, shared with the writes
//! io_uring callers carry out ([`Image::begin_allocating_write`]).

use super::allocation::Wait;
use super::image::Image;
use super::l2cache::PAGE_ENTRIES;
use super::mapping::Mapping;
use crate::block::{check_range, BlockDevice, DirectExtent, PendingWrite};
use crate::error::{Error, IoContext, Result};
use crate::storage::AlignedBuf;

/// Largest buffer used to copy from the backing file.
pub(super) const COPY_CHUNK: u64 = 1 << 20;

pub(super) fn writable(image: &Image, offset: u64, len: u64) -> Result<()> {
    if image.read_only {
        return Err(Error::ReadOnly);
    }
    check_range(offset, len, image.size())
}

/// Reads guest bytes that this image does not hold: from the backing file, or zeros.
pub(super) fn read_unallocated(image: &Image, buf: &mut [u8], pos: u64) -> Result<()> {
    if !image.backing_present() {
        buf.fill(0);
        return Ok(());
    }
    let Some(dev) = image.backing_device() else {
        let path = image
            .backing
            .file()
            .map(|b| b.path.clone())
            .unwrap_or_default();
        return Err(Error::Backing {
            path,
            reason: "the image was opened without its backing file".into(),
        });
    };
    let avail = dev.size().saturating_sub(pos).min(buf.len() as u64) as usize;
    if avail > 0 {
        dev.read_at(&mut buf[..avail], pos)?;
    }
    buf[avail..].fill(0);
    Ok(())
}

/// Size of the backing device, 0 without one.
pub(super) fn backing_size(image: &Image) -> u64 {
    image.backing_device().map_or(0, |d| d.size())
}

pub(super) fn read_guest(image: &Image, buf: &mut [u8], pos: u64) -> Result<()> {
    check_range(pos, buf.len() as u64, image.size())?;
    let mut done = 0usize;
    while done < buf.len() {
        let p = pos + done as u64;
        // Held from the lookup to the end of the read: a cluster unmapped meanwhile
        // is not reused before the read is done.
        let inside = image.alloc.enter();
        let (mapping, n) = image.lookup(p, (buf.len() - done) as u64)?;
        let chunk = &mut buf[done..done + n as usize];
        if !matches!(mapping, Mapping::Data(_)) {
            // What follows may wait for claims, which a move holds while it waits
            // for the requests inside an epoch to leave.
            drop(inside);
        }
        match mapping {
            Mapping::Data(off) => image
                .storage
                .read_at(chunk, off)
                .context(|| format!("reading {n} bytes at {off:#x} of {}", image.name))?,
            Mapping::Zero => chunk.fill(0),
            Mapping::Unallocated if image.copy_on_read && image.backing_present() => {
                // Someone else mapped the cluster first: look again.
                let Some(k) = image.populate(p, n, Some(chunk))? else {
                    continue;
                };
                done += k as usize;
                continue;
            }
            Mapping::Unallocated => read_unallocated(image, chunk, p)?,
        }
        done += n as usize;
    }
    Ok(())
}

pub(super) fn write_guest(image: &Image, buf: &[u8], pos: u64) -> Result<()> {
    writable(image, pos, buf.len() as u64)?;
    let mut done = 0usize;
    while done < buf.len() {
        let p = pos + done as u64;
        let rest = &buf[done..];
        let inside = image.alloc.enter();
        let (mapping, n) = image.lookup(p, rest.len() as u64)?;
        done += match mapping {
            Mapping::Data(_) if image.is_frozen(p, n) => {
                drop(inside);
                image.wait_thawed(p, n);
                0
            }
            Mapping::Data(off) => {
                image
                    .storage
                    .write_at(&rest[..n as usize], off)
                    .context(|| format!("writing {n} bytes at {off:#x} of {}", image.name))?;
                n as usize
            }
            Mapping::Zero | Mapping::Unallocated => {
                drop(inside);
                write_allocating(image, rest, p)?
            }
        };
    }
    Ok(())
}

/// Writes the start of `buf` at `pos` into newly allocated clusters. Returns how many
/// bytes it wrote: 0 when another writer allocated the cluster first.
pub(super) fn write_allocating(image: &Image, buf: &[u8], pos: u64) -> Result<usize> {
    let Some(mut alloc) = image.claim_allocation(pos, buf.len() as u64, Wait::Block)? else {
        return Ok(0);
    };
    alloc.enter_gate(true)?;
    alloc.take_back_freed()?;
    let at = alloc.reserve()?;
    let n = alloc.len;
    let first = alloc.first();
    let span = alloc.span();
    let head = pos - first;
    let tail = span - head - n;
    let data = &buf[..n as usize];
    // What the guest read around the write: the backing file's data for an
    // unallocated cluster, zeros (which new space already reads as) for a zero one
    // or past the backing file's end.
    let from_backing =
        alloc.was == Mapping::Unallocated && head + tail > 0 && backing_size(image) > first;
    if !from_backing {
        write_data(image, data, at + head)?;
    } else if span <= COPY_CHUNK {
        write_over_backing(image, data, pos, first, span, at)?;
    } else {
        if head > 0 {
            copy_from_backing(image, first, head, at)?;
        }
        write_data(image, data, at + head)?;
        if tail > 0 {
            copy_from_backing(image, pos + n, tail, at + head + n)?;
        }
    }
    alloc.map_data(at)?;
    Ok(n as usize)
}

fn write_data(image: &Image, data: &[u8], at: u64) -> Result<()> {
    let n = data.len();
    image
        .storage
        .write_at(data, at)
        .context(|| format!("writing {n} bytes at {at:#x} of {}", image.name))
}

/// Writes new clusters whole, at file offset `at`: `data` (guest bytes at `pos`)
/// and, around it, what the backing file holds of the `span` bytes from guest offset
/// `first`. One write of an aligned buffer, where a write of the data and a copy on
/// each side of it would take three, each a bounce through unaligned memory under
/// O_DIRECT.
fn write_over_backing(
    image: &Image,
    data: &[u8],
    pos: u64,
    first: u64,
    span: u64,
    at: u64,
) -> Result<()> {
    let mut clusters = AlignedBuf::new(span as usize);
    let head = (pos - first) as usize;
    let end = head + data.len();
    if head > 0 {
        read_unallocated(image, &mut clusters[..head], first)?;
    }
    clusters[head..end].copy_from_slice(data);
    if end < clusters.len() {
        read_unallocated(image, &mut clusters[end..], first + end as u64)?;
    }
    image
        .storage
        .write_at(&clusters, at)
        .context(|| format!("writing {span} bytes at {at:#x} of {}", image.name))
}

/// [`crate::BlockDevice::begin_write`] for writes into clusters not allocated yet:
/// when the range lies in unallocated (or zero) clusters of one page of an existing
/// L2 table, and the rest of those clusters may read as zeros (no backing file, a
/// zero cluster, or whole clusters), allocates them as a write does, except that the
/// caller writes the data; finishing maps the new clusters. `None` wherever that
/// would wait (a claimed cluster, a closed gate) or need more (a new table, backing
/// data to copy).
pub(super) fn begin_allocating_write(
    image: &Image,
    pos: u64,
    len: u64,
) -> Option<PendingWrite<'_>> {
    if image.read_only || len == 0 || check_range(pos, len, image.size()).is_err() {
        return None;
    }
    let (fd, align) = image.storage.direct_fd()?;
    let g = image.geometry;
    let cs = g.cluster_size();
    let first = g.cluster_start(pos);
    let end = (pos + len).next_multiple_of(cs);
    let head = pos - first;
    if head % align != 0
        || len % align != 0
        || g.l2_index(first) % PAGE_ENTRIES + (end - first) / cs > PAGE_ENTRIES
        || g.l1_index(first) != g.l1_index(end - 1)
        || image.l1_entry(g.l1_index(first)).ok()? == 0
    {
        return None;
    }
    let mut alloc = image.claim_allocation(pos, len, Wait::Never).ok()??;
    let whole = head == 0 && pos + len == end;
    let zeros_around = match alloc.was {
        Mapping::Unallocated => whole || !image.backing_present(),
        _ => true,
    };
    if !zeros_around
        || !alloc.enter_gate(true).ok()?
        || !alloc.take_back_freed().ok()?
        || alloc.len < len
    {
        return None;
    }
    let at = alloc.reserve().ok()?;
    let extent = DirectExtent {
        fd,
        offset: at + head,
        align,
    };
    Some(PendingWrite::new(extent, first..end, move |written| {
        if written {
            alloc.map_data(at)
        } else {
            Ok(())
        }
    }))
}

/// Copies `len` guest bytes at `pos` from the backing file to file offset `to`.
/// Bytes past the end of the backing file already read as zeros in a new cluster.
pub(super) fn copy_from_backing(image: &Image, pos: u64, len: u64, to: u64) -> Result<()> {
    let len = len.min(backing_size(image).saturating_sub(pos));
    // Aligned, so that O_DIRECT reads and writes need no bounce buffer.
    let mut buf = AlignedBuf::new(len.min(COPY_CHUNK) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(COPY_CHUNK) as usize;
        read_unallocated(image, &mut buf[..n], pos + done)?;
        image
            .storage
            .write_at(&buf[..n], to + done)
            .context(|| format!("copying backing data into {}", image.name))?;
        done += n as u64;
    }
    Ok(())
}
