//! An image written front to back, as one stream of bytes ([`SequentialImage`]): for a
//! destination that takes bytes only in order (an object store's upload), and for readers
//! that read an image in order (a stream, a boot), which then find every table before
//! any data.
//!
//! A QED image is laid out as the header, the L1 table, every L2 table, then the data
//! clusters in guest order. The tables come first, so where each data cluster lands must
//! be known before any data is read: a first pass ([`SequentialImage::plan`]) walks the
//! source's allocation and notes which clusters hold data, which read as zeros, and
//! (with a new backing file) which differ from it; a second ([`SequentialImage::write`])
//! reads the data and emits the image. What the plan keeps is a list of runs of clusters,
//! so its memory follows how fragmented the source is, not how large.
//!
//! A raw image is every byte of the source, in order.

use super::step::{is_zero, read_padded, Progress, STEP};
use crate::block::{BlockDevice, Format};
use crate::chain::describe;
use crate::engine::{CreateOptions, Image};
use crate::error::{Error, Result};
use crate::format::table::{encode_entries, ZERO_CLUSTER};
use crate::format::Geometry;
use crate::storage::{MemoryStorage, Storage};
use std::sync::atomic::{AtomicBool, Ordering};

/// How to lay out the image.
#[derive(Debug, Clone)]
pub struct SequentialOptions<'a> {
    /// [`Format::Qed`] or [`Format::Raw`].
    pub format: Format,
    /// The QED image's geometry and backing file; its size is the source's.
    pub create: CreateOptions,
    /// 0 keeps every cluster the source stores as data; otherwise clusters that read as
    /// zeros are left out (or, over a backing file, written as zero clusters).
    pub sparse_size: u64,
    /// What the image reads where it has no data of its own (its backing file, opened):
    /// only clusters that differ from it are kept.
    pub target_backing: Option<&'a dyn BlockDevice>,
    /// Set to stop planning: the plan then fails, saying it was interrupted.
    pub cancel: Option<&'a AtomicBool>,
}

/// What one run of guest clusters is in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Nothing stored: reads from the backing file, or as zeros.
    Unallocated,
    /// A QED zero cluster: reads as zeros over a backing file.
    Zero,
    /// Stored, in guest order after the tables.
    Data,
}

/// Consecutive guest clusters of one kind.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    count: u64,
    kind: Kind,
}

/// An image planned for writing front to back.
#[derive(Debug)]
pub struct SequentialImage {
    format: Format,
    /// The guest's size.
    size: u64,
    layout: Option<QedLayout>,
}

/// Where everything of a QED image goes.
#[derive(Debug)]
struct QedLayout {
    geometry: Geometry,
    /// The header cluster(s), backing file name included.
    header_area: Vec<u8>,
    /// The guest's clusters, all of them, in order, as runs.
    runs: Vec<Run>,
    /// The L1 entries that have an L2 table, in order.
    tables: Vec<u64>,
    data_clusters: u64,
}

impl QedLayout {
    fn l1_offset(&self) -> u64 {
        self.header_area.len() as u64
    }

    fn first_table(&self) -> u64 {
        self.l1_offset() + self.geometry.table_bytes()
    }

    fn first_data(&self) -> u64 {
        self.first_table() + self.tables.len() as u64 * self.geometry.table_bytes()
    }

    fn len(&self) -> u64 {
        self.first_data() + self.data_clusters * self.geometry.cluster_size()
    }
}

impl SequentialImage {
    /// Plans the image of `src` as `opts` says: for QED, reads the source's allocation,
    /// and the data itself when zeros are to be left out or a backing file compared.
    pub fn plan(src: &dyn BlockDevice, opts: &SequentialOptions<'_>) -> Result<Self> {
        let size = src.size();
        let layout = match opts.format {
            Format::Raw => None,
            Format::Qed => Some(plan_qed(src, opts)?),
            other => {
                return Err(Error::invalid_argument(format!(
                    "{other} images cannot be written front to back: use qed or raw"
                )))
            }
        };
        Ok(Self {
            format: opts.format,
            size,
            layout,
        })
    }

    /// The image's length in bytes.
    pub fn len(&self) -> u64 {
        match &self.layout {
            Some(l) => l.len(),
            None => self.size,
        }
    }

    /// Whether the image has no bytes (a raw image of an empty source).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The format it is written in.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Emits the image to `sink`, front to back, in pieces of at most 2 MiB (one
    /// cluster, if larger), reading the data from `src`, which must be the source
    /// planned from. `progress` counts the image's bytes.
    pub fn write(
        &self,
        src: &dyn BlockDevice,
        cancel: Option<&AtomicBool>,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
        progress: Progress<'_>,
    ) -> Result<()> {
        if src.size() != self.size {
            return Err(Error::invalid_argument(format!(
                "the source is {} bytes, and the image was planned for {}",
                src.size(),
                self.size
            )));
        }
        let total = self.len();
        let mut done = 0u64;
        let mut emit = |bytes: &[u8]| -> Result<()> {
            check(cancel)?;
            sink(bytes)?;
            done += bytes.len() as u64;
            progress(done, total);
            Ok(())
        };
        match &self.layout {
            None => write_raw(src, &mut emit),
            Some(l) => write_qed(l, src, &mut emit),
        }
    }
}

/// Fails when `cancel` is set.
fn check(cancel: Option<&AtomicBool>) -> Result<()> {
    if cancel.is_some_and(|c| c.load(Ordering::Acquire)) {
        return Err(Error::invalid_argument("interrupted"));
    }
    Ok(())
}

/// Every byte of `src`: data read, zero runs emitted from a zeroed buffer.
fn write_raw(src: &dyn BlockDevice, emit: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let size = src.size();
    let mut buf = vec![0u8; STEP as usize];
    let mut pos = 0;
    while pos < size {
        let e = describe(src, pos, (size - pos).min(STEP), 0)?;
        let n = e.length.clamp(1, size - pos) as usize;
        if e.zero {
            buf[..n].fill(0);
        } else {
            src.read_at(&mut buf[..n], pos)?;
        }
        emit(&buf[..n])?;
        pos += n as u64;
    }
    Ok(())
}

/// Appends `count` clusters of `kind` at `start` to `runs`, merging with the last run.
fn push(runs: &mut Vec<Run>, start: u64, count: u64, kind: Kind) {
    if count == 0 {
        return;
    }
    match runs.last_mut() {
        Some(r) if r.kind == kind && r.start + r.count == start => r.count += count,
        _ => runs.push(Run { start, count, kind }),
    }
}

/// The first pass of a QED image: what every guest cluster is.
fn plan_qed(src: &dyn BlockDevice, opts: &SequentialOptions<'_>) -> Result<QedLayout> {
    let mut create = opts.create.clone();
    create.size = src.size();
    let header = create.header()?;
    let geometry = header.validate(u64::MAX)?;
    // The header area as a new image has it: the backing name and all.
    let mem = MemoryStorage::new();
    Image::create_on(&mem, &create)?;
    let mut header_area = vec![0u8; header.l1_table_offset as usize];
    mem.read_at(&mut header_area, 0)
        .map_err(|e| Error::invalid_argument(format!("laying out the header: {e}")))?;

    let cs = geometry.cluster_size();
    let size = header.image_size;
    let clusters = size.div_ceil(cs);
    // Clusters examined at a time: whole clusters, about a step's worth.
    let window = (STEP / cs).max(1);
    let backing = opts.target_backing;
    let read_data = opts.sparse_size > 0 || backing.is_some();
    let mut runs = Vec::new();
    let mut maybe_data = vec![false; window as usize];
    let mut buf = Vec::new();
    let mut under = Vec::new();
    let mut c = 0;
    while c < clusters {
        check(opts.cancel)?;
        let n = window.min(clusters - c);
        let (start, end) = (c * cs, ((c + n) * cs).min(src.size()));
        // Clusters that hold any byte the source does not know to be zero.
        maybe_data[..n as usize].fill(false);
        let mut p = start;
        while p < end {
            let e = describe(src, p, end - p, 0)?;
            let len = e.length.clamp(1, end - p);
            if !e.zero {
                let first = (p - start) / cs;
                let last = (p + len - 1 - start) / cs;
                maybe_data[first as usize..=last as usize].fill(true);
            }
            p += len;
        }
        let mut i = 0;
        while i < n {
            let data = maybe_data[i as usize];
            let mut j = i + 1;
            while j < n && maybe_data[j as usize] == data {
                j += 1;
            }
            let (first, count) = (c + i, j - i);
            if !data {
                plan_zeros(&mut runs, backing, first, count, cs)?;
            } else if !read_data {
                push(&mut runs, first, count, Kind::Data);
            } else {
                let bytes = (count * cs) as usize;
                buf.resize(bytes, 0);
                read_padded(src, &mut buf, first * cs)?;
                if let Some(b) = backing {
                    under.resize(bytes, 0);
                    read_padded(b, &mut under, first * cs)?;
                }
                for k in 0..count {
                    let r = (k * cs) as usize..((k + 1) * cs) as usize;
                    let (data, base) = (&buf[r.clone()], under.get(r));
                    let kind = match base {
                        Some(base) if data == base => Kind::Unallocated,
                        Some(_) if is_zero(data) => Kind::Zero,
                        None if is_zero(data) => Kind::Unallocated,
                        _ => Kind::Data,
                    };
                    push(&mut runs, first + k, 1, kind);
                }
            }
            i = j;
        }
        c += n;
    }

    let per_table = geometry.entries_per_table();
    let mut tables: Vec<u64> = Vec::new();
    let mut data_clusters = 0;
    for r in &runs {
        if r.kind == Kind::Data {
            data_clusters += r.count;
        }
        if r.kind != Kind::Unallocated {
            let (a, b) = (r.start / per_table, (r.start + r.count - 1) / per_table);
            for t in a..=b {
                if tables.last() != Some(&t) {
                    tables.push(t);
                }
            }
        }
    }
    Ok(QedLayout {
        geometry,
        header_area,
        runs,
        tables,
        data_clusters,
    })
}

/// Clusters the source reads as zeros: nothing stored, unless a backing file would
/// show through with something else.
fn plan_zeros(
    runs: &mut Vec<Run>,
    backing: Option<&dyn BlockDevice>,
    first: u64,
    count: u64,
    cs: u64,
) -> Result<()> {
    let Some(b) = backing else {
        push(runs, first, count, Kind::Unallocated);
        return Ok(());
    };
    for k in first..first + count {
        let (start, end) = (k * cs, ((k + 1) * cs).min(b.size()));
        let mut zero = true;
        let mut p = start;
        while p < end && zero {
            let e = describe(b, p, end - p, 0)?;
            zero = e.zero;
            p += e.length.clamp(1, end - p);
        }
        push(
            runs,
            k,
            1,
            if zero { Kind::Unallocated } else { Kind::Zero },
        );
    }
    Ok(())
}

/// The second pass of a QED image: header, L1, L2 tables, data.
fn write_qed(
    l: &QedLayout,
    src: &dyn BlockDevice,
    emit: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let g = &l.geometry;
    let cs = g.cluster_size();
    let table_bytes = g.table_bytes() as usize;
    let per_table = g.entries_per_table();
    emit(&l.header_area)?;

    let mut entries = vec![0u64; per_table as usize];
    let mut table = vec![0u8; table_bytes];
    for (k, &t) in l.tables.iter().enumerate() {
        entries[t as usize] = l.first_table() + k as u64 * g.table_bytes();
    }
    encode_entries(&entries, &mut table);
    emit(&table)?;

    // The L2 tables, walking the runs once.
    let mut next_data = l.first_data();
    let mut runs = l.runs.iter().peekable();
    for &t in &l.tables {
        let (first, last) = (t * per_table, (t + 1) * per_table);
        entries.fill(0);
        while let Some(r) = runs.peek() {
            if r.start >= last {
                break;
            }
            let (a, b) = (r.start.max(first), (r.start + r.count).min(last));
            for c in a..b {
                entries[(c - first) as usize] = match r.kind {
                    Kind::Unallocated => 0,
                    Kind::Zero => ZERO_CLUSTER,
                    Kind::Data => {
                        let at = next_data;
                        next_data += cs;
                        at
                    }
                };
            }
            if r.start + r.count <= last {
                runs.next();
            } else {
                break;
            }
        }
        encode_entries(&entries, &mut table);
        emit(&table)?;
    }

    // The data, in guest order, whole clusters (the last padded with zeros).
    let piece = (STEP / cs).max(1);
    let mut buf = vec![0u8; (piece * cs) as usize];
    for r in l.runs.iter().filter(|r| r.kind == Kind::Data) {
        let mut c = r.start;
        while c < r.start + r.count {
            let n = piece.min(r.start + r.count - c);
            let bytes = &mut buf[..(n * cs) as usize];
            read_padded(src, bytes, c * cs)?;
            emit(bytes)?;
            c += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ImageOptions;

    fn image_of(bytes: Vec<u8>) -> Image {
        Image::begin_open(Box::new(MemoryStorage::from_bytes(bytes)), "mem".into())
            .unwrap()
            .finish(None, &ImageOptions::default())
            .unwrap()
    }

    #[test]
    fn tables_come_first_and_data_in_guest_order() {
        let size = 8u64 << 20;
        let src = MemoryStorage::new();
        Image::create_on(&src, &CreateOptions::new(size)).unwrap();
        let src = image_of(src.to_bytes());
        // Written out of guest order, with a run of zeros that is stored as data.
        for (pos, byte) in [(5u64 << 20, 5u8), (1 << 20, 1), (3 << 20, 0), (7 << 20, 7)] {
            src.write_at(&vec![byte; 65536], pos).unwrap();
        }
        let opts = SequentialOptions {
            format: Format::Qed,
            create: CreateOptions::new(size),
            sparse_size: 4096,
            target_backing: None,
            cancel: None,
        };
        let plan = SequentialImage::plan(&src, &opts).unwrap();
        let mut out = Vec::new();
        plan.write(
            &src,
            None,
            &mut |b| {
                out.extend_from_slice(b);
                Ok(())
            },
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(out.len() as u64, plan.len());
        // Header, L1 (4 clusters), one L2, three data clusters: the zeros are left out.
        assert_eq!(out.len() as u64, (1 + 4 + 4 + 3) * 65536);
        let copy = image_of(out);
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        src.read_at(&mut a, 0).unwrap();
        copy.read_at(&mut b, 0).unwrap();
        assert!(a == b);
        let offsets: Vec<u64> = [1u64, 5, 7]
            .iter()
            .map(|m| copy.block_status(m << 20, 65536).unwrap().offset.unwrap())
            .collect();
        assert_eq!(offsets, [9 * 65536, 10 * 65536, 11 * 65536]);
    }
}
