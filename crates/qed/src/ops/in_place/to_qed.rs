//! Writing QED metadata over a source's clusters: the QED side of qcow2 -> QED and
//! raw -> QED.
//!
//! Layout of what is appended, from the old end of the file rounded up to a cluster:
//! the clusters that move (decompressed qcow2 clusters, and a raw file's first cluster,
//! which QED's header takes), then one L2 table for each run of guest clusters one
//! table reaches that has anything allocated, then the L1 table. The backing file name
//! goes into the first cluster past what the source's header uses. After the switch,
//! compaction moves clusters from the end of the file into the clusters the source's
//! metadata left unreferenced, and cuts the file.

use super::entries::{survey, ClusterMap, Counts, Entry, GuestTables};
use super::{round_up, Commit, InPlaceOptions, InPlacePlan};
use crate::block::Format;
use crate::engine::Image;
use crate::error::{Error, IoContext, Result};
use crate::format::geometry::{DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE};
use crate::format::header::{features, HEADER_LEN, MAX_BACKING_NAME_LEN};
use crate::format::qcow2::CompressedRun;
use crate::format::{Geometry, Header};
use crate::ops::reorganize::{compact, ReorganizeEnd, ReorganizeOptions};
use crate::storage::Storage;
use std::path::Path;
use std::sync::Arc;

/// Where the appended parts go.
struct Layout {
    geometry: Geometry,
    /// The first appended byte: the old end rounded up to a cluster.
    base: u64,
    /// Where the L2 tables start.
    tables: u64,
    l1: u64,
    end: u64,
    /// Offset of the backing file name in the first cluster.
    name_at: u64,
}

/// Converts `src` to QED in its file.
pub(super) fn convert(
    storage: Arc<dyn Storage>,
    src: &dyn GuestTables,
    opts: &InPlaceOptions,
    progress: super::super::Progress<'_>,
) -> Result<InPlacePlan> {
    let f = src.facts().clone();
    let name = f.name.as_str();
    let geometry = choose_geometry(f.cluster_size, f.virtual_size, name)?;
    let (run_len, runs) = runs(&geometry, f.virtual_size);
    // Survey, write, compact: a third each.
    let total = runs * 3;
    progress(0, total);
    let mut map = ClusterMap::new(f.file_len, geometry.cluster_bits());
    let counts = survey(src, run_len, f.cluster_size, &mut map, &mut |c| {
        progress(c / run_len.max(1), total)
    })?;
    let layout = plan_layout(&geometry, src, &counts)?;
    let plan = InPlacePlan {
        source: opts.source,
        target: Format::Qed,
        cluster_size: f.cluster_size,
        virtual_size: f.virtual_size,
        file_length: f.file_len,
        metadata_bytes: layout.end - layout.tables,
        decompressed_clusters: counts.compressed,
        decompressed_bytes: counts.compressed * f.cluster_size,
        moved_bytes: counts.moved * f.cluster_size,
        extra_bytes: layout.end - f.file_len,
        final_length: layout.end,
    };
    if opts.dry_run {
        return Ok(plan);
    }
    let commit = Commit::new(&*storage, name)?;
    let header = new_header(&layout, &f);
    header.validate(layout.end).map_err(|e| e.in_file(name))?;
    commit.run(
        || {
            write_tables(&commit, src, &layout, run_len, &mut |done| {
                progress(runs + done, total)
            })
        },
        &header_sector(&header),
    )?;
    // The L1 table goes where the source's metadata began, when that is free.
    let need = layout.geometry.table_bytes() / f.cluster_size;
    let below = 1..layout.base / f.cluster_size;
    if let Some(c) = first_run(below.filter(|&c| !map.is_set(c)), need) {
        move_l1(&*storage, name, c * f.cluster_size)?;
    }
    // A raw file leaves nothing behind; compacting it would only turn its holes into
    // unallocated clusters, and leaks below the L1 table at the end.
    let end = if opts.source == Format::Raw {
        layout.end
    } else {
        // Header, L1, tables and clusters: the length of a file with no leak.
        let tb = layout.geometry.table_bytes();
        let clusters = counts.data + counts.moved + counts.compressed;
        let in_use = f.cluster_size + tb + counts.tables * tb + clusters * f.cluster_size;
        reclaim(storage, name, in_use, &mut |d, t| {
            progress(2 * runs + d * runs / t.max(1), total)
        })?
    };
    progress(total, total);
    Ok(InPlacePlan {
        final_length: end,
        ..plan
    })
}

/// QED's table size: the default, or the smallest larger one that reaches the virtual
/// size.
fn choose_geometry(cluster_size: u64, size: u64, name: &str) -> Result<Geometry> {
    let mut ts = DEFAULT_TABLE_SIZE;
    loop {
        let g = Geometry::new(cluster_size as u32, ts)?;
        if g.max_image_size() >= size {
            return Ok(g);
        }
        if ts >= MAX_TABLE_SIZE {
            return Err(Error::invalid_argument(format!(
                "{name}: QED with {cluster_size}-byte clusters reaches at most {} bytes, and \
                 the image is {size} bytes; copy it into larger clusters instead (qed convert \
                 -O qed -o cluster_size=64k SRC DST)",
                g.max_image_size()
            )));
        }
        ts *= 2;
    }
}

/// Guest clusters one QED L2 table maps, and how many such runs the image has.
fn runs(g: &Geometry, size: u64) -> (u64, u64) {
    let run_len = g.entries_per_table();
    (run_len, size.div_ceil(g.cluster_size()).div_ceil(run_len))
}

fn plan_layout(geometry: &Geometry, src: &dyn GuestTables, counts: &Counts) -> Result<Layout> {
    let f = src.facts();
    let cs = geometry.cluster_size();
    let tb = geometry.table_bytes();
    let base = round_up(f.file_len, cs);
    let tables = base + (counts.compressed + counts.moved) * cs;
    let l1 = tables + counts.tables * tb;
    let end = l1 + tb;
    let name_at = round_up(f.header_used.max(512), 8);
    if let Some(b) = &f.backing {
        let fits = name_at + b.name.len() as u64 <= cs;
        if !fits || b.name.len() as u64 > u64::from(MAX_BACKING_NAME_LEN) {
            return Err(Error::invalid_argument(format!(
                "{}: the backing file name ({} bytes) does not fit in QED's header cluster \
                 beside the old header; shorten it first (qemu-img rebase -u -b NAME)",
                f.name,
                b.name.len()
            )));
        }
        match b.format.as_deref() {
            None | Some("raw" | "qcow2" | "qed") => {}
            Some(other) => {
                return Err(Error::invalid_argument(format!(
                    "{}: the backing file's format is {other}; QED records only raw backing \
                     files and probes qcow2 and QED ones, so it cannot express it",
                    f.name
                )))
            }
        }
    }
    Ok(Layout {
        geometry: *geometry,
        base,
        tables,
        l1,
        end,
        name_at,
    })
}

fn new_header(layout: &Layout, f: &super::entries::SourceFacts) -> Header {
    let backing = f.backing.as_ref();
    let raw = backing.is_some_and(|b| b.format.as_deref() == Some("raw"));
    let mut h = Header::new_for_create(
        layout.geometry,
        f.virtual_size,
        backing.map(|b| b.name.len() as u32),
        raw,
    );
    h.l1_table_offset = layout.l1;
    if backing.is_some() {
        h.backing_filename_offset = layout.name_at as u32;
        h.features |= features::BACKING_FILE;
    }
    h
}

fn header_sector(header: &Header) -> [u8; 512] {
    let mut sector = [0u8; 512];
    sector[..HEADER_LEN].copy_from_slice(&header.encode());
    sector
}

/// The first run of `need` clusters (cluster indexes, ascending) in `free`.
fn first_run(free: impl IntoIterator<Item = u64>, need: u64) -> Option<u64> {
    let (mut start, mut len, mut last) = (0, 0, None);
    for c in free {
        if last.is_some_and(|l| l + 1 == c) {
            len += 1;
        } else {
            (start, len) = (c, 1);
        }
        last = Some(c);
        if len == need {
            return Some(start);
        }
    }
    None
}

/// Moves the L1 table to the free clusters at `to`, as QEMU lays images out (the L1
/// right after the header when those clusters are free): compaction never moves the
/// L1, and left at the end of the file it keeps the file from being cut. Crash-safe as
/// the switch was: the copy is flushed before the header names it, and the header is
/// rewritten as QEMU rewrites it, the first sector read, patched and written whole.
fn move_l1(storage: &dyn Storage, name: &str, to: u64) -> Result<()> {
    let mut sector = [0u8; 512];
    storage
        .read_at(&mut sector, 0)
        .context(|| format!("reading the header of {name}"))?;
    let mut raw = [0u8; HEADER_LEN];
    raw.copy_from_slice(&sector[..HEADER_LEN]);
    let mut header = Header::decode(&raw).map_err(|e| e.in_file(name))?;
    let table_bytes = u64::from(header.cluster_size) * u64::from(header.table_size);
    let mut l1 = vec![0u8; table_bytes as usize];
    storage
        .read_at(&mut l1, header.l1_table_offset)
        .context(|| format!("reading the L1 table of {name}"))?;
    storage
        .write_at(&l1, to)
        .context(|| format!("writing the L1 table at {to} of {name}"))?;
    storage.flush().context(|| format!("flushing {name}"))?;
    header.l1_table_offset = to;
    sector[..HEADER_LEN].copy_from_slice(&header.encode());
    storage
        .write_at(&sector, 0)
        .context(|| format!("writing the header of {name}"))?;
    storage.flush().context(|| format!("flushing {name}"))
}

/// Writes the moved clusters, the L2 tables, the L1 table and the backing name.
fn write_tables(
    commit: &Commit<'_>,
    src: &dyn GuestTables,
    layout: &Layout,
    run_len: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let f = src.facts();
    let cs = layout.geometry.cluster_size();
    let tb = layout.geometry.table_bytes();
    let clusters = f.virtual_size.div_ceil(cs);
    let mut next_moved = layout.base;
    let mut next_table = layout.tables;
    let mut l1 = vec![0u8; tb as usize];
    let mut run = vec![Entry::Unallocated; run_len as usize];
    let mut table = vec![0u8; tb as usize];
    let mut cluster = vec![0u8; cs as usize];
    let mut first = 0;
    while first < clusters {
        let index = first / run_len;
        first += run_len;
        if !src.read_run(index * run_len, &mut run)? {
            progress(index + 1);
            continue;
        }
        if run.iter().all(|e| *e == Entry::Unallocated) {
            progress(index + 1);
            continue;
        }
        for (i, e) in run.iter().enumerate() {
            let raw = match *e {
                Entry::Unallocated => 0,
                Entry::Zero => 1,
                Entry::Data(off) if off >= cs => off,
                Entry::Data(off) => {
                    commit.read(&mut cluster, off, "a cluster that moves")?;
                    commit.write(&cluster, next_moved, "a moved cluster")?;
                    next_moved += cs;
                    next_moved - cs
                }
                Entry::Compressed(run) => {
                    let guest = (index * run_len + i as u64) * cs;
                    decompress(commit, run, f.zstd, guest, &mut cluster)?;
                    commit.write(&cluster, next_moved, "a decompressed cluster")?;
                    next_moved += cs;
                    next_moved - cs
                }
            };
            table[i * 8..i * 8 + 8].copy_from_slice(&raw.to_le_bytes());
        }
        commit.write(&table, next_table, "an L2 table")?;
        l1[index as usize * 8..index as usize * 8 + 8].copy_from_slice(&next_table.to_le_bytes());
        next_table += tb;
        progress(index + 1);
    }
    commit.write(&l1, layout.l1, "the L1 table")?;
    if let Some(b) = &f.backing {
        commit.write(b.name.as_bytes(), layout.name_at, "the backing file name")?;
    }
    // The last table may be shorter than the end the header's checks expect.
    if commit.storage.len().unwrap_or(0) < layout.end {
        commit
            .storage
            .set_len(layout.end)
            .context(|| format!("extending {}", f.name))?;
    }
    Ok(())
}

/// Decompresses the compressed cluster `run` into `out`, which it must fill exactly:
/// raw deflate, or with `zstd` one or more zstd frames, as QEMU writes them.
fn decompress(
    commit: &Commit<'_>,
    run: CompressedRun,
    zstd: bool,
    guest: u64,
    out: &mut [u8],
) -> Result<()> {
    let len = run.len.min(commit.old_len.saturating_sub(run.offset)) as usize;
    let mut input = vec![0u8; len];
    commit.read(&mut input, run.offset, "a compressed cluster")?;
    let done = if zstd {
        unzstd(&input, out)
    } else {
        inflate(&input, out)
    };
    done.map_err(|why| {
        Error::invalid_argument(format!(
            "{}: the compressed cluster of guest offset {guest} at {} {why}; check the image \
             (qemu-img check)",
            commit.name, run.offset
        ))
    })
}

fn inflate(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    let got = miniz_oxide::inflate::decompress_to_vec_with_limit(input, out.len())
        .map_err(|e| format!("does not decompress ({:?})", e.status))?;
    if got.len() != out.len() {
        return Err(format!(
            "decompresses to {} bytes, not a cluster",
            got.len()
        ));
    }
    out.copy_from_slice(&got);
    Ok(())
}

/// QEMU may write a cluster as several frames: they are decoded one after the other
/// until the cluster is full; what follows (the rest of the last sector) is ignored.
fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut src = input;
    let mut filled = 0;
    while filled < out.len() {
        let mut frame = ruzstd::decoding::StreamingDecoder::new(&mut src)
            .map_err(|e| format!("does not decompress ({e})"))?;
        let before = filled;
        while filled < out.len() {
            match frame.read(&mut out[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Err(format!("does not decompress ({e})")),
            }
        }
        if filled == before {
            return Err(format!("decompresses to {filled} bytes, not a cluster"));
        }
    }
    Ok(())
}

/// Compacts the new image: what the source's metadata used is unreferenced in QED, and
/// the clusters at the end of the file move into it. When clusters stay unreferenced
/// because the L1 table lies past them (no free run was long enough for it before), the
/// L1 table moves into the first run of them and compaction runs again. `in_use`: the
/// length of the file once nothing is left unreferenced. Returns the file's length after.
fn reclaim(
    storage: Arc<dyn Storage>,
    name: &str,
    in_use: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let context = |e: Error| {
        Error::invalid_argument(format!(
            "{name} is now a QED image with the same guest data, but reclaiming the space of \
             the old metadata failed ({e}); run qed compact {name}"
        ))
    };
    let gaps = compact_once(&storage, name, in_use, progress).map_err(context)?;
    if let Some(to) = gaps {
        move_l1(&*storage, name, to).map_err(context)?;
        compact_once(&storage, name, in_use, progress).map_err(context)?;
    }
    storage
        .len()
        .context(|| format!("reading the length of {name}"))
}

/// Opens the image, compacts it and closes it. Returns where the L1 table could move to
/// let the file be cut: the first run of unreferenced clusters long enough, below it;
/// none when the file is as short as `in_use` (the walk that finds them is skipped).
fn compact_once(
    storage: &Arc<dyn Storage>,
    name: &str,
    in_use: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Option<u64>> {
    let opts = crate::chain::OpenOptions {
        no_backing: true,
        ..Default::default()
    };
    let image = Image::open_storage(Box::new(storage.clone()), Path::new(name), &opts)?;
    // Data clusters that are holes stay data: the free space is the old metadata's.
    let keep = ReorganizeOptions {
        cancel: None,
        keep_hole_clusters: true,
    };
    let end = compact(&image, &keep, progress)?;
    if matches!(end, ReorganizeEnd::Done { file_len, .. } if file_len <= in_use) {
        image.close()?;
        return Ok(None);
    }
    let header = image.header();
    let cs = u64::from(header.cluster_size);
    let leaks = image.check()?.leaked_offsets;
    image.close()?;
    let below = leaks
        .iter()
        .map(|&at| at / cs)
        .filter(|&c| c * cs < header.l1_table_offset);
    Ok(first_run(below, u64::from(header.table_size)).map(|c| c * cs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_compressed_bytes_are_errors() {
        let mut out = vec![0u8; 4096];
        for input in [
            &b""[..],
            b"\xff\xff\xff\xff",
            &[0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff],
        ] {
            assert!(inflate(input, &mut out).is_err());
            assert!(unzstd(input, &mut out).is_err());
        }
        // A stream that decompresses to less than a cluster.
        let short = miniz_oxide::deflate::compress_to_vec(&[7u8; 100], 6);
        assert!(inflate(&short, &mut out).unwrap_err().contains("100 bytes"));
    }

    #[test]
    fn first_run_finds_consecutive_clusters() {
        assert_eq!(first_run([1, 2, 4, 5, 6, 7, 9], 3), Some(4));
        assert_eq!(first_run([1, 3, 5], 2), None);
        assert_eq!(first_run([8], 1), Some(8));
    }
}
