//! Fault injection: a scripted workload runs over storage that fails its Nth operation,
//! for every N the workload reaches and every kind of fault.
//!
//! For each case: the failing request returns an error and nothing panics or hangs;
//! with a one-time fault every later request succeeds again; the image's in-memory
//! NEED_CHECK never claims a protection the file does not have; and the bytes left
//! behind (and the bytes as of the last successful flush) reopen, check without
//! corruption, and read back every acknowledged request.

mod support;

use qed::features;
use qed::{BlockDevice, CreateOptions, Format, Image, Mapping, OpenOptions};
use qed::{MemoryStorage, Reorganization, Storage};
use qed_testkit::{FaultKind, FaultPlan, FaultyStorage};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};
use support::{get_u64, put_u64};

/// Entries in one cached page of an L2 table.
const PAGE_ENTRIES: u64 = 512;
/// Offset of the `features` field in the header.
const FEATURES: usize = 0x10;

// ---------------------------------------------------------------------------------------
// A hang must fail the run, not stall it: a watchdog aborts when no case finishes for a
// minute, naming the case that was running.

static PROGRESS: AtomicU64 = AtomicU64::new(0);
static RUNNING: Mutex<String> = Mutex::new(String::new());

fn start_watchdog() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::thread::spawn(|| {
            let mut last = (PROGRESS.load(Ordering::SeqCst), Instant::now());
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = PROGRESS.load(Ordering::SeqCst);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(60) {
                    let case = RUNNING.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    eprintln!("no progress for 60 s; hung in: {case}");
                    std::process::abort();
                }
            }
        });
    });
}

fn running(case: String) {
    *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) = case;
    PROGRESS.fetch_add(1, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------------------
// The setup: a geometry, with or without a raw backing file.

struct Setup {
    name: String,
    cs: u64,
    /// Guest bytes one L2 table maps.
    coverage: u64,
    size: u64,
    /// Length of the backing file; 0 without one.
    backing_len: u64,
    /// The new image's bytes.
    fresh: Vec<u8>,
    /// Runs [`reorganize_script`] instead of [`script`].
    reorganize: bool,
    /// Keeps the backing file alive.
    _dir: Option<tempfile::TempDir>,
}

/// Backing file content: a pattern in two regions (start of the image and start of the
/// second L2 table's range), holes elsewhere.
fn backing_byte(pos: u64) -> u8 {
    ((pos.wrapping_mul(0x2545_f491) >> 9) % 251) as u8 ^ 0x5a
}

impl Setup {
    fn new(cluster: u32, table: u32, backing: bool) -> Self {
        let cs = u64::from(cluster);
        let coverage = cs * (cs * u64::from(table) / 8);
        // Four L2 tables, the last one partly inside the image.
        let size = 3 * coverage + 5 * cs;
        let mut opts = CreateOptions::new(size);
        opts.cluster_size = cluster;
        opts.table_size = table;
        let mut s = Setup {
            name: format!(
                "{}k/{table}{}",
                cluster / 1024,
                if backing { " over raw" } else { "" }
            ),
            cs,
            coverage,
            size,
            backing_len: 0,
            fresh: Vec::new(),
            reorganize: false,
            _dir: None,
        };
        if backing {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("base.raw");
            s.backing_len = coverage + 40 * cs;
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(s.backing_len).unwrap();
            for (from, to) in s.backing_regions() {
                let bytes: Vec<u8> = (from..to).map(backing_byte).collect();
                std::os::unix::fs::FileExt::write_all_at(&f, &bytes, from).unwrap();
            }
            opts.backing_file = Some(path.to_str().unwrap().to_string());
            opts.backing_format = Some(Format::Raw);
            s._dir = Some(dir);
        }
        let mem = MemoryStorage::new();
        Image::create_on(&mem, &opts).unwrap();
        s.fresh = mem.to_bytes();
        s
    }

    /// The same image, for [`reorganize_script`].
    fn reorganizing(mut self) -> Self {
        self.reorganize = true;
        self.name += ", reorganizing";
        self
    }

    fn backing_regions(&self) -> [(u64, u64); 2] {
        [(0, 64 * self.cs), (self.coverage, self.backing_len)]
    }

    /// What guest byte `pos` reads as in the new image.
    fn initial(&self, pos: u64) -> u8 {
        if self.backing_len > 0
            && self
                .backing_regions()
                .iter()
                .any(|&(a, b)| (a..b).contains(&pos))
        {
            backing_byte(pos)
        } else {
            0
        }
    }

    fn open(&self, storage: Box<dyn Storage>) -> qed::Result<Image> {
        let opts = OpenOptions {
            image: qed::ImageOptions {
                copy_on_read: self.backing_len > 0,
                ..qed::ImageOptions::default()
            },
            ..OpenOptions::default()
        };
        Image::open_storage(storage, Path::new("faults.qed"), &opts)
    }
}

// ---------------------------------------------------------------------------------------
// The workload.

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u64,
    },
    Zeroes {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
    /// A read with copy-on-read on (over a backing file): failed or not, it changes
    /// nothing the guest reads.
    Read {
        off: u64,
        len: u64,
    },
    /// `qed::stream` of everything: failed or not, nothing the guest reads changes.
    Stream,
    /// `qed::compact` or `qed::defrag`: failed or not, nothing the guest reads changes.
    Reorganize(Reorganization),
}

fn pattern(off: u64, len: u64, seed: u64) -> Vec<u8> {
    (off..off + len)
        .map(|p| ((p.wrapping_mul(0x9e37_79b1) >> 11) ^ seed.wrapping_mul(0x61)) as u8 | 1)
        .collect()
}

/// Allocating writes into new L2 tables and existing ones, in-place writes, zero writes
/// and discards, with flushes between. Each region some request may fail in is later
/// zeroed or discarded by a request that touches no other entry of its L2 sector, so
/// that a table update that failed on disk but not in memory (or the reverse) shows.
fn script(s: &Setup) -> Vec<Op> {
    use Op::*;
    let (cs, c) = (s.cs, s.coverage);
    let w = |off: u64, len: u64, seed: u64| Write { off, len, seed };
    let page_reach = PAGE_ENTRIES * cs;
    let mut ops = vec![
        w(100, 3000, 1),                  // new table 0; the rest of the cluster from backing
        w(5 * cs - 300, 2 * cs + 700, 2), // several new clusters, unaligned
        w(c + 2 * cs, cs, 3),             // new table 1, one whole cluster
        w(200, 500, 4),                   // in place
        w(100 * cs + 10, 3 * cs, 5),      // its own L2 sector of table 0
        w(130 * cs + 1, 2 * cs, 6),       // another sector
        Flush,
        Zeroes {
            off: 5 * cs,
            len: 2 * cs,
        }, // whole data clusters
        Zeroes {
            off: 10 * cs + 100,
            len: cs,
        }, // partial clusters
        Zeroes {
            off: 20 * cs,
            len: 2 * cs,
        }, // whole unallocated clusters
        w(20 * cs + 50, 100, 7), // partial write into a zero cluster (over backing)
        Discard {
            off: 4 * cs,
            len: 4 * cs,
        },
        w(2 * c - cs - 10, 2 * cs, 8), // across the end of table 1, into new table 2
        Flush,
        Zeroes {
            off: 100 * cs,
            len: 4 * cs,
        }, // all that region's sector has
        Discard {
            off: 130 * cs,
            len: 3 * cs,
        },
        w(page_reach - 100, 200, 9), // across an L2 page
        w(s.size - 1000, 1000, 10),  // new table 3, the last bytes of the image
        Zeroes {
            off: c,
            len: 4 * cs,
        },
        w(c + 2 * cs + 10, 20, 11),
        w(30 * cs, 3 * cs, 12), // aligned, several clusters
        Zeroes {
            off: 2 * c,
            len: cs,
        }, // table 2's only entry
        Flush,
        w(5 * cs, 64, 13), // in place, into a cluster zeroed earlier
        Discard {
            off: 30 * cs,
            len: 3 * cs,
        },
        Zeroes {
            off: s.size - cs,
            len: cs,
        },
        Read {
            off: 50 * cs + 100,
            len: 2 * cs,
        }, // fills unallocated clusters over the backing file
        Read {
            off: 0,
            len: 8 * cs,
        }, // data, zero and unallocated clusters mixed
        w(50 * cs + 200, 100, 15), // in place, into a filled cluster
        Read {
            off: c - cs,
            len: 3 * cs,
        }, // across tables 0 and 1
        w(40 * cs + 7, cs, 14),    // left for close to flush
    ];
    if s.backing_len > 0 {
        // What is left of the backing file in, then none: the last request.
        ops.push(Stream);
    }
    ops
}

/// Clusters written out of guest order in two tables, some freed by discards (a whole
/// run, single clusters, one only in part), one taken back by a write, then a compaction
/// into the freed space, writes, and a defragmentation. Every storage operation of both
/// jobs fails in turn; failed or not, a job changes nothing the guest reads.
fn reorganize_script(s: &Setup) -> Vec<Op> {
    use Op::*;
    let (cs, c) = (s.cs, s.coverage);
    let w = |off: u64, len: u64, seed: u64| Write { off, len, seed };
    let mut ops: Vec<Op> = (0..8).rev().map(|i| w(i * 4 * cs, cs, i + 1)).collect();
    ops.extend([
        w(c + 3 * cs, 2 * cs, 20), // table 1
        w(c - cs, cs, 21),         // the last cluster of table 0, allocated last
        Flush,
        Discard {
            off: 4 * cs,
            len: cs,
        },
        Discard {
            off: 16 * cs,
            len: 8 * cs,
        },
        Discard {
            off: 8 * cs + 10,
            len: 100,
        },
        w(16 * cs + 5, 10, 22), // takes back the cluster its discard freed
        Flush,
        Flush,
        Reorganize(Reorganization::Compact),
        w(2 * cs + 7, cs, 23), // into a freed cluster or at the end
        Discard {
            off: c + 3 * cs,
            len: cs,
        },
        Flush,
        Reorganize(Reorganization::Defrag),
        w(40 * cs, cs, 24),
    ]);
    ops
}

fn exec(image: &Image, op: &Op) -> qed::Result<()> {
    match *op {
        Op::Write { off, len, seed } => image.write_at(&pattern(off, len, seed), off),
        Op::Zeroes { off, len } => image.write_zeroes(off, len),
        Op::Discard { off, len } => image.discard(off, len),
        Op::Flush => image.flush(),
        Op::Read { off, len } => image.read_at(&mut vec![0u8; len as usize], off),
        Op::Stream => {
            qed::stream(image, &qed::StreamOptions::default(), &mut qed::no_progress).map(|_| ())
        }
        Op::Reorganize(job) => job
            .run(image, &Default::default(), &mut qed::no_progress)
            .map(|_| ()),
    }
}

// ---------------------------------------------------------------------------------------
// What the guest may read: per byte, a known value, "this value or zero", or anything.

const KNOWN: u8 = 0;
const OR_ZERO: u8 = 1;
const ANY: u8 = 2;

#[derive(Clone, Default)]
struct Model {
    /// Touched clusters: values and states.
    clusters: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
}

impl Model {
    fn update(&mut self, s: &Setup, off: u64, len: u64, mut f: impl FnMut(u64, &mut u8, &mut u8)) {
        let mut pos = off;
        while pos < off + len {
            let c = pos / s.cs;
            let (vals, states) = self.clusters.entry(c).or_insert_with(|| {
                let vals = (c * s.cs..(c + 1) * s.cs).map(|p| s.initial(p)).collect();
                (vals, vec![KNOWN; s.cs as usize])
            });
            let end = (off + len).min((c + 1) * s.cs);
            for p in pos..end {
                let i = (p - c * s.cs) as usize;
                f(p, &mut vals[i], &mut states[i]);
            }
            pos = end;
        }
    }

    fn apply(&mut self, s: &Setup, op: &Op, ok: bool) {
        match (*op, ok) {
            (Op::Flush | Op::Read { .. } | Op::Stream | Op::Reorganize(_), _) => {}
            (Op::Write { off, len, .. }, false)
            | (Op::Zeroes { off, len }, false)
            | (Op::Discard { off, len }, false) => {
                self.update(s, off, len, |_, _, st| *st = ANY);
            }
            (Op::Write { off, len, seed }, true) => {
                let data = pattern(off, len, seed);
                self.update(s, off, len, |p, v, st| {
                    *v = data[(p - off) as usize];
                    *st = KNOWN;
                });
            }
            (Op::Zeroes { off, len }, true) => {
                self.update(s, off, len, |_, v, st| {
                    *v = 0;
                    *st = KNOWN;
                });
            }
            (Op::Discard { off, len }, true) => {
                // Whole clusters read as zeros, or (unallocated over a backing file)
                // as the backing file; partial clusters are untouched.
                let from = off.next_multiple_of(s.cs);
                let to = (off + len) / s.cs * s.cs;
                if from < to {
                    let backing = s.backing_len > 0;
                    self.update(s, from, to - from, |p, v, st| {
                        if *st == ANY {
                            return;
                        }
                        *v = if backing { s.initial(p) } else { 0 };
                        *st = if *v == 0 { KNOWN } else { OR_ZERO };
                    });
                }
            }
        }
    }
}

/// Reads the whole image as the model says it should: every touched cluster byte by
/// byte, and every other cluster the image holds against the initial content.
fn verify(s: &Setup, image: &Image, model: &Model, what: &str) {
    let cs = s.cs;
    let mut buf = vec![0u8; cs as usize];
    let read = |buf: &mut [u8], c: u64| {
        let n = (s.size - c * cs).min(cs) as usize;
        image
            .read_at(&mut buf[..n], c * cs)
            .unwrap_or_else(|e| panic!("{what}: reading cluster {c}: {e}"));
        n
    };
    for (&c, (vals, states)) in &model.clusters {
        let n = read(&mut buf, c);
        for i in 0..n {
            let got = buf[i];
            let ok = match states[i] {
                KNOWN => got == vals[i],
                OR_ZERO => got == vals[i] || got == 0,
                _ => true,
            };
            assert!(
                ok,
                "{what}: guest byte {:#x} reads {got:#04x}, expected {:#04x}{}",
                c * cs + i as u64,
                vals[i],
                if states[i] == OR_ZERO { " or 0" } else { "" }
            );
        }
    }
    let mut pos = 0;
    while pos < s.size {
        let (mapping, n) = image
            .lookup(pos, s.size - pos)
            .unwrap_or_else(|e| panic!("{what}: lookup at {pos:#x}: {e}"));
        if mapping != Mapping::Unallocated {
            for c in pos / cs..(pos + n).div_ceil(cs) {
                if model.clusters.contains_key(&c) {
                    continue;
                }
                let n = read(&mut buf, c);
                for (i, &got) in buf[..n].iter().enumerate() {
                    let p = c * cs + i as u64;
                    assert_eq!(
                        got,
                        s.initial(p),
                        "{what}: untouched guest byte {p:#x} ({mapping:?}) changed"
                    );
                }
            }
        }
        pos += n;
    }
}

/// Reopens `bytes` read-write (which repairs when NEED_CHECK is set), checks them, reads
/// them against `model`, then repairs them and does it all again.
fn reopen_and_verify(s: &Setup, bytes: Vec<u8>, model: &Model, what: &str) {
    let mut image = s
        .open(Box::new(MemoryStorage::from_bytes(bytes)))
        .unwrap_or_else(|e| panic!("{what}: reopening failed: {e}"));
    let report = image.check().unwrap();
    assert_eq!(
        (report.corruptions, report.check_errors),
        (0, 0),
        "{what}: {report:?}"
    );
    verify(s, &image, model, what);
    let repaired = image
        .repair(qed::RepairMode::All)
        .unwrap_or_else(|e| panic!("{what}: repair failed: {e}"));
    assert_eq!(repaired.corruptions, 0, "{what}: {repaired:?}");
    let after = image.check().unwrap();
    assert_eq!(
        (after.corruptions, after.check_errors),
        (0, 0),
        "{what}: after repair: {after:?}"
    );
    verify(s, &image, model, &format!("{what}, after repair"));
}

// ---------------------------------------------------------------------------------------
// One case.

struct Outcome {
    /// Counted storage operations, the final close included.
    ops: u64,
    injected: u64,
}

fn disk_needs_check(mem: &MemoryStorage) -> bool {
    let mut f = [0u8; 8];
    mem.read_at(&mut f, FEATURES as u64).unwrap();
    u64::from_le_bytes(f) & features::NEED_CHECK != 0
}

fn run_case(s: &Setup, plan: FaultPlan) -> Outcome {
    let what = format!("{}: {plan:?}", s.name);
    running(what.clone());
    let ops = if s.reorganize {
        reorganize_script(s)
    } else {
        script(s)
    };
    let mem = Arc::new(MemoryStorage::from_bytes(s.fresh.clone()));
    let faulty = Arc::new(FaultyStorage::new(mem.clone(), plan));
    let mut model = Model::default();
    let mut durable = (s.fresh.clone(), Model::default());

    match s.open(Box::new(faulty.clone())) {
        Err(e) => assert!(
            faulty.injected() > 0,
            "{what}: open failed without a fault: {e}"
        ),
        Ok(image) => {
            let one_shot = plan.at.is_some() && !plan.sticky;
            // Requests acknowledged since the last successful flush. Table entries are
            // written back at a flush, so until one completes their effect may be
            // missing from the file (as with a disk's volatile write cache).
            let mut unflushed: Vec<Op> = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                let before = faulty.injected();
                let result = exec(&image, op);
                let failed_here = faulty.injected() > before;
                if std::env::var_os("QED_FAULTS_TRACE").is_some() {
                    eprintln!(
                        "request {i} {op:?}: {result:?}, storage ops so far {}",
                        faulty.ops()
                    );
                }
                match &result {
                    Ok(()) => {}
                    Err(e) if plan.at.is_none() => panic!("{what}: {op:?} failed: {e}"),
                    Err(e) => assert!(
                        failed_here || !one_shot,
                        "{what}: request {i} {op:?} failed after a one-time fault at \
                         an earlier request: {e}"
                    ),
                }
                if failed_here {
                    assert!(
                        result.is_err(),
                        "{what}: request {i} {op:?} succeeded through a failed storage \
                         operation ({:?})",
                        faulty.first_fault()
                    );
                }
                model.apply(s, op, result.is_ok());
                unflushed.push(*op);
                if matches!(op, Op::Flush) && result.is_ok() {
                    durable = (mem.to_bytes(), model.clone());
                    unflushed.clear();
                }
                if s.backing_len == 0 && image.header().needs_check() {
                    assert!(
                        disk_needs_check(&mem),
                        "{what}: after request {i} {op:?} the image relies on NEED_CHECK, \
                         which the file does not have"
                    );
                }
            }
            let before = faulty.injected();
            let closed = image.close();
            match &closed {
                Ok(()) => durable = (mem.to_bytes(), model.clone()),
                Err(e) => {
                    assert!(
                        faulty.injected() > before || (plan.sticky && faulty.injected() > 0),
                        "{what}: close failed after a one-time fault: {e}"
                    );
                    // The close's flush failed: what was acknowledged since the last
                    // completed flush may or may not be in the file. The crash tests
                    // pin down the rest (each sector old or new, never anything else).
                    for op in &unflushed {
                        model.apply(s, op, false);
                    }
                }
            }
            if plan.at.is_none() {
                assert!(!disk_needs_check(&mem), "{what}: left NEED_CHECK set");
            }
        }
    }

    let left = mem.to_bytes();
    // After a successful close the two are the same; verifying once is enough.
    if durable.0 != left {
        reopen_and_verify(
            s,
            durable.0,
            &durable.1,
            &format!("{what}, bytes at the last successful flush"),
        );
    }
    reopen_and_verify(s, left, &model, &format!("{what}, bytes left"));
    Outcome {
        ops: faulty.ops(),
        injected: faulty.injected(),
    }
}

/// Runs the workload once without faults to count its operations, then once per
/// operation and plan. Returns the faults injected.
fn sweep(s: &Setup, count_reads: bool, kinds: &[FaultKind], sticky: &[bool]) -> u64 {
    start_watchdog();
    let clean = run_case(
        s,
        FaultPlan {
            count_reads,
            ..FaultPlan::none()
        },
    );
    assert_eq!(clean.injected, 0);
    let mut injected = 0;
    let mut cases = 0;
    for &kind in kinds {
        for &sticky in sticky {
            for n in 1..=clean.ops {
                if only_at().is_some_and(|only| only != n) {
                    continue;
                }
                let plan = FaultPlan {
                    at: Some(n),
                    kind,
                    sticky,
                    count_reads,
                };
                let out = run_case(s, plan);
                assert!(out.injected >= 1, "{}: {plan:?} injected nothing", s.name);
                injected += out.injected;
                cases += 1;
            }
        }
    }
    let line = format!(
        "faults: {}{}: {} operations per run, {cases} cases, {injected} faults injected",
        s.name,
        if count_reads { " (reads counted)" } else { "" },
        clean.ops
    );
    println!("{line}");
    // The total across tests, for whoever runs them all.
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(summary_path())
        .and_then(|mut f| writeln!(f, "{line}"));
    injected
}

/// `QED_FAULTS_AT=N` runs only the cases that fail operation N, to study one.
fn only_at() -> Option<u64> {
    qed_testkit::settings::env_u64("QED_FAULTS_AT")
}

fn summary_path() -> PathBuf {
    std::env::var_os("QED_FAULTS_SUMMARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("qed-faults-summary.txt"))
}

// ---------------------------------------------------------------------------------------

const WRITE_FAULTS: [bool; 2] = [false, true];

#[test]
fn faults_4k_table1() {
    sweep(
        &Setup::new(4096, 1, false),
        false,
        &FaultKind::ALL,
        &WRITE_FAULTS,
    );
}

#[test]
fn faults_4k_table1_over_raw() {
    sweep(
        &Setup::new(4096, 1, true),
        false,
        &FaultKind::ALL,
        &WRITE_FAULTS,
    );
}

#[test]
fn faults_64k_table4() {
    sweep(
        &Setup::new(65536, 4, false),
        false,
        &FaultKind::ALL,
        &WRITE_FAULTS,
    );
}

#[test]
fn faults_64k_table4_over_raw() {
    sweep(
        &Setup::new(65536, 4, true),
        false,
        &FaultKind::ALL,
        &WRITE_FAULTS,
    );
}

#[test]
fn faults_reorganize_4k_table1() {
    sweep(
        &Setup::new(4096, 1, false).reorganizing(),
        false,
        &FaultKind::ALL,
        &WRITE_FAULTS,
    );
}

#[test]
fn faults_reorganize_64k_table4_over_raw() {
    sweep(
        &Setup::new(65536, 4, true).reorganizing(),
        false,
        &FaultKind::ALL,
        &WRITE_FAULTS,
    );
}

/// Reads fail too: a read of metadata inside a write path must fail the write cleanly.
#[test]
fn faults_with_reads_counted() {
    for (cluster, table, backing) in [(4096, 1, false), (65536, 4, true)] {
        sweep(
            &Setup::new(cluster, table, backing),
            true,
            &[FaultKind::Eio, FaultKind::EioAfterEffect],
            &[false],
        );
    }
}

// ---------------------------------------------------------------------------------------
// Repairs under faults: an image with NEED_CHECK set, a double reference and leaks both
// inside the file and at its end, so that a repair copies a cluster, moves clusters and
// a table down into holes, and truncates. Wherever it fails, the image must still read
// exactly as before, and check clean once repaired without faults.

/// Builds the damaged image; returns it with what every touched cluster reads.
fn damaged(s: &Setup) -> (Vec<u8>, Model) {
    let (cs, c) = (s.cs, s.coverage);
    let mem = Arc::new(MemoryStorage::from_bytes(s.fresh.clone()));
    let image = s.open(Box::new(mem.clone())).unwrap();
    for i in 0..8 {
        image.write_at(&pattern(i * cs, cs, i), i * cs).unwrap();
    }
    for i in 0..3 {
        let at = c + i * cs;
        image.write_at(&pattern(at, cs, 100 + i), at).unwrap();
    }
    image.write_at(&pattern(9 * cs, cs, 9), 9 * cs).unwrap();
    let data = |pos: u64| match image.lookup(pos, 1).unwrap().0 {
        Mapping::Data(off) => off,
        m => panic!("{m:?} at {pos:#x}"),
    };
    let (d2, d3) = (data(2 * cs), data(3 * cs));
    image.close().unwrap();
    let mut b = mem.to_bytes();
    let l1 = get_u64(&b, 0x28_u64);
    let t0 = get_u64(&b, l1);
    assert!(get_u64(&b, l1 + 8) > d3);
    // Guest clusters 2 and 5 to 7 lose their data clusters (holes inside the file, one
    // of them big enough for a table); cluster 4 shares cluster 3's (a double reference,
    // and cluster 4's own becomes a hole too).
    assert_eq!(get_u64(&b, t0 + 2 * 8), d2);
    for i in [2, 5, 6, 7] {
        put_u64(&mut b, t0 + i * 8, 0);
    }
    put_u64(&mut b, t0 + 4 * 8, d3);
    let f = get_u64(&b, FEATURES as u64);
    put_u64(&mut b, FEATURES as u64, f | features::NEED_CHECK);
    // Leaks at the end, and a partial cluster after them.
    b.resize(b.len() + 3 * cs as usize + 100, 0xee);

    let ro = Image::open_storage(
        Box::new(MemoryStorage::from_bytes(b.clone())),
        Path::new("damaged.qed"),
        &OpenOptions::read_only(),
    )
    .unwrap();
    let mut model = Model::default();
    let mut buf = vec![0u8; cs as usize];
    for pos in (0..12).map(|i| i * cs).chain((0..4).map(|i| c + i * cs)) {
        ro.read_at(&mut buf, pos).unwrap();
        model.update(s, pos, cs, |p, v, st| {
            *v = buf[(p - pos) as usize];
            *st = KNOWN;
        });
    }
    (b, model)
}

/// After the repair (at open, or called on an open image), writes go on: whatever the
/// repair left in memory must agree with the file. (They avoid the shared cluster: until
/// a repair succeeds, a write there changes both guest clusters.)
fn repair_case(s: &Setup, bytes: &[u8], expected: &Model, plan: FaultPlan, at_open: bool) -> u64 {
    let what = format!(
        "{} repair {}: {plan:?}",
        s.name,
        if at_open { "at open" } else { "called" }
    );
    running(what.clone());
    let mem = Arc::new(MemoryStorage::from_bytes(bytes.to_vec()));
    let faulty = Arc::new(FaultyStorage::new(mem.clone(), plan));
    let opts = OpenOptions {
        image: qed::ImageOptions {
            repair_on_open: at_open,
            ..qed::ImageOptions::default()
        },
        ..OpenOptions::default()
    };
    let mut model = expected.clone();
    match Image::open_storage(Box::new(faulty.clone()), Path::new("damaged.qed"), &opts) {
        Err(e) => assert!(faulty.injected() > 0, "{what}: open failed: {e}"),
        Ok(mut image) => {
            if !at_open {
                let before = faulty.injected();
                if let Err(e) = image.repair(qed::RepairMode::All) {
                    assert!(faulty.injected() > before, "{what}: repair failed: {e}");
                }
            }
            let one_shot = !plan.sticky;
            for op in [
                Op::Write {
                    off: 2 * s.cs + 5,
                    len: 300,
                    seed: 50,
                },
                Op::Write {
                    off: 8 * s.cs + 100,
                    len: s.cs,
                    seed: 51,
                },
                Op::Zeroes {
                    off: 9 * s.cs,
                    len: s.cs,
                },
                Op::Write {
                    off: s.coverage + 3 * s.cs,
                    len: 10,
                    seed: 52,
                },
                Op::Flush,
            ] {
                let before = faulty.injected();
                let result = exec(&image, &op);
                if let Err(e) = &result {
                    assert!(
                        faulty.injected() > before || !one_shot,
                        "{what}: {op:?} failed after a one-time fault: {e}"
                    );
                }
                model.apply(s, &op, result.is_ok());
            }
            let _ = image.close();
        }
    }
    reopen_and_verify(s, mem.to_bytes(), &model, &format!("{what}, bytes left"));
    faulty.injected()
}

fn repair_sweep(cluster: u32, table: u32) {
    start_watchdog();
    let s = Setup::new(cluster, table, false);
    let (bytes, expected) = damaged(&s);
    let mut line = String::new();
    for at_open in [true, false] {
        for count_reads in [false, true] {
            let counting = FaultPlan {
                count_reads,
                ..FaultPlan::none()
            };
            let mut injected = repair_case(&s, &bytes, &expected, counting, at_open);
            assert_eq!(injected, 0);
            // Counting again the way the sweep will, to know how far to go.
            let mem = MemoryStorage::from_bytes(bytes.clone());
            let faulty = Arc::new(FaultyStorage::new(mem, counting));
            let opts = OpenOptions {
                image: qed::ImageOptions {
                    repair_on_open: at_open,
                    ..qed::ImageOptions::default()
                },
                ..OpenOptions::default()
            };
            let mut image =
                Image::open_storage(Box::new(faulty.clone()), Path::new("d.qed"), &opts).unwrap();
            if !at_open {
                image.repair(qed::RepairMode::All).unwrap();
            }
            let total = faulty.ops();
            drop(image);
            let mut cases = 0;
            for &kind in &FaultKind::ALL {
                for sticky in [false, true] {
                    if count_reads && (sticky || kind == FaultKind::NoSpace) {
                        continue;
                    }
                    for n in 1..=total {
                        let plan = FaultPlan {
                            at: Some(n),
                            kind,
                            sticky,
                            count_reads,
                        };
                        injected += repair_case(&s, &bytes, &expected, plan, at_open);
                        cases += 1;
                    }
                }
            }
            line += &format!(
                "faults: {} repair {}{}: {total} operations, {cases} cases, {injected} faults \
                 injected\n",
                s.name,
                if at_open { "at open" } else { "called" },
                if count_reads { " (reads counted)" } else { "" },
            );
        }
    }
    print!("{line}");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(summary_path())
        .and_then(|mut f| f.write_all(line.as_bytes()));
}

#[test]
fn repair_faults_4k_table1() {
    repair_sweep(4096, 1);
}

#[test]
fn repair_faults_64k_table4() {
    repair_sweep(65536, 4);
}
