//! Converting in place, crashed at every point and failed at every storage operation.
//!
//! The sources are written by QEMU (`qemu-img`, `qemu-io`): a qcow2 image with data,
//! zero clusters, compressed clusters and a discarded range, and a QED image with data
//! and zero clusters. Each conversion runs over storage that records every operation;
//! every crash state it can leave (the durable bytes at each point, with none, all, or
//! random subsets of the sectors in flight) must be the old image or the new one, read
//! back the original guest bytes, and pass our check and `qemu-img check`. Then each
//! storage operation of the conversion fails in turn: the conversion stops with an error
//! and the bytes left read back the original guest data.

use qed::{convert_in_place, BlockDevice, Format, Image, InPlaceOptions, OpenOptions};
use qed::{MemoryStorage, Qcow2Device, Storage};
use qed_testkit::{FaultKind, FaultPlan, FaultyStorage, RecordingStorage};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Virtual size of the test images: small, so that each of the thousands of states
/// reads back quickly.
const SIZE: u64 = 8 << 20;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("QEMU's tools are installed (tests/run installs them)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image QEMU wrote: data (some of it partial clusters), zero clusters, a
/// compressed run and a discarded range.
fn qcow2_source(dir: &Path) -> PathBuf {
    let p = dir.join("src.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg(SIZE.to_string()));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args([
            "-c",
            "write -c -P 0x11 0 256k",
            "-c",
            "write -P 0x22 1M 300k",
            "-c",
            "write -z 2M 128k",
            "-c",
            "write -P 0x33 3M 1M",
            "-c",
            "discard 3M 64k",
            "-c",
            "write -P 0x44 7M 4k",
        ])
        .arg(&p));
    p
}

/// A QED image QEMU wrote: data and zero clusters.
fn qed_source(dir: &Path) -> PathBuf {
    let p = dir.join("src.qed");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qed"])
        .arg(&p)
        .arg(SIZE.to_string()));
    run(Command::new("qemu-io")
        .args(["-f", "qed"])
        .args([
            "-c",
            "write -P 0x55 0 200k",
            "-c",
            "write -z 1M 128k",
            "-c",
            "write -P 0x66 5M 1M",
        ])
        .arg(&p));
    p
}

/// The guest bytes of an image file, as QEMU reads them.
fn guest_bytes(path: &Path, format: &str) -> Vec<u8> {
    let raw = path.with_extension("raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&raw));
    let b = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    b
}

/// Checks one state: it is the old image or the new one and reads `expected`; with
/// `qemu`, `qemu-img check` finds no corruption either (exit 0, or 3 for leaks).
/// Returns the format it is in.
fn verify(bytes: &[u8], expected: &[u8], dir: &Path, qemu: bool, what: &str) -> Format {
    let path = dir.join("state.img");
    std::fs::write(&path, bytes).unwrap();
    let mut got = vec![0u8; expected.len()];
    let format = match &bytes[..4] {
        b"QED\0" => {
            let image = Image::open(&path, &OpenOptions::read_only())
                .unwrap_or_else(|e| panic!("{what}: the QED state does not open: {e}"));
            image.read_at(&mut got, 0).unwrap();
            let report = image.check().unwrap();
            assert_eq!(report.corruptions, 0, "{what}: {report:?}");
            Format::Qed
        }
        b"QFI\xfb" => {
            let dev = Qcow2Device::open(&path)
                .unwrap_or_else(|e| panic!("{what}: the qcow2 state does not open: {e}"));
            dev.read_at(&mut got, 0).unwrap();
            Format::Qcow2
        }
        _ => {
            got.copy_from_slice(&bytes[..expected.len()]);
            Format::Raw
        }
    };
    assert!(
        got == expected,
        "{what}: the {format} state reads other guest bytes"
    );
    if qemu && format != Format::Raw {
        let out = Command::new("qemu-img")
            .args(["check", "-f", &format.to_string()])
            .arg(&path)
            .output()
            .unwrap();
        let code = out.status.code();
        assert!(
            matches!(code, Some(0) | Some(3)),
            "{what}: qemu-img check of the {format} state: {code:?}\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    format
}

/// A small deterministic generator for the subsets of sectors in flight.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn options(source: Format, target: Format) -> InPlaceOptions {
    InPlaceOptions {
        source,
        target,
        dry_run: false,
        backing_format: None,
        cluster_size: None,
    }
}

/// Records the conversion of `file` and verifies every crash state of it. Returns how
/// many distinct states there were and the formats seen.
fn explore(
    file: &Path,
    source: Format,
    target: Format,
    expected: &[u8],
) -> (usize, HashSet<Format>) {
    let dir = file.parent().unwrap();
    let recording = Arc::new(RecordingStorage::new(std::fs::read(file).unwrap()));
    let storage: Arc<dyn Storage> = recording.clone();
    convert_in_place(storage, "image", &options(source, target), &mut |_, _| {}).unwrap();
    let log = recording.log();
    let mut seen = HashSet::new();
    let mut formats = HashSet::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for point in 0..=log.len() {
        let flight = log.in_flight(point);
        let pieces: u64 = flight.clone().map(|i| log.ops()[i].pieces() as u64).sum();
        // None, all, and random subsets of what was in flight.
        let mut choices: Vec<Box<dyn FnMut(usize, usize) -> bool>> =
            vec![Box::new(|_, _| false), Box::new(|_, _| true)];
        for _ in 0..pieces.min(6) {
            let seed = rng.next();
            let mut r = Rng(seed | 1);
            choices.push(Box::new(move |_, _| r.next() % 2 == 0));
        }
        for (k, choice) in choices.into_iter().enumerate() {
            let state = log.crash_state(point, choice);
            let digest = blake(&state);
            if !seen.insert(digest) {
                continue;
            }
            // QEMU's check runs on the durable states and the all-applied ones: a
            // process each, so not on every random subset.
            let qemu = k < 2;
            let what = format!("crash at op {point} of {} (choice {k})", log.len());
            formats.insert(verify(&state, expected, dir, qemu, &what));
        }
    }
    (seen.len(), formats)
}

/// A cheap digest to skip states already verified.
fn blake(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[test]
fn qcow2_to_qed_every_crash_state_is_one_image_or_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_source(dir.path());
    let expected = guest_bytes(&src, "qcow2");
    let (states, formats) = explore(&src, Format::Qcow2, Format::Qed, &expected);
    eprintln!("qcow2 -> qed: {states} distinct crash states");
    assert!(formats.contains(&Format::Qcow2) && formats.contains(&Format::Qed));
}

#[test]
fn qed_to_qcow2_every_crash_state_is_one_image_or_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let src = qed_source(dir.path());
    let expected = guest_bytes(&src, "qed");
    let (states, formats) = explore(&src, Format::Qed, Format::Qcow2, &expected);
    eprintln!("qed -> qcow2: {states} distinct crash states");
    assert!(formats.contains(&Format::Qcow2) && formats.contains(&Format::Qed));
}

#[test]
fn raw_to_qed_every_crash_state_keeps_the_guest_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut bytes = vec![0u8; SIZE as usize];
    for (i, b) in bytes.iter_mut().enumerate().take(3 << 20) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&src, &bytes).unwrap();
    let (states, formats) = explore(&src, Format::Raw, Format::Qed, &bytes);
    eprintln!("raw -> qed: {states} distinct crash states");
    assert!(formats.contains(&Format::Raw) && formats.contains(&Format::Qed));
}

/// Fails each storage operation of the conversion in turn, in every way a storage
/// fails; afterwards the bytes read back the original guest data in one format or the
/// other.
fn fail_each_operation(file: &Path, source: Format, target: Format, expected: &[u8]) {
    let dir = file.parent().unwrap();
    let initial = std::fs::read(file).unwrap();
    let counting = Arc::new(FaultyStorage::new(
        MemoryStorage::from_bytes(initial.clone()),
        FaultPlan {
            count_reads: true,
            ..FaultPlan::none()
        },
    ));
    let storage: Arc<dyn Storage> = counting.clone();
    convert_in_place(storage, "image", &options(source, target), &mut |_, _| {}).unwrap();
    let total = counting.ops();
    assert!(
        total > 5,
        "the conversion did only {total} storage operations"
    );
    let kinds = [
        FaultKind::Eio,
        FaultKind::NoSpace,
        FaultKind::ShortWrite,
        FaultKind::EioAfterEffect,
    ];
    let mut failed = 0;
    for n in 1..=total {
        for kind in kinds {
            let faulty = Arc::new(FaultyStorage::new(
                MemoryStorage::from_bytes(initial.clone()),
                FaultPlan {
                    count_reads: true,
                    ..FaultPlan::at(n, kind)
                },
            ));
            let storage: Arc<dyn Storage> = faulty.clone();
            let result =
                convert_in_place(storage, "image", &options(source, target), &mut |_, _| {});
            let what = format!("{source} -> {target}, {kind:?} at operation {n} of {total}");
            if let Err(e) = &result {
                failed += 1;
                assert!(
                    e.to_string().contains("image"),
                    "{what}: the error names no file: {e}"
                );
            }
            verify(&faulty.inner().to_bytes(), expected, dir, false, &what);
        }
    }
    // Only the punching of freed space may fail without failing the conversion.
    assert!(
        failed as u64 >= total * 3,
        "only {failed} of {} faults failed the conversion",
        total * 4
    );
}

#[test]
fn every_failed_operation_leaves_the_guest_data() {
    let dir = tempfile::tempdir().unwrap();
    let q = qcow2_source(dir.path());
    let expected = guest_bytes(&q, "qcow2");
    fail_each_operation(&q, Format::Qcow2, Format::Qed, &expected);
    let e = qed_source(dir.path());
    let expected = guest_bytes(&e, "qed");
    fail_each_operation(&e, Format::Qed, Format::Qcow2, &expected);
}
