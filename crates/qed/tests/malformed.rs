//! Hand-corrupted images. A corrupt header must be refused with an error naming the
//! field and its value; a corrupt table entry must fail only the I/O that reaches it;
//! and no corruption at all may make the library panic, hang or grow without bound.

mod support;

use qed::features;
use qed::Corruption;
use qed::{BlockDevice, CheckReport, CreateOptions, Error, Image, OpenOptions};
use qed::{MemoryStorage, Storage};
use std::path::Path;
use std::sync::Arc;
use support::{get_u64, put_u32, put_u64};

/// Cluster size of the default geometry, which most cases use.
const CS: u64 = 64 * 1024;
const SIZE: u64 = 4 << 20;

// Header field offsets, from the format's header layout.
const CLUSTER_SIZE: usize = 0x04;
const TABLE_SIZE: usize = 0x08;
const HEADER_SIZE: usize = 0x0C;
const FEATURES: usize = 0x10;
const COMPAT_FEATURES: usize = 0x18;
const AUTOCLEAR_FEATURES: usize = 0x20;
const L1_TABLE_OFFSET: usize = 0x28;
const IMAGE_SIZE: usize = 0x30;
const BACKING_FILENAME_OFFSET: usize = 0x38;
const BACKING_FILENAME_SIZE: usize = 0x3C;

fn create(opts: &CreateOptions) -> Vec<u8> {
    let storage = MemoryStorage::new();
    Image::create_on(&storage, opts).unwrap();
    storage.to_bytes()
}

/// A new 4 MiB image with the default geometry: header cluster, then a 4-cluster L1.
fn fresh() -> Vec<u8> {
    create(&CreateOptions::new(SIZE))
}

fn open_on(storage: Arc<MemoryStorage>, read_only: bool) -> qed::Result<Image> {
    let opts = OpenOptions {
        image: qed::ImageOptions {
            read_only,
            ..qed::ImageOptions::default()
        },
        ..OpenOptions::default()
    };
    Image::open_storage(Box::new(storage), Path::new("x.qed"), &opts)
}

fn open(bytes: Vec<u8>, read_only: bool) -> qed::Result<Image> {
    open_on(Arc::new(MemoryStorage::from_bytes(bytes)), read_only)
}

/// Writes through the library and returns the resulting file.
fn with_writes(bytes: Vec<u8>, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let storage = Arc::new(MemoryStorage::from_bytes(bytes));
    let image = open_on(storage.clone(), false).unwrap();
    for (pos, data) in writes {
        image.write_at(data, *pos).unwrap();
    }
    image.close().unwrap();
    storage.to_bytes()
}

fn l1_offset(bytes: &[u8]) -> u64 {
    get_u64(bytes, L1_TABLE_OFFSET)
}

// ---------------------------------------------------------------------------------------
// Headers that must be refused.

#[derive(Debug, Clone, Copy)]
enum Expect {
    BadMagic([u8; 4]),
    /// `Error::InvalidHeader` naming this field and value.
    Field(&'static str, u64),
    /// `Error::UnsupportedFeatures` with exactly these bits.
    Features(u64),
}

struct Case {
    name: &'static str,
    corrupt: fn(&mut Vec<u8>),
    expect: Expect,
}

fn header_cases() -> Vec<Case> {
    vec![
        Case {
            name: "bad magic",
            corrupt: |b| b[..4].copy_from_slice(b"QEF\0"),
            expect: Expect::BadMagic(*b"QEF\0"),
        },
        Case {
            name: "magic of a qcow2 image",
            corrupt: |b| b[..4].copy_from_slice(b"QFI\xfb"),
            expect: Expect::BadMagic(*b"QFI\xfb"),
        },
        Case {
            name: "cluster_size 0",
            corrupt: |b| put_u32(b, CLUSTER_SIZE, 0),
            expect: Expect::Field("cluster_size", 0),
        },
        Case {
            name: "cluster_size 1000",
            corrupt: |b| put_u32(b, CLUSTER_SIZE, 1000),
            expect: Expect::Field("cluster_size", 1000),
        },
        Case {
            name: "cluster_size 2048 (below 4 KiB)",
            corrupt: |b| put_u32(b, CLUSTER_SIZE, 2048),
            expect: Expect::Field("cluster_size", 2048),
        },
        Case {
            name: "cluster_size not a power of two",
            corrupt: |b| put_u32(b, CLUSTER_SIZE, 65536 + 4096),
            expect: Expect::Field("cluster_size", 65536 + 4096),
        },
        Case {
            name: "cluster_size 128 MiB",
            corrupt: |b| put_u32(b, CLUSTER_SIZE, 128 << 20),
            expect: Expect::Field("cluster_size", 128 << 20),
        },
        Case {
            name: "cluster_size u32::MAX",
            corrupt: |b| put_u32(b, CLUSTER_SIZE, u32::MAX),
            expect: Expect::Field("cluster_size", u32::MAX as u64),
        },
        Case {
            // Tables of 1 GiB claimed by a small file: refused before anything is read.
            name: "largest geometry in a small file",
            corrupt: |b| {
                put_u32(b, CLUSTER_SIZE, 64 << 20);
                put_u32(b, TABLE_SIZE, 16);
            },
            expect: Expect::Field("l1_table_offset", CS),
        },
        Case {
            name: "table_size 0",
            corrupt: |b| put_u32(b, TABLE_SIZE, 0),
            expect: Expect::Field("table_size", 0),
        },
        Case {
            name: "table_size 3",
            corrupt: |b| put_u32(b, TABLE_SIZE, 3),
            expect: Expect::Field("table_size", 3),
        },
        Case {
            name: "table_size 32",
            corrupt: |b| put_u32(b, TABLE_SIZE, 32),
            expect: Expect::Field("table_size", 32),
        },
        Case {
            name: "header_size 0",
            corrupt: |b| put_u32(b, HEADER_SIZE, 0),
            expect: Expect::Field("header_size", 0),
        },
        Case {
            // 65536 clusters of 64 KiB is exactly 2^32 bytes.
            name: "header_size * cluster_size overflows u32",
            corrupt: |b| put_u32(b, HEADER_SIZE, 65536),
            expect: Expect::Field("header_size", 65536),
        },
        Case {
            name: "header_size u32::MAX",
            corrupt: |b| put_u32(b, HEADER_SIZE, u32::MAX),
            expect: Expect::Field("header_size", u32::MAX as u64),
        },
        Case {
            // The L1 table at cluster 1 now lies inside the two-cluster header area.
            name: "header_size 2 covers the L1 table",
            corrupt: |b| put_u32(b, HEADER_SIZE, 2),
            expect: Expect::Field("l1_table_offset", CS),
        },
        Case {
            name: "image_size not a multiple of 512",
            corrupt: |b| put_u64(b, IMAGE_SIZE, SIZE + 1),
            expect: Expect::Field("image_size", SIZE + 1),
        },
        Case {
            name: "image_size 511",
            corrupt: |b| put_u64(b, IMAGE_SIZE, 511),
            expect: Expect::Field("image_size", 511),
        },
        Case {
            // (65536 * 4 / 8)^2 * 65536 = 64 TiB.
            name: "image_size above the maximum of the geometry",
            corrupt: |b| put_u64(b, IMAGE_SIZE, (64 << 40) + 512),
            expect: Expect::Field("image_size", (64 << 40) + 512),
        },
        Case {
            name: "image_size near u64::MAX",
            corrupt: |b| put_u64(b, IMAGE_SIZE, !511u64),
            expect: Expect::Field("image_size", !511u64),
        },
        Case {
            name: "l1_table_offset misaligned",
            corrupt: |b| put_u64(b, L1_TABLE_OFFSET, CS + 512),
            expect: Expect::Field("l1_table_offset", CS + 512),
        },
        Case {
            name: "l1_table_offset inside the header",
            corrupt: |b| put_u64(b, L1_TABLE_OFFSET, 0),
            expect: Expect::Field("l1_table_offset", 0),
        },
        Case {
            name: "l1_table_offset at EOF",
            corrupt: |b| put_u64(b, L1_TABLE_OFFSET, 5 * CS),
            expect: Expect::Field("l1_table_offset", 5 * CS),
        },
        Case {
            name: "l1_table_offset far past EOF",
            corrupt: |b| put_u64(b, L1_TABLE_OFFSET, 1 << 40),
            expect: Expect::Field("l1_table_offset", 1 << 40),
        },
        Case {
            // First cluster of the table inside the file, the last one past its end.
            name: "L1 table partly past EOF",
            corrupt: |b| put_u64(b, L1_TABLE_OFFSET, 2 * CS),
            expect: Expect::Field("l1_table_offset", 2 * CS),
        },
        Case {
            // Offset of the table's last cluster overflows u64.
            name: "l1_table_offset near u64::MAX",
            corrupt: |b| put_u64(b, L1_TABLE_OFFSET, !(CS - 1)),
            expect: Expect::Field("l1_table_offset", !(CS - 1)),
        },
        Case {
            // A file cut inside its L1 table: the file length is what is wrong, and the
            // error names the table offset that no longer fits.
            name: "file truncated inside the L1 table",
            corrupt: |b| b.truncate(3 * CS as usize + 100),
            expect: Expect::Field("l1_table_offset", CS),
        },
        Case {
            name: "unknown incompatible feature bits",
            corrupt: |b| put_u64(b, FEATURES, 0x108),
            expect: Expect::Features(0x108),
        },
        Case {
            name: "unknown incompatible bit next to known ones",
            corrupt: |b| put_u64(b, FEATURES, (1 << 63) | features::NEED_CHECK),
            expect: Expect::Features(1 << 63),
        },
        Case {
            name: "backing name ends past the header area",
            corrupt: |b| {
                put_u64(b, FEATURES, features::BACKING_FILE);
                put_u32(b, BACKING_FILENAME_OFFSET, 0x40);
                put_u32(b, BACKING_FILENAME_SIZE, CS as u32 - 0x40 + 1);
            },
            expect: Expect::Field("backing_filename_offset", 0x40),
        },
        Case {
            name: "backing name starts past the header area",
            corrupt: |b| {
                put_u64(b, FEATURES, features::BACKING_FILE);
                put_u32(b, BACKING_FILENAME_OFFSET, u32::MAX);
                put_u32(b, BACKING_FILENAME_SIZE, u32::MAX);
            },
            expect: Expect::Field("backing_filename_offset", u32::MAX as u64),
        },
        Case {
            name: "backing name size 0 with BACKING_FILE",
            corrupt: |b| {
                put_u64(b, FEATURES, features::BACKING_FILE);
                put_u32(b, BACKING_FILENAME_OFFSET, 0x40);
                put_u32(b, BACKING_FILENAME_SIZE, 0);
            },
            expect: Expect::Field("backing_filename_size", 0),
        },
        Case {
            name: "file shorter than the header",
            corrupt: |b| b.truncate(63),
            expect: Expect::Field("file size", 63),
        },
        Case {
            name: "empty file",
            corrupt: |b| b.clear(),
            expect: Expect::Field("file size", 0),
        },
    ]
}

fn assert_error(name: &str, err: &Error, expect: Expect) {
    let msg = err.to_string();
    match (expect, err) {
        (Expect::BadMagic(want), Error::BadMagic { file, found }) => {
            assert_eq!(*found, want, "{name}");
            assert!(
                msg.starts_with(&format!("{file} is not a QED image")),
                "{name}: {msg}"
            );
            assert!(msg.contains("magic"), "{name}: {msg}");
            assert!(msg.contains(&format!("{want:02x?}")), "{name}: {msg}");
        }
        (
            Expect::Field(want_field, want_value),
            Error::InvalidHeader {
                file, field, value, ..
            },
        ) => {
            assert!(msg.starts_with(&format!("{file}: ")), "{name}: {msg}");
            assert_eq!(*field, want_field, "{name}: {msg}");
            assert_eq!(*value, want_value, "{name}: {msg}");
            assert!(
                msg.contains(&format!("{want_field} = {want_value}")),
                "{name}: {msg}"
            );
        }
        (Expect::Features(want), Error::UnsupportedFeatures { file, bits }) => {
            assert!(msg.starts_with(&format!("{file}: ")), "{name}: {msg}");
            assert_eq!(*bits, want, "{name}: {msg}");
            assert!(msg.contains(&format!("{want:#x}")), "{name}: {msg}");
        }
        _ => panic!("{name}: expected {expect:?}, got {err:?} ({msg})"),
    }
}

#[test]
fn corrupt_headers_are_refused_with_the_field_named() {
    let base = fresh();
    assert_eq!(base.len() as u64, 5 * CS);
    open(base.clone(), false).expect("the uncorrupted image opens");
    for case in header_cases() {
        let mut bytes = base.clone();
        (case.corrupt)(&mut bytes);
        for read_only in [true, false] {
            let storage = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
            let err = match open_on(storage.clone(), read_only) {
                Ok(_) => panic!("{} (read_only={read_only}): opened", case.name),
                Err(e) => e,
            };
            assert_error(case.name, &err, case.expect);
            assert!(
                storage.to_bytes() == bytes,
                "{}: a refused open modified the file",
                case.name
            );
        }
    }
}

#[test]
fn unknown_compat_bits_are_ignored_and_kept() {
    let mut bytes = fresh();
    let compat = 0x8000_0000_0000_0001;
    put_u64(&mut bytes, COMPAT_FEATURES, compat);
    let image = open(bytes.clone(), true).unwrap();
    assert_eq!(image.header().compat_features, compat);
    drop(image);

    let after = with_writes(bytes, &[(4096, vec![0x5a; 100])]);
    assert_eq!(get_u64(&after, COMPAT_FEATURES), compat);
    let image = open(after, true).unwrap();
    let mut buf = [0u8; 100];
    image.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0x5a; 100]);
}

#[test]
fn unknown_autoclear_bits_are_cleared_only_by_a_read_write_open() {
    let mut bytes = fresh();
    put_u64(&mut bytes, AUTOCLEAR_FEATURES, 0x5);
    // Bytes after the header in its first sector must survive the header rewrite.
    bytes[0x100..0x108].copy_from_slice(b"keep me!");

    let storage = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
    let image = open_on(storage.clone(), true).unwrap();
    assert_eq!(image.header().autoclear_features, 0x5);
    drop(image);
    assert!(
        storage.to_bytes() == bytes,
        "read-only open changed the file"
    );

    let storage = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
    let image = open_on(storage.clone(), false).unwrap();
    assert_eq!(image.header().autoclear_features, 0);
    let now = storage.to_bytes();
    assert_eq!(
        get_u64(&now, AUTOCLEAR_FEATURES),
        0,
        "not rewritten at open"
    );
    assert_eq!(now[..AUTOCLEAR_FEATURES], bytes[..AUTOCLEAR_FEATURES]);
    assert_eq!(
        now[AUTOCLEAR_FEATURES + 8..],
        bytes[AUTOCLEAR_FEATURES + 8..]
    );
    drop(image);
    assert_eq!(get_u64(&storage.to_bytes(), AUTOCLEAR_FEATURES), 0);
}

#[test]
fn table_size_one_images_open() {
    let opts = CreateOptions {
        cluster_size: 4096,
        table_size: 1,
        ..CreateOptions::new(SIZE)
    };
    let bytes = create(&opts);
    // Header cluster and a one-cluster L1: the last cluster of the table is its first.
    assert_eq!(bytes.len(), 2 * 4096);
    // One L2 table maps 512 clusters = 2 MiB; this write straddles two of them.
    let pos = (2 << 20) - 100;
    let after = with_writes(bytes, &[(pos, vec![0xc3; 200]), (0, vec![1; 10])]);
    let image = open(after, true).unwrap();
    assert_eq!(image.geometry().table_size(), 1);
    let mut buf = [0u8; 200];
    image.read_at(&mut buf, pos).unwrap();
    assert_eq!(buf, [0xc3; 200]);
    let report = image.check().unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    assert_eq!(report.leaks, 0, "{report:?}");
    assert_eq!(report.allocated_clusters, 3, "{report:?}");
}

// ---------------------------------------------------------------------------------------
// Table entries that must fail the I/O that reaches them.

fn assert_corrupt_table(what: &str, err: &Error, table: &str, index: u64, value: u64) {
    let msg = err.to_string();
    match err {
        Error::CorruptTable {
            table: t,
            index: i,
            value: v,
            ..
        } => {
            assert_eq!((t.as_str(), *i, *v), (table, index, value), "{what}: {msg}");
        }
        _ => panic!("{what}: expected a corrupt {table}, got {err:?} ({msg})"),
    }
    assert!(
        msg.contains(&format!("{table} entry {index} = {value:#x}")),
        "{what}: {msg}"
    );
}

#[test]
fn invalid_l1_entries_fail_io_in_their_range() {
    // A two-cluster header area, so that an aligned offset inside it is not entry 0.
    let mut base = fresh();
    put_u32(&mut base, HEADER_SIZE, 2);
    put_u64(&mut base, L1_TABLE_OFFSET, 2 * CS);
    base.resize(6 * CS as usize, 0);
    let file_len = base.len() as u64;
    open(base.clone(), false).expect("the relocated L1 is valid");

    let cases = [
        ("misaligned", 2 * CS + 512),
        ("past EOF", file_len),
        ("inside the header", CS),
        ("table partly past EOF", file_len - CS),
        ("table end overflows u64", !(CS - 1)),
    ];
    for (what, entry) in cases {
        let mut bytes = base.clone();
        put_u64(&mut bytes, 2 * CS as usize, entry);
        for read_only in [true, false] {
            let image = open(bytes.clone(), read_only)
                .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
            let mut buf = vec![0u8; 4096];
            let err = image.read_at(&mut buf, 8192).unwrap_err();
            assert_corrupt_table(what, &err, "L1", 0, entry);
            if !read_only {
                let err = image.write_at(&buf, 8192).unwrap_err();
                assert_corrupt_table(what, &err, "L1", 0, entry);
            }
        }
    }
}

/// An image with two data clusters at guest 0, and the file offset of its L2 table.
fn image_with_l2() -> (Vec<u8>, u64) {
    let bytes = with_writes(fresh(), &[(0, vec![0xab; 2 * CS as usize])]);
    let l2 = get_u64(&bytes, l1_offset(&bytes) as usize);
    assert_ne!(l2, 0);
    (bytes, l2)
}

#[test]
fn invalid_l2_entries_fail_io_in_their_cluster() {
    let (base, l2) = image_with_l2();
    let file_len = base.len() as u64;
    let data = get_u64(&base, l2 as usize);
    let table = format!("L2 table at {l2:#x}");

    let cases = [
        ("past EOF", file_len),
        ("far past EOF", 1 << 50),
        ("misaligned", data + 8),
        ("near u64::MAX", !(CS - 1)),
        ("u64::MAX", u64::MAX),
    ];
    for (what, entry) in cases {
        let mut bytes = base.clone();
        // Entry 3, with entry 4 set too: a read over both must not run past the bad one.
        put_u64(&mut bytes, l2 as usize + 3 * 8, entry);
        put_u64(&mut bytes, l2 as usize + 4 * 8, entry);
        for read_only in [true, false] {
            let image = open(bytes.clone(), read_only)
                .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
            let mut ok = vec![0u8; 2 * CS as usize];
            image.read_at(&mut ok, 0).unwrap();
            assert!(ok.iter().all(|&b| b == 0xab), "{what}: good clusters");
            let mut buf = vec![0u8; 2 * CS as usize];
            let err = image.read_at(&mut buf, 3 * CS).unwrap_err();
            assert_corrupt_table(what, &err, &table, 3, entry);
            // A read that starts in good data and runs into the bad entry.
            let mut buf = vec![0u8; 4 * CS as usize];
            let err = image.read_at(&mut buf, 0).unwrap_err();
            assert_corrupt_table(what, &err, &table, 3, entry);
            if !read_only {
                let err = image.write_at(&[1; 10], 3 * CS + 5).unwrap_err();
                assert_corrupt_table(what, &err, &table, 3, entry);
            }
        }
    }
}

#[test]
fn need_check_with_a_corrupt_l2_entry_is_repaired_by_a_read_write_open() {
    let (mut bytes, l2) = image_with_l2();
    let bad = bytes.len() as u64 + 7 * CS;
    put_u64(&mut bytes, l2 as usize + 3 * 8, bad);
    put_u64(&mut bytes, FEATURES, features::NEED_CHECK);

    // Read-only: allowed without a check, for data recovery; nothing is touched.
    let storage = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
    let image = open_on(storage.clone(), true).unwrap();
    assert!(image.open_repair().is_none());
    let mut buf = vec![0u8; CS as usize];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    let err = image.read_at(&mut buf, 3 * CS).unwrap_err();
    assert_corrupt_table("read-only", &err, &format!("L2 table at {l2:#x}"), 3, bad);
    drop(image);
    assert!(
        storage.to_bytes() == bytes,
        "read-only open changed the file"
    );

    // Read-write: the open runs the check with repair.
    let storage = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
    let image = open_on(storage.clone(), false).unwrap();
    let report = image.open_repair().expect("NEED_CHECK was set").clone();
    assert_eq!(report.corruptions, 1, "{report:?}");
    assert_eq!(report.corruptions_fixed, 1, "{report:?}");
    assert_eq!(
        report.details,
        vec![Corruption::InvalidDataOffset {
            table: l2,
            index: 3,
            value: bad
        }]
    );
    let now = storage.to_bytes();
    assert_eq!(get_u64(&now, l2 as usize + 3 * 8), 0, "entry not cleared");
    assert_eq!(get_u64(&now, FEATURES) & features::NEED_CHECK, 0);
    assert!(!image.header().needs_check());
    image.read_at(&mut buf, 3 * CS).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "a cleared entry reads as zeros"
    );
    image.read_at(&mut buf, CS).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    let after = image.check().unwrap();
    assert_eq!((after.corruptions, after.leaks), (0, 0), "{after:?}");
}

/// Storage that refuses to grow, so that any repair needing new clusters fails.
#[derive(Debug)]
struct NoGrowth(Arc<MemoryStorage>);

impl Storage for NoGrowth {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.0.len()? {
            return Err(std::io::Error::other("no growth"));
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > self.0.len()? {
            return Err(std::io::Error::other("no growth"));
        }
        self.0.set_len(len)
    }
}

#[test]
fn need_check_stays_set_when_the_repair_at_open_fails() {
    let (mut bytes, l2) = image_with_l2();
    let data = get_u64(&bytes, l2 as usize);
    // Repairing a double reference needs a new cluster for the copy.
    put_u64(&mut bytes, l2 as usize + 3 * 8, data);
    put_u64(&mut bytes, FEATURES, features::NEED_CHECK);

    let shared = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
    let storage = Box::new(NoGrowth(shared.clone()));
    let err = Image::open_storage(storage, Path::new("x.qed"), &OpenOptions::default())
        .expect_err("the repair cannot succeed");
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    assert!(err.to_string().contains("NEED_CHECK"), "{err}");
    // The failed open must not mark the image clean, or the next open would skip the
    // check.
    let now = shared.to_bytes();
    assert_ne!(get_u64(&now, FEATURES) & features::NEED_CHECK, 0);

    open(bytes, true).expect("read-only open is allowed for recovery");
}

// ---------------------------------------------------------------------------------------
// The consistency check on hand-made images.

const L2_AT: u64 = 5 * CS;
const DATA_AT: u64 = 9 * CS;

/// A fresh image with an L2 table at cluster 5 (L1 entry 0) and `data_clusters` data
/// clusters from cluster 9, none of them referenced yet.
fn handmade(data_clusters: u64) -> Vec<u8> {
    let mut b = fresh();
    b.resize((DATA_AT + data_clusters * CS) as usize, 0);
    put_u64(&mut b, CS as usize, L2_AT);
    b
}

fn set_l2(b: &mut [u8], index: u64, value: u64) {
    put_u64(b, (L2_AT + index * 8) as usize, value);
}

fn check(bytes: Vec<u8>) -> CheckReport {
    open(bytes, true).unwrap().check().unwrap()
}

fn clean_handmade() -> Vec<u8> {
    let mut b = handmade(5);
    set_l2(&mut b, 0, DATA_AT);
    set_l2(&mut b, 1, DATA_AT + CS);
    set_l2(&mut b, 2, DATA_AT + 2 * CS);
    set_l2(&mut b, 4, DATA_AT + 4 * CS);
    set_l2(&mut b, 5, DATA_AT + 3 * CS);
    // A zero cluster is neither allocated nor a reference.
    set_l2(&mut b, 7, 1);
    b
}

#[test]
fn check_of_a_clean_image_counts_allocation_and_fragmentation() {
    let report = check(clean_handmade());
    assert_eq!(
        report,
        CheckReport {
            total_clusters: SIZE / CS,
            allocated_clusters: 5,
            // Clusters 9, 10, 11 are in order; 13 does not follow 11, 12 does not follow 13.
            fragmented_clusters: 2,
            ..CheckReport::default()
        }
    );
}

#[test]
fn check_reports_an_invalid_l2_offset_in_l1() {
    for bad in [7 * CS, CS + 8, 3 * CS, 0x10] {
        let mut b = fresh();
        put_u64(&mut b, CS as usize, bad);
        let report = check(b);
        assert_eq!(report.corruptions, 1, "{bad:#x}: {report:?}");
        assert_eq!(report.corruptions_fixed, 0);
        assert_eq!(
            report.details,
            vec![Corruption::InvalidL2Offset {
                l1_index: 0,
                value: bad
            }]
        );
        assert_eq!(report.leaks, 0, "{report:?}");
    }
}

#[test]
fn check_reports_an_invalid_data_offset() {
    let end = DATA_AT + 2 * CS;
    for bad in [end, end + CS, DATA_AT + 4096, CS / 2, u64::MAX] {
        let mut b = handmade(2);
        set_l2(&mut b, 0, DATA_AT);
        set_l2(&mut b, 1, DATA_AT + CS);
        set_l2(&mut b, 3, bad);
        let report = check(b);
        assert_eq!(report.corruptions, 1, "{bad:#x}: {report:?}");
        assert_eq!(
            report.details,
            vec![Corruption::InvalidDataOffset {
                table: L2_AT,
                index: 3,
                value: bad
            }]
        );
        assert_eq!(report.leaks, 0, "{report:?}");
        assert_eq!(report.check_errors, 0, "{report:?}");
    }
}

#[test]
fn check_reports_double_references() {
    let mut b = handmade(1);
    set_l2(&mut b, 0, DATA_AT);
    set_l2(&mut b, 6, DATA_AT);
    let report = check(b);
    assert_eq!(report.corruptions, 1, "{report:?}");
    assert_eq!(
        report.details,
        vec![Corruption::DoubleReference { offset: DATA_AT }]
    );
    assert_eq!(report.leaks, 0, "{report:?}");

    // A data entry pointing into the L1 table is a double reference too.
    let mut b = handmade(1);
    set_l2(&mut b, 0, DATA_AT);
    set_l2(&mut b, 1, 2 * CS);
    let report = check(b);
    assert_eq!(
        report.details,
        vec![Corruption::DoubleReference { offset: 2 * CS }]
    );
}

#[test]
fn check_counts_an_appended_cluster_as_a_leak() {
    let mut b = clean_handmade();
    let end = b.len() as u64;
    b.resize(b.len() + CS as usize, 0xee);
    let report = check(b.clone());
    assert_eq!(report.leaks, 1, "{report:?}");
    assert_eq!(report.leaked_offsets, vec![end]);
    assert_eq!(report.corruptions, 0, "{report:?}");

    // A partial cluster past the last whole one is not a cluster at all.
    b.resize(b.len() + CS as usize / 2, 0xee);
    let report = check(b);
    assert_eq!(report.leaks, 1, "{report:?}");
}

// ---------------------------------------------------------------------------------------
// Random corruption: never a panic, never a hang, never unbounded growth.

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const FUZZ_CS: u64 = 4096;
/// Bound on guest bytes read or scanned per image: a corrupt header may claim any size.
const READ_LIMIT: u64 = 8 << 20;

fn fuzz_base() -> Vec<u8> {
    let opts = CreateOptions {
        cluster_size: FUZZ_CS as u32,
        table_size: 4,
        ..CreateOptions::new(SIZE)
    };
    let pattern: Vec<u8> = (0..3 * FUZZ_CS).map(|i| (i * 7 % 251) as u8).collect();
    with_writes(
        create(&opts),
        &[
            (0, pattern),
            // All-ones data: a table entry redirected here reads as u64::MAX.
            (10 * FUZZ_CS + 100, vec![0xff; 5000]),
            (1 << 20, vec![0x5a; FUZZ_CS as usize]),
            (3 * (1 << 20) + 4000, vec![0x11; 200]),
        ],
    )
}

fn interesting_u64(rng: &mut Rng, file_len: u64) -> u64 {
    let cluster = rng.below(file_len / FUZZ_CS + 2) * FUZZ_CS;
    match rng.below(10) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => !(FUZZ_CS - 1),
        4 => file_len,
        5 => file_len - FUZZ_CS,
        6 => cluster,
        7 => cluster + rng.below(FUZZ_CS),
        8 => 1 << rng.below(64),
        _ => rng.next(),
    }
}

fn interesting_u32(rng: &mut Rng) -> u32 {
    match rng.below(8) {
        0 => 0,
        1 => 1,
        2 => 1 << rng.below(32),
        3 => u32::MAX,
        4 => 4096,
        5 => rng.below(17) as u32,
        _ => rng.next() as u32,
    }
}

const HEADER_FIELDS: [(usize, usize); 10] = [
    (CLUSTER_SIZE, 4),
    (TABLE_SIZE, 4),
    (HEADER_SIZE, 4),
    (FEATURES, 8),
    (COMPAT_FEATURES, 8),
    (AUTOCLEAR_FEATURES, 8),
    (L1_TABLE_OFFSET, 8),
    (IMAGE_SIZE, 8),
    (BACKING_FILENAME_OFFSET, 4),
    (BACKING_FILENAME_SIZE, 4),
];

fn mutate(rng: &mut Rng, b: &mut [u8], l1: usize, l2: usize) {
    let file_len = b.len() as u64;
    // Only the used start of each table: that is where entries are read from.
    let regions = [(0, 512), (l1, 512), (l2, 8192)];
    let (start, len) = regions[rng.below(3) as usize];
    match rng.below(9) {
        0..=2 => {
            let i = start + rng.below(len as u64) as usize;
            b[i] = rng.next() as u8;
        }
        3..=4 => {
            let i = start + rng.below(len as u64) as usize;
            b[i] ^= 1 << rng.below(8);
        }
        5..=7 if start == 0 => {
            let (off, size) = HEADER_FIELDS[rng.below(HEADER_FIELDS.len() as u64) as usize];
            if size == 4 {
                put_u32(b, off, interesting_u32(rng));
            } else if off == FEATURES && rng.below(2) == 0 {
                put_u64(b, off, rng.below(8));
            } else {
                put_u64(b, off, interesting_u64(rng, file_len));
            }
        }
        5..=7 => {
            let i = start + rng.below(len as u64 / 8) as usize * 8;
            put_u64(b, i, interesting_u64(rng, file_len));
        }
        _ => {
            let i = start + rng.below(len as u64 / 8) as usize * 8;
            b[i..i + 8].copy_from_slice(&rng.next().to_le_bytes());
        }
    }
}

/// Cuts the file somewhere in its last clusters, or appends a partial cluster of junk.
fn resize(rng: &mut Rng, b: &mut Vec<u8>) {
    if rng.below(2) == 0 {
        let cut = b.len() - rng.below(4 * FUZZ_CS) as usize;
        b.truncate(cut);
    } else {
        b.resize(b.len() + rng.below(2 * FUZZ_CS) as usize, 0x77);
    }
}

/// Drives every kind of I/O over a possibly corrupt image. Each call may fail; none may
/// panic, and the file may grow only by what the writes can allocate.
fn exercise(bytes: &[u8], rng: &mut Rng) {
    for read_only in [true, false] {
        let storage = Arc::new(MemoryStorage::from_bytes(bytes.to_vec()));
        let opts = OpenOptions {
            image: qed::ImageOptions {
                read_only,
                // Small enough for eviction to happen.
                l2_cache_bytes: 16 * 4096,
                ..qed::ImageOptions::default()
            },
            // Keep the test hermetic: a corrupt backing name must not reach the disk.
            no_backing: true,
            ..OpenOptions::default()
        };
        let Ok(image) = Image::open_storage(Box::new(storage.clone()), Path::new("x.qed"), &opts)
        else {
            continue;
        };
        let len_at_open = storage.len().unwrap();
        if image.open_repair().is_some() {
            let after = image.check().expect("a repaired image can be checked");
            assert_eq!(
                after.corruptions, 0,
                "left by the repair at open: {after:?}"
            );
            assert!(!image.header().needs_check());
        }
        let span = image.size().min(READ_LIMIT);

        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < span {
            let n = (span - pos).min(buf.len() as u64);
            let _ = image.read_at(&mut buf[..n as usize], pos);
            pos += n;
        }
        let mut pos = 0;
        while pos < span {
            match image.block_status(pos, span - pos) {
                Ok(st) if st.len > 0 => pos += st.len,
                Ok(st) => panic!("empty block status at {pos}: {st:?}"),
                Err(_) => pos += FUZZ_CS,
            }
        }
        let _ = image.check();

        if !read_only && span > 0 {
            let g = image.geometry();
            let mut ops = 0u64;
            for _ in 0..4 {
                let len = 1 + rng.below(2 * FUZZ_CS).min(span - 1);
                let at = rng.below(span - len + 1);
                let data = vec![rng.next() as u8; len as usize];
                let _ = match rng.below(4) {
                    0 | 1 => image.write_at(&data, at),
                    2 => image.write_zeroes(at, len),
                    _ => image.discard(at, len),
                };
                ops += 1;
                let _ = image.read_at(&mut buf[..len as usize], at);
            }
            let _ = image.write_at(&[0x42; 100], 0);
            ops += 1;
            let _ = image.check();
            let _ = image.flush();
            // Each operation spans at most 3 clusters and 2 L2 tables (new or cleared).
            let bound = len_at_open.next_multiple_of(g.cluster_size())
                + ops * (3 * g.cluster_size() + 2 * g.table_bytes());
            let len = storage.len().unwrap();
            assert!(len <= bound, "file grew to {len}, bound {bound}");
            let _ = image.close();
            if let Ok(again) = open_on(storage.clone(), true) {
                let _ = again.check();
            }
        }
    }
}

/// Names the failing iteration when a panic unwinds through it.
struct Iteration(u64);

impl Drop for Iteration {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("panicked in random corruption iteration {}", self.0);
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let base = fuzz_base();
    let l1 = l1_offset(&base) as usize;
    let l2 = get_u64(&base, l1) as usize;
    assert_ne!(l2, 0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for iteration in 0..2000 {
        let _guard = Iteration(iteration);
        let mut bytes = base.clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut bytes, l1, l2);
        }
        if rng.below(8) == 0 {
            resize(&mut rng, &mut bytes);
        }
        if rng.below(4) == 0 && bytes.len() >= 64 {
            // Sends the read-write open through the repair of whatever was corrupted.
            let f = get_u64(&bytes, FEATURES);
            put_u64(&mut bytes, FEATURES, f | features::NEED_CHECK);
        }
        exercise(&bytes, &mut rng);
    }
}
