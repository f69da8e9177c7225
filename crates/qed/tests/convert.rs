//! The library's convert: what it copies and where it puts it, and that a failure on
//! either side ends the copy with that failure, its reading threads included.

mod support;

use qed::{convert, map, open_device, ConvertOptions, CreateOptions, Image};
use qed::{Error, Format, MemoryStorage, OpenOptions, RawDevice};
use qed_testkit::{FaultKind, FaultPlan, FaultyStorage};
use std::os::unix::fs::FileExt;
use std::path::Path;
use support::read_all;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
/// Not a whole number of the copy's 2 MiB steps, nor of 4 KiB blocks.
const SIZE: u64 = 9 * M + 512;

fn byte(pos: u64) -> u8 {
    (pos.wrapping_mul(0x9e37_79b9) >> 13) as u8 | 1
}

/// Data runs of the source: holes of 64 KiB and more (not read), shorter ones (read
/// with the data around them), a run across a step boundary, and the last bytes.
const RUNS: [(u64, u64); 6] = [
    (0, 100 * K),
    (164 * K, 64 * K),
    (260 * K, 4 * K),
    (2 * M - 4 * K, 8 * K),
    (5 * M, M),
    (SIZE - 512, 512),
];

fn expected() -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    for (off, len) in RUNS {
        for p in off..off + len {
            v[p as usize] = byte(p);
        }
    }
    v
}

/// A sparse raw file holding [`RUNS`].
fn sparse_source(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let all = expected();
    for (off, len) in RUNS {
        f.write_all_at(&all[off as usize..(off + len) as usize], off)
            .unwrap();
    }
}

fn new_image_options() -> ConvertOptions<'static> {
    ConvertOptions {
        target_is_zero: true,
        ..ConvertOptions::default()
    }
}

#[test]
fn copies_every_byte_and_allocates_clusters_in_guest_order() {
    let dir = tempfile::tempdir().unwrap();
    let (src_path, dst_path) = (dir.path().join("src.raw"), dir.path().join("dst.qed"));
    sparse_source(&src_path);
    let src = open_device(&src_path, Some(Format::Raw), &OpenOptions::read_only()).unwrap();
    Image::create(&dst_path, &CreateOptions::new(SIZE)).unwrap();
    let dst = Image::open(&dst_path, &OpenOptions::default()).unwrap();
    let mut seen = Vec::new();
    convert(&*src, &dst, &new_image_options(), &mut |done, all| {
        seen.push((done, all))
    })
    .unwrap();
    assert_eq!(read_all(&dst), expected());
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
    assert_eq!(seen.last(), Some(&(SIZE, SIZE)));
    // Written in order by one thread, whatever order the steps were read in.
    let offsets: Vec<u64> = map(&dst)
        .unwrap()
        .iter()
        .filter(|e| e.data)
        .map(|e| e.offset.unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    // Only the clusters holding data were allocated: the 64 KiB holes stay holes.
    let data: u64 = map(&dst)
        .unwrap()
        .iter()
        .filter(|e| e.data)
        .map(|e| e.length)
        .sum();
    assert!(data <= 2 * M, "{data} bytes allocated");
}

/// A raw device over memory whose storage fails reads (or writes) from the `n`th on.
fn failing_raw(bytes: Vec<u8>, n: u64, reads: bool) -> RawDevice {
    let plan = FaultPlan {
        sticky: true,
        count_reads: reads,
        ..FaultPlan::at(n, FaultKind::Eio)
    };
    let storage = FaultyStorage::new(MemoryStorage::from_bytes(bytes), plan);
    RawDevice::new(Box::new(storage), "faulty".into(), reads).unwrap()
}

fn assert_io_error(r: qed::Result<()>) {
    match r {
        Err(Error::Io { cause, .. }) => assert_eq!(cause.raw_os_error(), Some(libc::EIO)),
        other => panic!("expected the injected EIO, got {other:?}"),
    }
}

#[test]
fn a_source_that_fails_ends_the_copy_with_its_error() {
    // The source is read in five steps.
    for n in [1, 2, 3, 5] {
        let src = failing_raw(expected(), n, true);
        let dst = RawDevice::new(
            Box::new(MemoryStorage::from_bytes(vec![0; SIZE as usize])),
            "dst".into(),
            false,
        )
        .unwrap();
        assert_io_error(convert(
            &src,
            &dst,
            &ConvertOptions::default(),
            &mut |_, _| {},
        ));
    }
}

#[test]
fn a_destination_that_fails_ends_the_copy_with_its_error() {
    let src = RawDevice::new(
        Box::new(MemoryStorage::from_bytes(expected())),
        "src".into(),
        true,
    )
    .unwrap();
    for n in [1, 2, 3, 6] {
        let dst = failing_raw(vec![0; SIZE as usize], n, false);
        assert_io_error(convert(
            &src,
            &dst,
            &ConvertOptions::default(),
            &mut |_, _| {},
        ));
    }
    // And a QED destination, whose writes go through the engine.
    let storage = FaultyStorage::new(MemoryStorage::new(), FaultPlan::none());
    Image::create_on(&storage, &CreateOptions::new(SIZE)).unwrap();
    storage.set_plan(FaultPlan {
        sticky: true,
        ..FaultPlan::at(storage.ops() + 4, FaultKind::Eio)
    });
    let dst = Image::open_storage(
        Box::new(storage),
        Path::new("dst.qed"),
        &OpenOptions::default(),
    )
    .unwrap();
    assert!(convert(&src, &dst, &new_image_options(), &mut |_, _| {}).is_err());
}
