//! Writing qcow2 metadata over a QED image's clusters: the qcow2 side of QED -> qcow2.
//!
//! Layout of what is appended, from the old end of the file rounded up to a cluster:
//! one L2 table (a cluster) for each run of guest clusters a qcow2 table reaches that
//! has anything allocated, the L1 table, the refcount blocks, the refcount table. Every
//! cluster in use gets refcount 1 and every entry pointing at one the COPIED flag, as
//! QEMU's check expects; the QED tables left behind get refcount 0 (free space) and are
//! punched after the switch. The version 3 header and its backing format extension fit
//! in the first sector; the backing file name goes into the first cluster past what
//! QED's header area uses (the name and a base pin record).

use super::entries::{survey, ClusterMap, Counts, Entry, GuestTables, SourceFacts};
use super::{round_up, Commit, InPlaceOptions, InPlacePlan};
use crate::block::Format;
use crate::error::{Error, Result};
use crate::format::qcow2::{self, encode_extensions, extension, refcount_block, Extension};
use crate::format::qcow2::{Qcow2Geometry, Qcow2Header};
use crate::storage::Storage;

/// Where the appended parts go.
struct Layout {
    cluster_bits: u32,
    base: u64,
    l1: u64,
    l1_entries: u64,
    refblocks: u64,
    refblock_count: u64,
    reftable: u64,
    reftable_clusters: u64,
    end: u64,
    name_at: u64,
}

/// Converts the QED image `src` to qcow2 in its file.
pub(super) fn convert(
    storage: &dyn Storage,
    src: &dyn GuestTables,
    opts: &InPlaceOptions,
    progress: super::super::Progress<'_>,
) -> Result<InPlacePlan> {
    let f = src.facts().clone();
    let name = f.name.as_str();
    let cs = f.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    if cluster_bits > qcow2::MAX_CLUSTER_BITS {
        return Err(Error::invalid_argument(format!(
            "{name}: its cluster size is {cs} bytes and qcow2's largest is 2 MiB, so its \
             clusters cannot stay where they are; copy it instead (qed convert -O qcow2 SRC \
             DST)"
        )));
    }
    let run_len = cs / 8;
    let runs = f.virtual_size.div_ceil(cs).div_ceil(run_len);
    let total = runs * 2;
    progress(0, total);
    let mut map = ClusterMap::new(f.file_len, cluster_bits);
    let counts = survey(src, run_len, cs, &mut map, &mut |c| {
        progress(c / run_len, total)
    })?;
    let backing_format = backing_format(&f, opts)?;
    let layout = plan_layout(&f, &counts, cluster_bits, backing_format.as_deref())?;
    let plan = InPlacePlan {
        source: Format::Qed,
        target: Format::Qcow2,
        cluster_size: cs,
        virtual_size: f.virtual_size,
        file_length: f.file_len,
        metadata_bytes: layout.end - layout.base,
        decompressed_clusters: 0,
        decompressed_bytes: 0,
        moved_bytes: 0,
        extra_bytes: layout.end - f.file_len,
        final_length: layout.end,
    };
    if opts.dry_run {
        return Ok(plan);
    }
    let commit = Commit::new(storage, name)?;
    let sector = header_sector(&layout, &f, backing_format.as_deref());
    commit.run(
        || {
            write_tables(&commit, src, &layout, &mut |done| {
                progress(runs + done, total)
            })?;
            write_refcounts(&commit, &layout, &map)?;
            if let Some(b) = &f.backing {
                commit.write(b.name.as_bytes(), layout.name_at, "the backing file name")?;
            }
            Ok(())
        },
        &sector,
    )?;
    // The QED tables are free clusters now: give their space back. Failing that only
    // costs space.
    for (at, len) in src.old_metadata() {
        let _ = storage.zero_range(at, len);
    }
    progress(total, total);
    Ok(plan)
}

/// The backing format the qcow2 header records: QED's raw bit, else what the caller
/// found by probing.
fn backing_format(f: &SourceFacts, opts: &InPlaceOptions) -> Result<Option<String>> {
    let Some(b) = &f.backing else {
        return Ok(None);
    };
    if b.name.len() > qcow2::MAX_BACKING_NAME {
        return Err(Error::invalid_argument(format!(
            "{}: the backing file name is {} bytes and qcow2 allows at most {}; shorten it \
             first (qed rebase -u -b NAME)",
            f.name,
            b.name.len(),
            qcow2::MAX_BACKING_NAME
        )));
    }
    Ok(b.format
        .clone()
        .or_else(|| opts.backing_format.map(|f| f.to_string())))
}

fn plan_layout(
    f: &SourceFacts,
    counts: &Counts,
    cluster_bits: u32,
    backing_format: Option<&str>,
) -> Result<Layout> {
    let cs = f.cluster_size;
    let g = Qcow2Geometry {
        cluster_bits,
        size: f.virtual_size,
    };
    let l1_entries = g.l1_entries();
    if l1_entries * 8 > qcow2::MAX_L1_BYTES {
        return Err(Error::invalid_argument(format!(
            "{}: a qcow2 image of {} bytes in {cs}-byte clusters needs an L1 table larger \
             than QEMU allows; copy it into larger clusters (qed convert -O qcow2 -o \
             cluster_size=64k SRC DST)",
            f.name, f.virtual_size
        )));
    }
    let base = round_up(f.file_len, cs);
    let l1 = base + counts.tables * cs;
    let l1_clusters = g.l1_clusters().max(1);
    let refblocks = l1 + l1_clusters * cs;
    // The refcount structures count themselves.
    let (blocks, table_clusters) = g.refcount_clusters(refblocks / cs);
    let reftable = refblocks + blocks * cs;
    let end = reftable + table_clusters * cs;
    if table_clusters > u64::from(u32::MAX) {
        return Err(Error::invalid_argument(format!(
            "{}: the file is too large",
            f.name
        )));
    }
    let name_at = round_up(f.header_used.max(512), 8);
    let name_len = f.backing.as_ref().map_or(0, |b| b.name.len() as u64);
    if name_at + name_len > cs {
        return Err(Error::invalid_argument(format!(
            "{}: the backing file name ({name_len} bytes) does not fit in qcow2's header \
             cluster beside QED's header; shorten it first (qed rebase -u -b NAME)",
            f.name
        )));
    }
    if backing_format.is_some_and(|fmt| fmt.len() > 64) {
        return Err(Error::invalid_argument(format!(
            "{}: the backing file's format name is too long",
            f.name
        )));
    }
    Ok(Layout {
        cluster_bits,
        base,
        l1,
        l1_entries,
        refblocks,
        refblock_count: blocks,
        reftable,
        reftable_clusters: table_clusters,
        end,
        name_at,
    })
}

/// The first sector: the version 3 header, then its extensions.
fn header_sector(layout: &Layout, f: &SourceFacts, backing_format: Option<&str>) -> [u8; 512] {
    let header = Qcow2Header {
        version: 3,
        backing_file_offset: if f.backing.is_some() {
            layout.name_at
        } else {
            0
        },
        backing_file_size: f.backing.as_ref().map_or(0, |b| b.name.len() as u32),
        cluster_bits: layout.cluster_bits,
        size: f.virtual_size,
        crypt_method: 0,
        l1_size: layout.l1_entries as u32,
        l1_table_offset: layout.l1,
        refcount_table_offset: layout.reftable,
        refcount_table_clusters: layout.reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: qcow2::REFCOUNT_ORDER,
        header_length: qcow2::V3_HEADER_LEN as u32,
        compression_type: 0,
    };
    let exts: Vec<Extension> = backing_format
        .filter(|_| f.backing.is_some())
        .map(|fmt| Extension {
            kind: extension::BACKING_FORMAT,
            data: fmt.as_bytes().to_vec(),
        })
        .into_iter()
        .collect();
    let mut sector = [0u8; 512];
    sector[..qcow2::V3_HEADER_LEN].copy_from_slice(&header.encode_v3());
    let exts = encode_extensions(&exts);
    sector[qcow2::V3_HEADER_LEN..qcow2::V3_HEADER_LEN + exts.len()].copy_from_slice(&exts);
    sector
}

/// Writes the L2 tables and the L1 table.
fn write_tables(
    commit: &Commit<'_>,
    src: &dyn GuestTables,
    layout: &Layout,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let f = src.facts();
    let cs = f.cluster_size;
    let run_len = cs / 8;
    let clusters = f.virtual_size.div_ceil(cs);
    let mut l1 = vec![0u8; ((layout.l1_entries * 8).div_ceil(cs).max(1) * cs) as usize];
    let mut run = vec![Entry::Unallocated; run_len as usize];
    let mut table = vec![0u8; cs as usize];
    let mut next_table = layout.base;
    let mut index = 0;
    while index * run_len < clusters {
        let any = src.read_run(index * run_len, &mut run)?
            && run.iter().any(|e| *e != Entry::Unallocated);
        if any {
            for (i, e) in run.iter().enumerate() {
                let raw = match *e {
                    Entry::Unallocated => 0,
                    Entry::Zero => qcow2::ZERO,
                    Entry::Data(off) => off | qcow2::COPIED,
                    // QED has no compressed clusters.
                    Entry::Compressed(_) => 0,
                };
                table[i * 8..i * 8 + 8].copy_from_slice(&raw.to_be_bytes());
            }
            commit.write(&table, next_table, "an L2 table")?;
            let at = index as usize * 8;
            l1[at..at + 8].copy_from_slice(&(next_table | qcow2::COPIED).to_be_bytes());
            next_table += cs;
        }
        index += 1;
        progress(index);
    }
    commit.write(&l1, layout.l1, "the L1 table")
}

/// Writes the refcount blocks and table: refcount 1 for the header cluster, every data
/// cluster and every appended cluster; 0 for the rest.
fn write_refcounts(commit: &Commit<'_>, layout: &Layout, data: &ClusterMap) -> Result<()> {
    let g = Qcow2Geometry {
        cluster_bits: layout.cluster_bits,
        size: 0,
    };
    let cs = g.cluster_size();
    let per_block = g.refcounts_per_block();
    let (new_from, new_to) = (layout.base / cs, layout.end / cs);
    let used = |c: u64| c == 0 || data.is_set(c) || (new_from..new_to).contains(&c);
    let mut block = vec![0u8; cs as usize];
    let mut table = vec![0u8; (layout.reftable_clusters * cs) as usize];
    for b in 0..layout.refblock_count {
        refcount_block(&g, b * per_block, new_to, used, &mut block);
        let at = layout.refblocks + b * cs;
        commit.write(&block, at, "a refcount block")?;
        table[b as usize * 8..b as usize * 8 + 8].copy_from_slice(&at.to_be_bytes());
    }
    commit.write(&table, layout.reftable, "the refcount table")
}
