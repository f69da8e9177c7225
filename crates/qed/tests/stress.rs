//! Many threads of random, overlapping writes, zero writes and discards on one image.
//! Every sector must end with one of the values written to it (or its initial value),
//! and no cluster may be allocated twice.

use qed::{BlockDevice, CreateOptions, Format, Image, OpenOptions};
use std::collections::HashSet;
use std::sync::Mutex;

const SECTOR: usize = 512;
/// Marks the initial content of a backing sector.
const BACKING_TAG: u32 = 0x8000_0000;
/// Candidate value meaning "all zeros".
const ZERO: u32 = 0;

/// A small deterministic PRNG, so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The content of a sector tagged `tag`: the tag repeated.
fn pattern(tag: u32) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    for c in s.chunks_exact_mut(4) {
        c.copy_from_slice(&tag.to_le_bytes());
    }
    s
}

/// What one sector may read as.
fn decode(sector: &[u8]) -> Option<u32> {
    if sector.iter().all(|&b| b == 0) {
        return Some(ZERO);
    }
    let tag = u32::from_le_bytes(sector[..4].try_into().ok()?);
    (sector == pattern(tag)).then_some(tag)
}

enum Op {
    Write { sector: u64, count: u64, tag: u32 },
    Zero { sector: u64, count: u64 },
    Discard { sector: u64, count: u64 },
}

fn run(cluster_size: u32, table_size: u32, with_backing: bool, threads: u64, ops: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 16 << 20;
    let sectors = size / SECTOR as u64;
    let backing_sectors = sectors * 3 / 4;
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster_size;
    opts.table_size = table_size;
    if with_backing {
        let mut raw = Vec::with_capacity((backing_sectors as usize) * SECTOR);
        for s in 0..backing_sectors {
            raw.extend_from_slice(&pattern(BACKING_TAG | s as u32));
        }
        std::fs::write(dir.path().join("base.raw"), raw).unwrap();
        opts.backing_file = Some("base.raw".into());
        opts.backing_format = Some(Format::Raw);
    }
    let path = dir.path().join("img.qed");
    Image::create(&path, &opts).unwrap();
    let image = Image::open(&path, &OpenOptions::default()).unwrap();

    // Candidates per sector: the initial value, plus everything any op may leave there.
    let initial = |s: u64| {
        if with_backing && s < backing_sectors {
            BACKING_TAG | s as u32
        } else {
            ZERO
        }
    };
    let candidates: Vec<Mutex<Vec<u32>>> =
        (0..sectors).map(|s| Mutex::new(vec![initial(s)])).collect();
    let per_cluster = u64::from(cluster_size) / SECTOR as u64;

    std::thread::scope(|scope| {
        for t in 0..threads {
            let image = &image;
            let candidates = &candidates;
            scope.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t + 1) * 0x1234_5678));
                for i in 0..ops {
                    // Keep requests in a hot region so threads race for the same clusters.
                    let hot = sectors / 4;
                    let sector = rng.below(hot) * 4 % sectors;
                    let count = (1 + rng.below(3 * per_cluster)).min(sectors - sector);
                    let op = match rng.below(10) {
                        0 => Op::Zero { sector, count },
                        1 => Op::Discard { sector, count },
                        _ => Op::Write {
                            sector,
                            count,
                            tag: ((t as u32) << 20) | (i as u32 + 1),
                        },
                    };
                    // Record before doing: a concurrent reader of the final state only
                    // ever looks after every thread is done.
                    match op {
                        Op::Write { sector, count, tag } => {
                            for s in sector..sector + count {
                                candidates[s as usize].lock().unwrap().push(tag);
                            }
                            let mut buf = Vec::with_capacity(count as usize * SECTOR);
                            for _ in 0..count {
                                buf.extend_from_slice(&pattern(tag));
                            }
                            image.write_at(&buf, sector * SECTOR as u64).unwrap();
                        }
                        Op::Zero { sector, count } => {
                            for s in sector..sector + count {
                                candidates[s as usize].lock().unwrap().push(ZERO);
                            }
                            image
                                .write_zeroes(sector * SECTOR as u64, count * SECTOR as u64)
                                .unwrap();
                        }
                        Op::Discard { sector, count } => {
                            // Whole data clusters inside the range may read as zeros.
                            let first = sector.div_ceil(per_cluster) * per_cluster;
                            let end = (sector + count) / per_cluster * per_cluster;
                            for s in first..end.max(first) {
                                candidates[s as usize].lock().unwrap().push(ZERO);
                            }
                            image
                                .discard(sector * SECTOR as u64, count * SECTOR as u64)
                                .unwrap();
                        }
                    }
                    if rng.below(50) == 0 {
                        image.flush().unwrap();
                    }
                }
            });
        }
    });
    image.close().unwrap();

    let image = Image::open(&path, &OpenOptions::default()).unwrap();
    let report = image.check().unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    assert_eq!(report.check_errors, 0, "{report:?}");
    assert_eq!(
        report.leaks, 0,
        "a cluster was allocated and lost: {report:?}"
    );
    let mut buf = vec![0u8; size as usize];
    image.read_at(&mut buf, 0).unwrap();
    for (s, sector) in buf.chunks_exact(SECTOR).enumerate() {
        let found = decode(sector);
        let allowed: HashSet<u32> = candidates[s].lock().unwrap().iter().copied().collect();
        assert!(
            found.is_some_and(|v| allowed.contains(&v)),
            "sector {s} reads {:?}, allowed {allowed:?}",
            found.map(|v| format!("{v:#x}"))
        );
    }
}

#[test]
fn small_clusters_many_tables() {
    run(4096, 1, false, 8, 400);
}

#[test]
fn small_clusters_over_backing() {
    run(4096, 2, true, 8, 300);
}

#[test]
fn default_clusters() {
    run(65536, 4, false, 8, 300);
}

#[test]
fn default_clusters_over_backing() {
    run(65536, 4, true, 8, 200);
}
