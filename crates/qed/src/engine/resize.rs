//! Changing the virtual size, and emptying an image: the table entries of clusters that
//! leave are cleared, then the space is reclaimed.

use super::image::Image;
use super::mapping::Mapping;
use crate::block::BlockDevice;
use crate::error::{Error, IoContext, Result};
use crate::format::geometry::SECTOR_SIZE;
use crate::format::table::ENTRIES_PER_SECTOR;

/// Table entries read and rewritten at a time when a shrink clears part of a table.
const CLEAR_CHUNK_ENTRIES: u64 = 8192;

/// Changes the virtual size (rounded up to 512). Growing rewrites the header, as QEMU
/// does, after making the new range read as zeros where a backing file reaches into
/// it (zero clusters): the guest never saw the backing file's bytes there, perhaps
/// because it shrank the disk to be rid of them. Shrinking needs `allow_shrink`: the
/// clusters past the new end are dropped from the tables, then the space they used
/// is reclaimed.
pub(super) fn resize(image: &mut Image, new_size: u64, allow_shrink: bool) -> Result<()> {
    if image.read_only {
        return Err(Error::ReadOnly);
    }
    let new_size = validate_resize(image, new_size, allow_shrink)?;
    // A resize is durable when it returns, and so is every write before it.
    image.write_back_tables()?;
    let old_size = image.size();
    if new_size < old_size {
        drop_clusters_from(image, new_size)?;
    }
    if new_size > old_size && image.backing_file().is_some() && image.backing_device().is_none() {
        return Err(Error::invalid_argument(format!(
            "{}: growing an image needs its backing file open, to make the new range \
             read as zeros where the backing file reaches into it",
            image.name
        )));
    }
    let backing_end = image.backing_size();
    if new_size > old_size && backing_end > old_size {
        // Whole clusters to the end of the backing data, so that the tail becomes a
        // zero cluster, not an allocated one; entries past the size read nothing.
        let cs = image.geometry.cluster_size();
        let to = new_size.min(backing_end).next_multiple_of(cs);
        super::zeroes::zero_walk(image, old_size, to - old_size, true)?;
        // Durable before the header shows the range.
        image.write_back_tables()?;
        image.flush_storage()?;
    }
    let mut header = image.header();
    header.image_size = new_size;
    image.write_header(&header)?;
    image.flush_storage()?;
    image.header.set(header);
    image.load_l1()?;
    if new_size < old_size {
        super::repair::repair_leaks(image)?;
    }
    Ok(())
}

/// The size [`Image::resize`] would give the image (`new_size` rounded up to 512),
/// or why it would refuse. Needs no write access, so a caller can validate on a
/// read-only open before it changes anything.
pub(super) fn validate_resize(image: &Image, new_size: u64, allow_shrink: bool) -> Result<u64> {
    let g = image.geometry;
    let max = g.max_image_size();
    let new_size = new_size
        .checked_next_multiple_of(SECTOR_SIZE)
        .filter(|&s| s <= max)
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "size {new_size} is too large: with cluster_size={} and table_size={} \
                 the maximum is {max} bytes",
                g.cluster_size(),
                g.table_size()
            ))
        })?;
    let old_size = image.size();
    if new_size < old_size && !allow_shrink {
        return Err(Error::invalid_argument(format!(
            "shrinking from {old_size} to {new_size} bytes drops data: pass --shrink to \
             do it"
        )));
    }
    Ok(new_size)
}

/// Clears every table entry for guest clusters at or past `new_size` (rounded up to a
/// cluster) and zeroes the data past `new_size` in the last kept cluster, so that a
/// later grow shows zeros there.
fn drop_clusters_from(image: &mut Image, new_size: u64) -> Result<()> {
    // Tables are read back from the file below: it must hold what memory holds.
    image.write_back_tables()?;
    let g = image.geometry;
    let cs = g.cluster_size();
    let in_cluster = g.offset_in_cluster(new_size);
    if in_cluster != 0 {
        if let (Mapping::Data(off), _) = image.lookup(new_size, 1)? {
            image
                .storage
                .zero_range(off, cs - in_cluster)
                .context(|| format!("zeroing the tail of the last cluster of {}", image.name))?;
        }
    }
    let keep_end = new_size.next_multiple_of(cs);
    // Nobody else uses L1 (`&mut image`): change it in place rather than in a copy,
    // which could be 16 MiB.
    let mut l1 = std::mem::take(image.tables.l1_entries_mut());
    let result = clear_tables_from(image, &mut l1, keep_end);
    *image.tables.l1_entries_mut() = l1;
    if result.is_err() {
        // Entries may be cleared in memory and not in the file.
        image.tables.mark_l1_stale();
    }
    result?;
    image.flush_storage()?;
    image.tables.forget_cached();
    Ok(())
}

/// Clears, on disk and in `l1`, every entry mapping guest space at or past
/// `keep_end` (a cluster boundary).
fn clear_tables_from(image: &Image, l1: &mut [u64], keep_end: u64) -> Result<()> {
    let g = image.geometry;
    let first_l1 = g.l1_index(keep_end);
    let mut cleared_from = None;
    for i in first_l1..l1.len() as u64 {
        let table = l1[i as usize];
        if table == 0 {
            continue;
        }
        if i * g.l2_coverage() >= keep_end {
            l1[i as usize] = 0;
            cleared_from.get_or_insert(i);
            continue;
        }
        image.check_l2_offset(i, table)?;
        // The table straddles the new end: clear its entries from there on, a chunk
        // at a time, since a table can be 1 GiB.
        let from = g.l2_index(keep_end);
        let total = g.entries_per_table();
        let mut start = from / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        let mut entries = vec![0u64; (total - start).min(CLEAR_CHUNK_ENTRIES) as usize];
        while start < total {
            let chunk = &mut entries[..(total - start).min(CLEAR_CHUNK_ENTRIES) as usize];
            image
                .read_entries(table, start, chunk)
                .context(|| format!("reading the L2 table at {table:#x}"))?;
            let dropped = &mut chunk[from.saturating_sub(start) as usize..];
            if dropped.iter().any(|&e| e != 0) {
                dropped.fill(0);
                image
                    .write_entries(table, start, chunk)
                    .context(|| format!("writing the L2 table at {table:#x}"))?;
            }
            start += chunk.len() as u64;
        }
    }
    if let Some(i) = cleared_from {
        let first = i / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        image.write_l1_sectors(&l1[first as usize..], first)?;
    }
    Ok(())
}

/// Drops every cluster: the image reads entirely from its backing file (or as zeros)
/// and its file shrinks back to the header and L1 table.
pub(super) fn make_empty(image: &mut Image) -> Result<()> {
    if image.read_only {
        return Err(Error::ReadOnly);
    }
    let g = image.geometry;
    let header = image.header();
    let l1_end = header.l1_table_offset + g.table_bytes();
    // Clear L1 first and make that durable: a crash then leaves leaks, never
    // references past the end of the file.
    image
        .storage
        .zero_range(header.l1_table_offset, g.table_bytes())
        .and_then(|_| image.storage.flush())
        .context(|| format!("clearing the L1 table of {}", image.name))?;
    let end = l1_end.max(image.data_start);
    image.alloc.reset(&*image.storage, end, &image.name)?;
    image.tables.forget_cached();
    image.load_l1()
}
