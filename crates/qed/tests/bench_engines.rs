//! The benchmark's request engines on real files: what io_uring writes (in place, and
//! into clusters it allocates through `BlockDevice::begin_write`) must be exactly what
//! the threaded engine writes through the device, and leave a clean image.

use qed::{bench, BenchParams, Engine};
use qed::{open_device, BlockDevice, CreateOptions, Format, Image, OpenOptions};
use std::path::Path;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

fn params(engine: Engine, write: bool, count: u64, size: usize, step: u64) -> BenchParams {
    BenchParams {
        count,
        depth: 16,
        size,
        step,
        offset: 0,
        write,
        pattern: 0xab,
        flush_interval: None,
        writethrough: false,
        engine,
    }
}

fn create(path: &Path, size: u64, cluster: u32, backing: Option<&str>) {
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster;
    if let Some(b) = backing {
        opts.backing_file = Some(b.into());
        opts.backing_format = Some(Format::Raw);
    }
    Image::create(path, &opts).unwrap();
}

fn open(path: &Path, direct: bool) -> Box<dyn BlockDevice> {
    let opts = OpenOptions {
        direct,
        ..OpenOptions::default()
    };
    open_device(path, Some(Format::Qed), &opts).unwrap()
}

/// Every byte of the image, read through a fresh open.
fn contents(path: &Path) -> Vec<u8> {
    let dev = open_device(path, Some(Format::Qed), &OpenOptions::read_only()).unwrap();
    let mut out = vec![0u8; dev.size() as usize];
    dev.read_at(&mut out, 0).unwrap();
    out
}

fn assert_clean(path: &Path) {
    let image = Image::open(path, &OpenOptions::read_only()).unwrap();
    assert!(
        !image.header().needs_check(),
        "{path:?} left NEED_CHECK set"
    );
    let r = image.check().unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
}

/// Runs the same workloads with both engines on twin images and compares the results.
fn twins(dir: &Path, name: &str, cluster: u32, backing: Option<&str>, direct: bool) {
    let size = 8 * M;
    let workloads = [
        // Sequential 4 KiB writes: 16 to a 64 KiB cluster, the first allocating.
        params(Engine::IoUring, true, size / (4 * K) / 2, 4096, 4 * K),
        // Whole clusters, a partial write into each of the next ones, and rewrites.
        params(Engine::IoUring, true, 32, 64 * K as usize, 64 * K),
        params(Engine::IoUring, true, 40, 4096, 100 * K),
        params(Engine::IoUring, true, 512, 4096, 8 * K),
        // Reads of everything, mapped or not.
        params(
            Engine::IoUring,
            false,
            size / (64 * K),
            64 * K as usize,
            64 * K,
        ),
    ];
    let mut images = Vec::new();
    for engine in [Engine::IoUring, Engine::Threads] {
        let path = dir.join(format!("{name}-{engine:?}.qed"));
        create(&path, size, cluster, backing);
        for (i, w) in workloads.iter().enumerate() {
            let dev = open(&path, direct);
            let mut w = w.clone();
            w.engine = engine;
            w.pattern = 0x10 + i as u8;
            w.offset = i as u64 * 3 * M / 2 % size;
            bench(&*dev, &w).unwrap_or_else(|e| panic!("{name} {engine:?} workload {i}: {e}"));
            drop(dev);
        }
        assert_clean(&path);
        images.push(contents(&path));
    }
    let (a, b) = (&images[0], &images[1]);
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{name}: io_uring and threads differ first at byte {i:#x}: {:#04x} vs {:#04x}",
            a[i], b[i]
        );
    }
    // The workloads really wrote: the first one's pattern is there.
    assert!(
        a.contains(&0x10) && a.contains(&0x13),
        "{name}: nothing written"
    );
}

#[test]
fn io_uring_writes_what_threads_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("base.raw"), vec![0x5a; 6 * M as usize]).unwrap();
    for direct in [false, true] {
        twins(dir, &format!("64k-direct{direct}"), 64 << 10, None, direct);
        twins(dir, &format!("4k-direct{direct}"), 4 << 10, None, direct);
        twins(
            dir,
            &format!("64k-backing-direct{direct}"),
            64 << 10,
            Some("base.raw"),
            direct,
        );
    }
}
