//! Memory bounds on untrusted images (docs/design.md, "Bounds on memory"): a header may
//! claim 1 GiB tables or a 64 TiB disk, and nothing may allocate in proportion to what
//! it claims. A counting global allocator measures the peak bytes allocated while an
//! image is created, opened, read, written, checked, repaired and shrunk; the file lives
//! in a sparse in-memory storage, so that only the bytes written take memory.

use qed::RepairMode;
use qed::Storage;
use qed::{BlockDevice, CreateOptions, Image, OpenOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Both blocks exist for a moment; count the new one before freeing the old.
            grew(new_size);
            CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Measurements must not overlap: the counters are global.
static SERIAL: Mutex<()> = Mutex::new(());

const MIB: usize = 1 << 20;

/// Runs `f` and returns its result with the peak bytes allocated above the level before.
fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = f();
    (r, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

/// Asserts that `what` peaked under `limit` bytes; returns the peak.
fn bounded<T>(what: &str, limit: usize, f: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let (r, p) = peak(f);
    println!(
        "memory: {what}: peak {:.2} MiB ({:.1?})",
        p as f64 / MIB as f64,
        t.elapsed()
    );
    assert!(
        p < limit,
        "{what} allocated {p} bytes at its peak, over {limit}"
    );
    r
}

/// A file of any length that stores only the 4 KiB pages holding non-zero bytes.
#[derive(Debug, Default)]
struct Sparse {
    len: AtomicU64,
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

const PAGE: u64 = 4096;

impl Sparse {
    fn stored_bytes(&self) -> u64 {
        self.pages.lock().unwrap().len() as u64 * PAGE
    }
}

impl Storage for Sparse {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let len = self.len.load(Ordering::SeqCst);
        let end = (offset + buf.len() as u64).min(len);
        let pages = self.pages.lock().unwrap();
        for (&p, data) in pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let (from, to) = ((p * PAGE).max(offset), ((p + 1) * PAGE).min(end));
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - p * PAGE) as usize..(to - p * PAGE) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pages = self.pages.lock().unwrap();
        for p in offset / PAGE..end.div_ceil(PAGE) {
            let (from, to) = ((p * PAGE).max(offset), ((p + 1) * PAGE).min(end));
            let src = &buf[(from - offset) as usize..(to - offset) as usize];
            // Zeros where nothing is stored yet read back as zeros already: storing them
            // would count this storage's memory against the library.
            if !pages.contains_key(&p) && src.iter().all(|&b| b == 0) {
                continue;
            }
            let data = pages
                .entry(p)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            data[(from - p * PAGE) as usize..(to - p * PAGE) as usize].copy_from_slice(src);
        }
        self.len.fetch_max(end, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::SeqCst))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut pages = self.pages.lock().unwrap();
        pages.retain(|&p, _| p * PAGE < len);
        if let Some(last) = pages.get_mut(&(len / PAGE)) {
            last[(len % PAGE) as usize..].fill(0);
        }
        self.len.store(len, Ordering::SeqCst);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut pages = self.pages.lock().unwrap();
        let keys: Vec<u64> = pages
            .range(offset / PAGE..end.div_ceil(PAGE))
            .map(|(&p, _)| p)
            .collect();
        for p in keys {
            let (from, to) = ((p * PAGE).max(offset), ((p + 1) * PAGE).min(end));
            if to - from == PAGE {
                pages.remove(&p);
            } else if let Some(d) = pages.get_mut(&p) {
                d[(from - p * PAGE) as usize..(to - p * PAGE) as usize].fill(0);
            }
        }
        Ok(())
    }
}

fn open(storage: &Arc<Sparse>, read_only: bool) -> Image {
    let opts = OpenOptions {
        image: qed::ImageOptions {
            read_only,
            ..qed::ImageOptions::default()
        },
        ..OpenOptions::default()
    };
    Image::open_storage(Box::new(storage.clone()), Path::new("big.qed"), &opts).unwrap()
}

/// Every operation on an image of this geometry and size, each under `limit`. With
/// `backing`, over a sparse raw backing file of two clusters, so that partial writes and
/// zero writes copy from it.
fn exercise(cluster: u32, table: u32, size: u64, backing: bool, limit: usize) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let name = format!(
        "{} KiB clusters x {table}{}",
        cluster / 1024,
        if backing { " over raw" } else { "" }
    );
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Sparse::default());
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster;
    opts.table_size = table;
    if backing {
        let path = dir.path().join("base.raw");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(2 * u64::from(cluster)).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"backing", 5).unwrap();
        opts.backing_file = Some(path.to_str().unwrap().to_string());
        opts.backing_format = Some(qed::Format::Raw);
    }
    bounded(&format!("{name}: create"), limit, || {
        Image::create_on(&*storage, &opts).unwrap()
    });

    let image = bounded(&format!("{name}: open read-only"), limit, || {
        open(&storage, true)
    });
    let g = image.geometry();
    let size = image.size();
    let cs = g.cluster_size();
    // Far apart: the last L2 table of the image, and one in the middle.
    let far = size - cs - 512;
    let mid = size / 2 / cs * cs + 100;
    bounded(&format!("{name}: reads"), limit, || {
        let mut buf = vec![0u8; 64 << 10];
        for pos in [0, mid, far] {
            image.read_at(&mut buf, pos).unwrap();
        }
        image.block_status(0, size).unwrap();
    });
    drop(image);

    let image = bounded(&format!("{name}: open read-write"), limit, || {
        open(&storage, false)
    });
    bounded(
        &format!("{name}: writes, zero writes, discards"),
        limit,
        || {
            // Two L2 tables: each walk of a 1 GiB table takes a while.
            for pos in [far, 7 * cs + 3] {
                image.write_at(b"bounded", pos).unwrap();
            }
            let mut buf = [0u8; 7];
            image.read_at(&mut buf, far).unwrap();
            assert_eq!(&buf, b"bounded");
            // Partial and whole-cluster zero writes, in allocated and unallocated clusters.
            image.write_zeroes(mid + 1, cs).unwrap();
            image.write_zeroes(g.cluster_start(far), cs).unwrap();
            image.write_zeroes(3 * cs, 2 * cs).unwrap();
            // Partial clusters over the backing file: copies and zero fills.
            image.write_at(b"x", cs + 17).unwrap();
            image.write_zeroes(1, cs - 2).unwrap();
            image.discard(0, 16 * cs).unwrap();
            image.flush().unwrap();
        },
    );
    if backing {
        // The rest never reads the backing file, and is measured without one.
        return;
    }
    let report = bounded(&format!("{name}: check"), limit, || image.check().unwrap());
    // The clusters the discard freed are referenced by nothing until they are reused:
    // leaks, to a check.
    assert_eq!(
        (report.corruptions, report.leaks * cs),
        (0, image.freed_bytes()),
        "{report:?}"
    );
    // Close gives back the freed clusters that end the file; those below stay leaks.
    image.close().unwrap();
    let left = open(&storage, true).check().unwrap().leaks;
    // One more leak for the repair to reclaim: a cluster at the end nothing references.
    let file = storage.len().unwrap();
    storage.set_len(file + cs).unwrap();
    let mut image = open(&storage, false);
    let report = bounded(&format!("{name}: repair"), limit, || {
        image.repair(RepairMode::All).unwrap()
    });
    assert_eq!(report.leaks_fixed, left + 1, "{report:?}");
    // Shrinking to just past the start of the last table clears the rest of it: almost
    // every entry.
    bounded(&format!("{name}: shrink"), limit, || {
        image
            .resize(g.l1_index(far) * g.l2_coverage() + 512, true)
            .unwrap();
        image.resize(size, false).unwrap();
    });
    bounded(&format!("{name}: close"), limit, || image.close().unwrap());
    println!(
        "memory: {name}: the file is {} bytes long, {} stored",
        storage.len().unwrap(),
        storage.stored_bytes()
    );
}

fn max_size(cluster: u32, table: u32) -> u64 {
    qed::Geometry::new(cluster, table).unwrap().max_image_size()
}

/// 64 MiB clusters with 16-cluster tables: every L1 and L2 table is 1 GiB.
#[test]
fn one_gib_tables_are_never_loaded_whole() {
    exercise(64 << 20, 16, max_size(64 << 20, 16), false, 4 * MIB);
}

/// The same over a backing file: copies from it and zero fills stay in small buffers.
#[test]
fn one_gib_tables_over_a_backing_file() {
    exercise(64 << 20, 16, max_size(64 << 20, 16), true, 4 * MIB);
}

/// The default geometry at its maximum size, 64 TiB.
#[test]
fn a_64_tib_image_costs_little() {
    exercise(64 << 10, 4, 64 << 40, false, 2 * MIB);
}

/// The largest L1 the format allows in memory: 2^21 entries (16 MiB), for 1 MiB
/// clusters with 16-cluster tables and a maximal image size.
#[test]
fn the_largest_l1_is_held_once() {
    exercise(
        1 << 20,
        16,
        max_size(1 << 20, 16),
        false,
        16 * MIB + 2 * MIB,
    );
}
