//! Copy-on-read and streaming, against what they promise: what the guest reads never
//! changes, a guest write always wins over a fill, concurrent readers fetch a cluster
//! once, zeros stay sparse, and a stream runs while the image is in use, resumes after
//! a cancel and can keep a base.

mod support;

use qed::{
    Backing, BlockDevice, CreateOptions, Format, Image, ImageOptions, Mapping, MemoryStorage,
    OpenOptions, RawDevice, Storage, StreamEnd, StreamOptions,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::read;

const CS: u64 = 64 << 10;
const SIZE: u64 = 16 << 20;

/// A backing file's bytes: counts what is read from it, and takes its time, as a
/// server would, so that concurrent readers really overlap.
#[derive(Debug)]
struct SlowSource {
    bytes: Vec<u8>,
    delay: Duration,
    /// (offset, length) of every read.
    reads: Mutex<Vec<(u64, usize)>>,
}

impl Storage for SlowSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads.lock().unwrap().push((offset, buf.len()));
        std::thread::sleep(self.delay);
        let start = offset as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only"))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }
    fn set_len(&self, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only"))
    }
    fn zero_range(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only"))
    }
}

/// Backing bytes: data in every cluster but each fourth, which is all zeros.
fn backing_bytes() -> Vec<u8> {
    (0..SIZE)
        .map(|p| {
            if (p / CS) % 4 == 3 {
                0
            } else {
                (p.wrapping_mul(0x9e37_79b1) >> 13) as u8 | 1
            }
        })
        .collect()
}

/// An image over `source` (raw), in memory, with copy-on-read as asked.
fn image_over(source: Arc<SlowSource>, copy_on_read: bool) -> (Image, Arc<MemoryStorage>) {
    let mem = Arc::new(MemoryStorage::new());
    let mut opts = CreateOptions::new(SIZE);
    opts.backing_file = Some("base.raw".into());
    opts.backing_format = Some(Format::Raw);
    Image::create_on(&*mem, &opts).unwrap();
    let raw = RawDevice::new(Box::new(SharedSource(source)), "base.raw".into(), true).unwrap();
    let image = Image::begin_open(Box::new(mem.clone()), "top.qed".into())
        .unwrap()
        .finish(
            Some(Backing {
                name: "base.raw".into(),
                path: "base.raw".into(),
                declared_format: Some(Format::Raw),
                device: Some(Box::new(raw)),
            }),
            &ImageOptions {
                copy_on_read,
                ..ImageOptions::default()
            },
        )
        .unwrap();
    (image, mem)
}

#[derive(Debug)]
struct SharedSource(Arc<SlowSource>);

impl Storage for SharedSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.zero_range(offset, len)
    }
}

fn source(delay_ms: u64) -> Arc<SlowSource> {
    Arc::new(SlowSource {
        bytes: backing_bytes(),
        delay: Duration::from_millis(delay_ms),
        reads: Mutex::new(Vec::new()),
    })
}

#[test]
fn concurrent_readers_fetch_a_cluster_once() {
    let src = source(30);
    let (image, _mem) = image_over(src.clone(), true);
    let base = backing_bytes();
    let cluster = 5 * CS;
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let image = &image;
            let base = &base;
            s.spawn(move || {
                let off = cluster + i * 4096;
                let got = read(image, off, 4096);
                assert_eq!(got, base[off as usize..off as usize + 4096], "reader {i}");
            });
        }
    });
    let fetched: usize = src
        .reads
        .lock()
        .unwrap()
        .iter()
        .filter(|(o, l)| *o < cluster + CS && o + *l as u64 > cluster)
        .map(|(_, l)| *l)
        .sum();
    assert_eq!(fetched as u64, CS, "the cluster was fetched more than once");
    assert!(matches!(
        image.lookup(cluster, 1).unwrap().0,
        Mapping::Data(_)
    ));
    // Now local: reading again fetches nothing.
    let before = src.reads.lock().unwrap().len();
    read(&image, cluster, CS);
    assert_eq!(src.reads.lock().unwrap().len(), before);
}

#[test]
fn a_guest_write_always_wins_over_a_fill() {
    let src = source(1);
    let (image, _mem) = image_over(src, true);
    let base = backing_bytes();
    for c in 0..48u64 {
        let cluster = c * CS;
        let off = cluster + (c % 7) * 4096 + 512;
        let data = vec![c as u8 | 0x80; 3000];
        std::thread::scope(|s| {
            s.spawn(|| read(&image, cluster, CS));
            s.spawn(|| image.write_at(&data, off).unwrap());
        });
        let got = read(&image, cluster, CS);
        let rel = (off - cluster) as usize;
        assert_eq!(
            &got[rel..rel + data.len()],
            &data[..],
            "cluster {c}: write lost"
        );
        let want = &base[cluster as usize..(cluster + CS) as usize];
        assert_eq!(&got[..rel], &want[..rel], "cluster {c}: head");
        assert_eq!(
            &got[rel + data.len()..],
            &want[rel + data.len()..],
            "cluster {c}: tail"
        );
    }
}

#[test]
fn zeros_from_the_backing_file_become_zero_clusters() {
    let (image, mem) = image_over(source(0), true);
    let len_before = mem.len().unwrap();
    // Clusters 0..8: 6 with data, 2 all zeros.
    let got = read(&image, 0, 8 * CS);
    assert_eq!(got, backing_bytes()[..8 * CS as usize]);
    for c in 0..8 {
        let m = image.lookup(c * CS, 1).unwrap().0;
        if c % 4 == 3 {
            assert_eq!(m, Mapping::Zero, "cluster {c}");
        } else {
            assert!(matches!(m, Mapping::Data(_)), "cluster {c}: {m:?}");
        }
    }
    image.close().unwrap();
    // One L2 table and six data clusters, no more.
    let grown = mem.len().unwrap() - len_before;
    assert!(grown <= 6 * CS + 4 * CS, "file grew by {grown} bytes");
}

#[test]
fn without_copy_on_read_reads_leave_the_image_alone() {
    let (image, mem) = image_over(source(0), false);
    let len = mem.len().unwrap();
    read(&image, 0, 4 * CS);
    assert_eq!(image.lookup(0, 1).unwrap().0, Mapping::Unallocated);
    image.close().unwrap();
    assert_eq!(mem.len().unwrap(), len);
}

#[test]
fn a_stream_runs_while_writers_write() {
    let (image, _mem) = image_over(source(0), false);
    let model = Mutex::new(backing_bytes());
    let done = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (image, model, done, writes) = (&image, &model, &done, &writes);
            s.spawn(move || {
                let mut x = 0x1234_5678_9abc_def0u64 ^ t;
                while !done.load(Ordering::Acquire) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (SIZE / 512 - 16)) * 512;
                    let len = 512 * (1 + (x >> 40) % 16);
                    let data = vec![(x >> 32) as u8; len as usize];
                    // The model's lock spans the write: its order is the image's.
                    let mut m = model.lock().unwrap();
                    image.write_at(&data, off).unwrap();
                    m[off as usize..(off + len) as usize].copy_from_slice(&data);
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let end = qed::stream(&image, &StreamOptions::default(), &mut qed::no_progress);
        done.store(true, Ordering::Release);
        assert!(matches!(end, Ok(StreamEnd::Done { .. })), "{end:?}");
    });
    assert!(writes.load(Ordering::Relaxed) > 0);
    assert!(image.backing_file().is_none());
    assert!(image.backing().is_none());
    assert_eq!(read(&image, 0, SIZE), *model.lock().unwrap());
    // Nothing is unallocated that the backing file had data for.
    let mut pos = 0;
    while pos < SIZE {
        let (m, n) = image.lookup(pos, SIZE - pos).unwrap();
        if m == Mapping::Unallocated {
            assert!(
                backing_bytes()[pos as usize..(pos + n) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "unallocated data at {pos:#x}"
            );
        }
        pos += n;
    }
}

#[test]
fn a_cancelled_stream_leaves_the_backing_file_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, backing_bytes()).unwrap();
    let top = dir.path().join("top.qed");
    let mut opts = CreateOptions::new(SIZE);
    opts.backing_file = Some("base.raw".into());
    opts.backing_format = Some(Format::Raw);
    Image::create(&top, &opts).unwrap();

    let image = Image::open(&top, &OpenOptions::default()).unwrap();
    let cancel = AtomicBool::new(false);
    // Slow enough that progress reports come while it runs.
    let so = StreamOptions {
        cancel: Some(&cancel),
        rate: Some(16 << 20),
        ..StreamOptions::default()
    };
    let end = qed::stream(&image, &so, &mut |done, _| {
        if done >= SIZE / 2 {
            cancel.store(true, Ordering::Release);
        }
    })
    .unwrap();
    let StreamEnd::Cancelled { copied } = end else {
        panic!("not cancelled: {end:?}");
    };
    assert!(copied > 0 && copied < SIZE, "{copied}");
    image.close().unwrap();

    let image = Image::open(&top, &OpenOptions::default()).unwrap();
    assert_eq!(image.backing_file().unwrap().name, "base.raw");
    assert_eq!(read(&image, 0, SIZE), backing_bytes());
    let end = qed::stream(&image, &StreamOptions::default(), &mut qed::no_progress).unwrap();
    let StreamEnd::Done { copied: rest } = end else {
        panic!("{end:?}");
    };
    // The rerun copies only what the first run did not (the file has no holes: its
    // zero clusters are filled too, as zero clusters).
    assert_eq!(copied + rest, SIZE, "copied {copied} then {rest}");
    image.close().unwrap();

    std::fs::remove_file(&base).unwrap();
    let image = Image::open(&top, &OpenOptions::default()).unwrap();
    assert!(image.backing_file().is_none());
    assert_eq!(read(&image, 0, SIZE), backing_bytes());
    let report = image.check().unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0)
    );
}

#[test]
fn a_stream_can_keep_a_base() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("base.raw"), backing_bytes()).unwrap();
    let mut opts = CreateOptions::new(SIZE);
    opts.backing_file = Some("base.raw".into());
    opts.backing_format = Some(Format::Raw);
    Image::create(p("mid.qed"), &opts).unwrap();
    let mid = Image::open(p("mid.qed"), &OpenOptions::default()).unwrap();
    mid.write_at(&[0xaa; 8192], 3 * CS).unwrap();
    mid.write_at(&[0xbb; 100], 9 * CS + 7).unwrap();
    mid.close().unwrap();
    let mut opts = CreateOptions::new(SIZE);
    opts.backing_file = Some("mid.qed".into());
    opts.backing_format = Some(Format::Qed);
    Image::create(p("top.qed"), &opts).unwrap();

    let image = Image::open(p("top.qed"), &OpenOptions::default()).unwrap();
    let expected = read(&image, 0, SIZE);
    let base_path = p("base.raw");
    let depth = qed::stream_base(&image, base_path.to_str().unwrap()).unwrap();
    assert_eq!(depth, 2);
    assert!(qed::stream_base(&image, "elsewhere.raw").is_err());
    let so = StreamOptions {
        base: Some(depth),
        ..StreamOptions::default()
    };
    qed::stream(&image, &so, &mut qed::no_progress).unwrap();
    assert_eq!(read(&image, 0, SIZE), expected);
    // Only mid's two clusters were copied: the base still supplies the rest.
    assert!(matches!(
        image.lookup(3 * CS, 1).unwrap().0,
        Mapping::Data(_)
    ));
    assert!(matches!(
        image.lookup(9 * CS, 1).unwrap().0,
        Mapping::Data(_)
    ));
    assert_eq!(image.lookup(0, 1).unwrap().0, Mapping::Unallocated);
    image.close().unwrap();

    std::fs::remove_file(p("mid.qed")).unwrap();
    let image = Image::open(p("top.qed"), &OpenOptions::default()).unwrap();
    let b = image.backing_file().unwrap();
    assert_eq!(Path::new(&b.name), base_path.canonicalize().unwrap());
    assert_eq!(b.declared_format, Some(Format::Raw));
    assert_eq!(read(&image, 0, SIZE), expected);
}

#[test]
fn a_stream_keeps_to_its_rate() {
    let (image, _mem) = image_over(source(0), false);
    let start = Instant::now();
    let so = StreamOptions {
        rate: Some(8 << 20),
        ..StreamOptions::default()
    };
    let end = qed::stream(&image, &so, &mut qed::no_progress).unwrap();
    let StreamEnd::Done { copied } = end else {
        panic!("{end:?}");
    };
    // 12 MiB of data at 8 MiB/s: at least a second and a half, whatever the machine.
    assert!(copied >= 12 << 20, "{copied}");
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
}

// Successive streams on one open image.

const M: u64 = 1 << 20;

fn create_layer(path: &Path, backing: Option<&str>, fill: Option<(u8, u64)>) {
    let mut opts = CreateOptions::new(4 * M);
    opts.backing_file = backing.map(str::to_string);
    Image::create(path, &opts).unwrap();
    if let Some((byte, at)) = fill {
        let image = Image::open(path, &OpenOptions::default()).unwrap();
        image.write_at(&vec![byte; M as usize], at).unwrap();
        image.close().unwrap();
    }
}

fn read_mib(image: &Image, at: u64) -> Vec<u8> {
    let mut buf = vec![0u8; M as usize];
    image.read_at(&mut buf, at).unwrap();
    buf
}

#[test]
fn a_second_stream_names_the_layer_the_first_one_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_layer(&dir.join("base.qed"), None, Some((0xbb, 0)));
    create_layer(&dir.join("mid.qed"), Some("base.qed"), Some((0xcc, M)));
    create_layer(&dir.join("top.qed"), Some("mid.qed"), Some((0xdd, 2 * M)));

    let top = dir.join("top.qed");
    let image = Image::open(&top, &OpenOptions::default()).unwrap();
    let base = qed::stream_base(&image, dir.join("base.qed").to_str().unwrap()).unwrap();
    assert_eq!(base, 2);
    let run = |base| {
        let opts = StreamOptions {
            base: Some(base),
            ..Default::default()
        };
        qed::stream(&image, &opts, &mut qed::no_progress).unwrap()
    };
    assert!(matches!(run(base), StreamEnd::Done { .. }));
    // Now base.qed is the backing file: layer 1, whose name must be base.qed's, not
    // the name mid.qed had in the header the image was opened with.
    assert_eq!(
        qed::stream_base(&image, dir.join("base.qed").to_str().unwrap()).unwrap(),
        1
    );
    assert!(matches!(run(1), StreamEnd::Done { .. }));
    assert_eq!(read_mib(&image, 0), vec![0xbb; M as usize]);
    assert_eq!(read_mib(&image, M), vec![0xcc; M as usize]);
    image.close().unwrap();

    let image = Image::open(&top, &OpenOptions::default()).unwrap();
    let named = image.backing_file().expect("a backing file").name.clone();
    assert_eq!(
        Path::new(&named).canonicalize().unwrap(),
        dir.join("base.qed").canonicalize().unwrap(),
        "the header names {named}"
    );
    assert_eq!(read_mib(&image, 0), vec![0xbb; M as usize]);
    assert_eq!(read_mib(&image, M), vec![0xcc; M as usize]);
    assert_eq!(read_mib(&image, 2 * M), vec![0xdd; M as usize]);
    assert_eq!(read_mib(&image, 3 * M), vec![0; M as usize]);
}

#[test]
fn a_base_is_found_relative_to_the_image_as_well() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_layer(&dir.join("base.qed"), None, None);
    create_layer(&dir.join("top.qed"), Some("base.qed"), None);
    let image = Image::open(dir.join("top.qed"), &OpenOptions::default()).unwrap();
    // The tests' directory is not the image's: only the image's directory has it.
    assert!(!Path::new("base.qed").exists());
    assert_eq!(qed::stream_base(&image, "base.qed").unwrap(), 1);
    let err = qed::stream_base(&image, "other.qed").unwrap_err();
    assert!(
        err.to_string().contains("not in the backing chain"),
        "{err}"
    );
}
