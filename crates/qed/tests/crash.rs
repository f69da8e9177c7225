//! Crash safety, proven by enumerating crash states.
//!
//! Each workload runs guest operations on an image over a [`RecordingStorage`], noting
//! the log position before and after every operation. Then, for every crash point `k`
//! (every log position: the first `k` storage operations were issued), many crash
//! states are rebuilt. The crash model (see `qed_testkit::RecordingStorage`):
//!
//! - everything before the last flush among the first `k` operations is on disk;
//! - each operation after that flush (write, zeroing, length change) is in flight: any
//!   subset of them reached the disk, applied in issue order;
//! - a multi-sector write or zeroing may be torn: each 512-byte-aligned piece of it is
//!   applied or not independently (a piece is atomic); a length change is one piece;
//!   a zeroing never extends the file (it is a punched hole).
//!
//! In-flight sets with few pieces are enumerated exhaustively; larger ones always get
//! "none" and "all" plus a deterministic random sample (independent subsets with torn
//! writes, prefixes with a torn boundary, one op alone, all but a torn one). States
//! are counted once per crash point (identical bytes at one point are checked once).
//!
//! Every state must satisfy the invariants of the design notes:
//!
//! 1. it opens read-write (repairing when NEED_CHECK is set) and `check()` then reports
//!    no corruption and no check error (leaks are allowed: a crash may leak clusters);
//! 2. its size is the size after the last completed barrier (below), or the target of a
//!    resize in progress;
//! 3. every 512-byte guest sector reads as its value at the last completed barrier, or
//!    as one of the values guest operations started after that barrier gave it; reads
//!    past the size fail as out of range;
//! 4. grown to the largest size the workload reached, the disk reads past its old size
//!    only zeros or the backing file: data a shrink dropped never comes back.
//!
//! And the repair at open must itself be crash safe: for one in [`RECOVERY_ONE_IN`]
//! states that open with NEED_CHECK set, the repair is recorded too, and every state a
//! crash during it leaves (same model) must meet the same expectations when opened.
//!
//! A barrier is a guest flush, a close, or a resize; it is completed at crash point `k`
//! when all its storage operations are among the first `k`. A guest operation "started"
//! at `k` when its first storage operation is. Resizes are barriers because
//! `Image::resize` flushes before it returns (the new size is durable, and so is every
//! write before it): this makes the invariant stricter, never looser, than counting
//! guest flushes alone.
//!
//! Across a resize: sectors past the current size do not exist (reads there must fail).
//! A shrink clears the table entries past the new end (and zeroes the tail of a kept
//! data cluster) before it rewrites the header. So while it is in flight and the state
//! still shows the old size, a dropped sector may read as its old value or as what the
//! shrink makes of it: zeros for the zeroed tail, the backing file (or zeros without
//! one) for a cluster whose entry was cleared. Once the shrink completed, those sectors
//! are gone: when a later grow brings them back they must read exactly what the live
//! image read right after that grow, never their pre-shrink contents.
//!
//! Scale: `QED_CRASH_SCALE=n` multiplies the states sampled per crash point and the
//! number of random workloads; `QED_CRASH_SEED=s` (decimal, or hex as the summary
//! prints it) changes the seed of the random workloads and samples. Run with `-- --nocapture` to see the counts.

use qed::{BlockDevice, CreateOptions, Error, Format, Image, Mapping, OpenOptions};
use qed::{MemoryStorage, Reorganization, Storage};
use qed_testkit::{CrashLog, RecordedOp, RecordingStorage};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const SECTOR: u64 = 512;
/// 4 KiB clusters with one-cluster tables: an L2 table covers 2 MiB, so workloads cross
/// tables cheaply.
const CS: u64 = 4096;
const L2_REACH: u64 = reach(1);
/// Initial virtual size with one-cluster tables.
const SIZE0: u64 = size0(1);

/// Guest bytes one L2 table maps with `table`-cluster tables.
const fn reach(table: u32) -> u64 {
    CS * (CS / 8) * table as u64
}

/// Initial virtual size: a little more than one L2 table's reach.
const fn size0(table: u32) -> u64 {
    reach(table) + 256 * 1024
}
/// States sampled per crash point at scale 1 (small in-flight sets are enumerated
/// completely below this).
const SAMPLES_PER_POINT: u64 = 64;
/// States sampled per crash point of a repair at open.
const RECOVERY_SAMPLES_PER_POINT: u64 = 8;
/// One in this many crash states that need a repair at open get their repair crash-tested.
const RECOVERY_ONE_IN: u64 = 8;
/// States the default run must explore.
const MIN_STATES: u64 = 10_000;
/// Violations reported per workload before giving up on it.
const MAX_VIOLATIONS: usize = 5;

struct Config {
    scale: u64,
    seed: u64,
}

fn config() -> Config {
    // Taken as printed: the summary prints the seed in hex.
    let var = qed_testkit::settings::env_u64;
    Config {
        scale: var("QED_CRASH_SCALE").unwrap_or(1).max(1),
        seed: var("QED_CRASH_SEED").unwrap_or(0x5eed_c0de),
    }
}

/// splitmix64: small, deterministic, good enough to pick samples.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    fn bytes(&mut self, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len.next_multiple_of(8) as usize];
        for w in out.chunks_exact_mut(8) {
            w.copy_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len as usize);
        out
    }
}

/// A fast, non-cryptographic hash: sector contents are compared by hash.
fn hash(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().unwrap());
        h = (h.rotate_left(23) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    for &b in words.remainder() {
        h = (h.rotate_left(23) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    h ^ (h >> 29)
}

/// One guest operation of a workload.
#[derive(Debug, Clone)]
enum Step {
    Write {
        off: u64,
        len: u64,
    },
    /// Writes to disjoint sectors, each from its own thread, all at once: allocations
    /// racing for clusters, L2 sectors and tables, and sharing flushes. One guest
    /// operation: the log order is whatever the race produced.
    Parallel {
        writes: Vec<(u64, u64)>,
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
    Resize {
        size: u64,
    },
    /// A read, with copy-on-read on (over a backing file): it may fill clusters, and must
    /// change nothing the guest sees.
    Read {
        off: u64,
        len: u64,
    },
    /// `qed::stream` of everything, leaving no backing file: nothing the guest sees
    /// changes. It flushes before it rewrites the header, so it is a barrier. (Workloads
    /// put it last: a later shrink would drop sectors to zeros, not the old backing file.)
    Stream,
    /// `qed::compact` (clusters move into free space and the file is cut) or
    /// `qed::defrag` (tables together, then data in guest order): nothing the guest sees
    /// changes.
    Reorganize(Reorganization),
    Close,
}

#[derive(Debug, Clone)]
struct Workload {
    name: String,
    backing: bool,
    /// Clusters per table.
    table: u32,
    /// Bytes of garbage after the last whole cluster of the initial file (a partial
    /// cluster, as an interrupted allocation of an earlier session leaves).
    garbage: u64,
    /// Writes (offset, length) done before recording, so that the session starts from an
    /// image that already has tables and data.
    setup: Vec<(u64, u64)>,
    steps: Vec<Step>,
    seed: u64,
}

/// A guest sector's value set by one guest operation.
#[derive(Debug, Clone)]
struct Change {
    /// Index of the guest operation (0 is the initial state).
    op: usize,
    /// Values the sector may show while the operation is in flight, besides `after`.
    during: Vec<u64>,
    /// The value once the operation completed; `None`: the sector no longer exists.
    after: Option<u64>,
}

/// A guest operation as run: where it sits in the storage log.
#[derive(Debug, Clone)]
struct GuestOp {
    step: Option<Step>,
    start: usize,
    end: usize,
    barrier: bool,
    /// Virtual size once the operation completed.
    size_after: u64,
}

/// What was recorded while a workload ran.
struct Recorded {
    log: CrashLog,
    ops: Vec<GuestOp>,
    /// Per guest sector, every change in order.
    history: Vec<Vec<Change>>,
    image_path: PathBuf,
    /// The largest virtual size the workload reaches.
    max_size: u64,
    /// Per guest sector, what it reads with nothing in the image over it.
    below: Vec<u64>,
    zero: u64,
    _dir: tempfile::TempDir,
}

/// What one crash point allows.
struct Expected {
    sizes: Vec<u64>,
    /// Per guest sector, the acceptable values (`None`: must not exist).
    sectors: Vec<Vec<Option<u64>>>,
}

#[derive(Default)]
struct Outcome {
    states: u64,
    /// States whose repair at open was itself crash-tested.
    recoveries: u64,
    /// States left by crashes during those repairs (not in `states`).
    recovery_states: u64,
    images: HashSet<u64>,
    points: u64,
    log_len: usize,
    violations: Vec<String>,
}

/// Storage whose flushes take a while when `slow` is set, as a real fsync does: the
/// flush is recorded when it is issued (it covers the writes completed before that),
/// and returns later. Racing writers then really overlap flushes, so a writer that
/// relied on a flush that started before its own write completed would be caught.
#[derive(Debug)]
struct SlowFlush {
    inner: Arc<RecordingStorage>,
    slow: AtomicBool,
}

impl Storage for SlowFlush {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()?;
        if self.slow.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.zero_range(offset, len)
    }
}

fn sectors_of(off: u64, len: u64) -> std::ops::Range<usize> {
    (off / SECTOR) as usize..(off + len).div_ceil(SECTOR) as usize
}

fn record(w: &Workload) -> Recorded {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(w.seed);
    let size0 = size0(w.table);
    let max_size = w
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Resize { size } => Some(*size),
            _ => None,
        })
        .fold(size0, u64::max);
    let sectors = (max_size / SECTOR) as usize;

    // A raw backing file shorter than the disk and not sector aligned, so that reads
    // and copies cross its end.
    let backing_bytes = if w.backing {
        rng.bytes(size0 - 200 * 1024 + 700)
    } else {
        Vec::new()
    };
    let mut opts = CreateOptions {
        cluster_size: CS as u32,
        table_size: w.table,
        ..CreateOptions::new(size0)
    };
    if w.backing {
        let path = dir.path().join("backing.raw");
        std::fs::write(&path, &backing_bytes).unwrap();
        // Absolute, so that the image can live in memory and still find it.
        opts.backing_file = Some(path.to_str().unwrap().to_string());
        opts.backing_format = Some(Format::Raw);
    }
    let mem = Arc::new(MemoryStorage::new());
    Image::create_on(&*mem, &opts).unwrap();
    if !w.setup.is_empty() {
        // Written before recording starts: the image a crash-tested session starts from.
        let setup_path = dir.path().join("setup.qed");
        let img = Image::open_storage(Box::new(mem.clone()), &setup_path, &OpenOptions::default())
            .unwrap();
        for &(off, len) in &w.setup {
            img.write_at(&rng.bytes(len), off).unwrap();
        }
        img.close().unwrap();
    }
    let mut initial = mem.to_bytes();
    initial.extend(rng.bytes(w.garbage).iter().map(|b| b | 1));

    // What a guest sector reads when nothing in the image covers it.
    let below = |s: usize| -> u64 {
        let mut buf = [0u8; SECTOR as usize];
        let start = (s as u64 * SECTOR).min(backing_bytes.len() as u64) as usize;
        let end = ((s as u64 + 1) * SECTOR).min(backing_bytes.len() as u64) as usize;
        buf[..end - start].copy_from_slice(&backing_bytes[start..end]);
        hash(&buf)
    };
    let zero = hash(&[0u8; SECTOR as usize]);

    let image_path = dir.path().join("image.qed");
    let rec = Arc::new(RecordingStorage::new(initial));
    let slow = Arc::new(SlowFlush {
        inner: rec.clone(),
        slow: AtomicBool::new(false),
    });
    let mut image = Some(
        Image::open_storage(
            Box::new(slow.clone()),
            &image_path,
            &OpenOptions {
                image: qed::ImageOptions {
                    copy_on_read: w.backing,
                    ..qed::ImageOptions::default()
                },
                ..OpenOptions::default()
            },
        )
        .unwrap(),
    );

    let mut size = size0;
    // The initial contents: what the live image reads before the first step.
    let mut history: Vec<Vec<Change>> = vec![Vec::new(); sectors];
    let mut ops = vec![GuestOp {
        step: None,
        start: 0,
        end: 0,
        barrier: true,
        size_after: size0,
    }];

    // The live image must read what the model says; the model then records it.
    let read = |image: &Image, off: u64, len: u64| -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        image.read_at(&mut buf, off).unwrap();
        buf
    };
    {
        // Read from a copy opened without copy-on-read: a fill here would leave no
        // cluster for the workload's own reads to fill.
        let copy = Image::open_storage(
            Box::new(MemoryStorage::from_bytes(rec.to_bytes())),
            &image_path,
            &OpenOptions::read_only(),
        )
        .unwrap();
        let all = read(&copy, 0, size0);
        for (s, changes) in history.iter_mut().enumerate() {
            let after = all
                .get(s * SECTOR as usize..(s + 1) * SECTOR as usize)
                .map(hash);
            if w.setup.is_empty() && after.is_some() {
                assert_eq!(after, Some(below(s)), "{}: initial sector {s}", w.name);
            }
            changes.push(Change {
                op: 0,
                during: Vec::new(),
                after,
            });
        }
    }

    for step in &w.steps {
        let i = ops.len();
        let start = rec.position();
        let img = image.as_ref().expect("no step after Close");
        let mut changes: Vec<(usize, Change)> = Vec::new();
        let mut barrier = false;
        let ctx = format!("{}: step {i} {step:?}", w.name);
        match *step {
            Step::Write { off, len } => {
                let data = rng.bytes(len);
                img.write_at(&data, off).unwrap();
                assert_eq!(read(img, off, len), data, "{ctx}: live read-back");
                for (k, s) in sectors_of(off, len).enumerate() {
                    let h = hash(&data[k * SECTOR as usize..(k + 1) * SECTOR as usize]);
                    changes.push((
                        s,
                        Change {
                            op: i,
                            during: vec![],
                            after: Some(h),
                        },
                    ));
                }
            }
            Step::Parallel { ref writes } => {
                let data: Vec<Vec<u8>> = writes.iter().map(|&(_, len)| rng.bytes(len)).collect();
                slow.slow.store(true, Ordering::Relaxed);
                std::thread::scope(|scope| {
                    for (&(off, _), d) in writes.iter().zip(&data) {
                        scope.spawn(move || img.write_at(d, off).unwrap());
                    }
                });
                slow.slow.store(false, Ordering::Relaxed);
                for (&(off, len), d) in writes.iter().zip(&data) {
                    assert_eq!(&read(img, off, len), d, "{ctx}: live read-back");
                    for (k, s) in sectors_of(off, len).enumerate() {
                        let h = hash(&d[k * SECTOR as usize..(k + 1) * SECTOR as usize]);
                        changes.push((
                            s,
                            Change {
                                op: i,
                                during: vec![],
                                after: Some(h),
                            },
                        ));
                    }
                }
            }
            Step::Zeroes { off, len } => {
                img.write_zeroes(off, len).unwrap();
                assert!(
                    read(img, off, len).iter().all(|&b| b == 0),
                    "{ctx}: not zero"
                );
                for s in sectors_of(off, len) {
                    changes.push((
                        s,
                        Change {
                            op: i,
                            during: vec![],
                            after: Some(zero),
                        },
                    ));
                }
            }
            Step::Discard { off, len } => {
                let before = read(img, off, len);
                img.discard(off, len).unwrap();
                let after = read(img, off, len);
                for (k, s) in sectors_of(off, len).enumerate() {
                    let r = k * SECTOR as usize..(k + 1) * SECTOR as usize;
                    let h = hash(&after[r.clone()]);
                    assert!(
                        h == zero || after[r.clone()] == before[r],
                        "{ctx}: discard made sector {s} neither zero nor unchanged"
                    );
                    changes.push((
                        s,
                        Change {
                            op: i,
                            during: vec![],
                            after: Some(h),
                        },
                    ));
                }
            }
            Step::Flush => {
                img.flush().unwrap();
                barrier = true;
            }
            Step::Read { off, len } => {
                let got = read(img, off, len);
                for (k, s) in sectors_of(off, len).enumerate() {
                    let h = hash(&got[k * SECTOR as usize..(k + 1) * SECTOR as usize]);
                    assert_eq!(
                        Some(h),
                        history[s].last().unwrap().after,
                        "{ctx}: sector {s} read wrong"
                    );
                }
            }
            Step::Stream => {
                let end = qed::stream(img, &qed::StreamOptions::default(), &mut qed::no_progress)
                    .unwrap();
                assert!(matches!(end, qed::StreamEnd::Done { .. }), "{ctx}: {end:?}");
                assert!(img.backing_file().is_none(), "{ctx}: backing file left");
                barrier = true;
            }
            Step::Reorganize(job) => {
                let end = job
                    .run(img, &Default::default(), &mut qed::no_progress)
                    .unwrap();
                assert!(
                    matches!(end, qed::ReorganizeEnd::Done { .. }),
                    "{ctx}: {end:?}"
                );
                // (Over a backing file, copy-on-read would fill the whole disk here.)
                let all = if w.backing {
                    Vec::new()
                } else {
                    read(img, 0, size)
                };
                for (s, changes) in history
                    .iter()
                    .enumerate()
                    .take((all.len() as u64 / SECTOR) as usize)
                {
                    let got = hash(&all[s * SECTOR as usize..(s + 1) * SECTOR as usize]);
                    assert_eq!(
                        Some(got),
                        changes.last().unwrap().after,
                        "{ctx}: sector {s} changed"
                    );
                }
            }
            Step::Close => {
                image.take().unwrap().close().unwrap();
                barrier = true;
            }
            Step::Resize { size: new } if new < size => {
                // What each dropped sector becomes if the shrink's table updates reach
                // the disk before its header does.
                let keep_end = new.next_multiple_of(CS);
                for s in sectors_of(new, size - new) {
                    let pos = s as u64 * SECTOR;
                    let dropped = if pos < keep_end {
                        match img.lookup(pos, 1).unwrap().0 {
                            Mapping::Data(_) => zero,
                            _ => history[s].last().unwrap().after.unwrap(),
                        }
                    } else {
                        below(s)
                    };
                    changes.push((
                        s,
                        Change {
                            op: i,
                            during: vec![dropped],
                            after: None,
                        },
                    ));
                }
                image.as_mut().unwrap().resize(new, true).unwrap();
                size = new;
                barrier = true;
            }
            Step::Resize { size: new } => {
                image.as_mut().unwrap().resize(new, false).unwrap();
                let img = image.as_ref().unwrap();
                let grown = read(img, size, new - size);
                for (k, s) in sectors_of(size, new - size).enumerate() {
                    let h = hash(&grown[k * SECTOR as usize..(k + 1) * SECTOR as usize]);
                    assert!(
                        h == zero || h == below(s),
                        "{ctx}: grown sector {s} is neither zero nor the backing file"
                    );
                    changes.push((
                        s,
                        Change {
                            op: i,
                            during: vec![],
                            after: Some(h),
                        },
                    ));
                }
                size = new;
                barrier = true;
            }
        }
        for (s, c) in changes {
            history[s].push(c);
        }
        ops.push(GuestOp {
            step: Some(step.clone()),
            start,
            end: rec.position(),
            barrier,
            size_after: size,
        });
    }
    drop(image);
    Recorded {
        log: rec.log(),
        ops,
        history,
        image_path,
        max_size,
        below: (0..sectors).map(below).collect(),
        zero,
        _dir: dir,
    }
}

impl Recorded {
    /// The last barrier completed at crash point `k`.
    fn last_barrier(&self, k: usize) -> usize {
        (0..self.ops.len())
            .rev()
            .find(|&i| self.ops[i].barrier && self.ops[i].end <= k)
            .unwrap_or(0)
    }

    fn expected(&self, k: usize) -> Expected {
        let b = self.last_barrier(k);
        let started = |op: usize| op > b && self.ops[op].start < k;
        let mut sizes = vec![self.ops[b].size_after];
        for op in b + 1..self.ops.len() {
            if started(op) {
                if let Some(Step::Resize { size }) = self.ops[op].step {
                    sizes.push(size);
                }
            }
        }
        let sectors = self
            .history
            .iter()
            .map(|changes| {
                let at_barrier = changes.iter().rev().find(|c| c.op <= b).unwrap();
                let mut ok = vec![at_barrier.after];
                for c in changes.iter().filter(|c| started(c.op)) {
                    ok.extend(c.during.iter().map(|&h| Some(h)));
                    ok.push(c.after);
                }
                ok.sort_unstable();
                ok.dedup();
                ok
            })
            .collect();
        Expected { sizes, sectors }
    }

    /// The guest operation running at crash point `k`, for messages.
    fn running(&self, k: usize) -> String {
        match self.ops.iter().position(|o| o.start < k && k <= o.end) {
            Some(i) => format!("guest op {i} {:?}", self.ops[i].step),
            None => "between guest ops".into(),
        }
    }
}

fn describe(op: &RecordedOp) -> String {
    match op {
        RecordedOp::Write { offset, data } => format!("write {:#x}+{:#x}", offset, data.len()),
        RecordedOp::Zero { offset, len } => format!("zero {offset:#x}+{len:#x}"),
        RecordedOp::SetLen(n) => format!("set_len {n:#x}"),
        RecordedOp::Flush => "flush".into(),
    }
}

/// Opens a crash state held in `storage` and checks every invariant on it; `Err`
/// describes the violation. `opened` runs right after the open (and its repair).
fn verify(
    rec: &Recorded,
    exp: &Expected,
    storage: Box<dyn Storage>,
    buf: &mut Vec<u8>,
    opened: &mut dyn FnMut(),
) -> Result<(), String> {
    let mut image = Image::open_storage(storage, &rec.image_path, &OpenOptions::default())
        .map_err(|e| format!("open failed: {e}"))?;
    opened();
    let report = image.check().map_err(|e| format!("check failed: {e}"))?;
    if report.corruptions > 0 || report.check_errors > 0 {
        return Err(format!(
            "check after open: {} corruptions, {} check errors: {:?} (repair at open: {:?})",
            report.corruptions,
            report.check_errors,
            report.details,
            image.open_repair()
        ));
    }
    let size = image.size();
    if !exp.sizes.contains(&size) {
        return Err(format!("size {size} is not one of {:?}", exp.sizes));
    }
    match image.read_at(&mut [0u8; SECTOR as usize], size) {
        Err(Error::OutOfRange { .. }) => {}
        other => return Err(format!("read past the size {size}: {other:?}")),
    }
    buf.resize(size as usize, 0);
    image
        .read_at(buf, 0)
        .map_err(|e| format!("reading the disk: {e}"))?;
    for (s, sector) in buf.chunks(SECTOR as usize).enumerate() {
        let h = hash(sector);
        let ok = &exp.sectors[s];
        if !ok.contains(&Some(h)) {
            let nonzero = sector.iter().filter(|&&b| b != 0).count();
            return Err(format!(
                "guest sector {s} (offset {:#x}) reads a value that is none of the {} \
                 acceptable ones ({nonzero} non-zero bytes; acceptable includes \
                 'absent': {})",
                s as u64 * SECTOR,
                ok.iter().flatten().count(),
                ok.contains(&None)
            ));
        }
    }
    // Past the size there is nothing: grown again, the disk must show there what an
    // unallocated cluster (or the zeroed tail of a shrunk cluster) shows, never data a
    // shrink dropped. This catches a shrunk size reaching the disk before the cleared
    // table entries it depends on.
    if size < rec.max_size {
        image
            .resize(rec.max_size, false)
            .map_err(|e| format!("growing the recovered disk: {e}"))?;
        buf.resize((rec.max_size - size) as usize, 0);
        image
            .read_at(buf, size)
            .map_err(|e| format!("reading the grown disk: {e}"))?;
        for (k, sector) in buf.chunks(SECTOR as usize).enumerate() {
            let s = (size / SECTOR) as usize + k;
            let h = hash(sector);
            if h != rec.zero && h != rec.below[s] {
                return Err(format!(
                    "after growing the recovered disk from {size} bytes, guest sector {s} \
                     (offset {:#x}) holds data: neither zeros nor the backing file",
                    s as u64 * SECTOR
                ));
            }
        }
    }
    Ok(())
}

/// Which in-flight operations a choice applied, for messages.
fn applied(log: &CrashLog, flight: std::ops::Range<usize>, choice: &[Vec<bool>]) -> String {
    flight
        .zip(choice)
        .filter(|(_, c)| c.iter().any(|&x| x))
        .map(|(i, c)| {
            let n = c.iter().filter(|&&x| x).count();
            format!("#{i} {} [{n}/{} pieces]", describe(&log.ops()[i]), c.len())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a crash state whose open repairs it, and then every state a crash during that
/// repair leaves: opened (and repaired) again, each must meet the same expectations.
fn verify_with_recovery_crashes(
    rec: &Recorded,
    exp: &Expected,
    bytes: Vec<u8>,
    rng: &mut Rng,
    buf: &mut Vec<u8>,
    states: &mut u64,
) -> Result<(), String> {
    let rs = Arc::new(RecordingStorage::new(bytes));
    let mut end = 0;
    verify(rec, exp, Box::new(rs.clone()), buf, &mut || {
        end = rs.position()
    })?;
    let log = rs.log();
    let mut seen = HashSet::new();
    for k in 0..=end {
        let flight = log.in_flight(k);
        let pieces: Vec<usize> = log.ops()[flight.clone()]
            .iter()
            .map(RecordedOp::pieces)
            .collect();
        for choice in choices(&pieces, RECOVERY_SAMPLES_PER_POINT, rng) {
            let bytes = log.crash_state(k, |i, p| choice[i - flight.start][p]);
            if !seen.insert(hash(&bytes)) {
                continue;
            }
            *states += 1;
            let storage = Box::new(MemoryStorage::from_bytes(bytes));
            verify(rec, exp, storage, buf, &mut || {}).map_err(|e| {
                format!(
                    "after a crash during the repair at open, at its log point {k} of {end} \
                     (in flight {flight:?}, applied [{}]): {e}",
                    applied(&log, flight.clone(), &choice)
                )
            })?;
        }
    }
    Ok(())
}

/// Choices of in-flight pieces to apply at one crash point.
fn choices(pieces: &[usize], budget: u64, rng: &mut Rng) -> Vec<Vec<Vec<bool>>> {
    let total: usize = pieces.iter().sum();
    let shape = |f: &mut dyn FnMut(usize, usize) -> bool| -> Vec<Vec<bool>> {
        pieces
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|p| f(i, p)).collect())
            .collect()
    };
    if total < 64 && (1u64 << total) <= budget {
        // Few enough to try every subset of pieces.
        return (0..1u64 << total)
            .map(|mask| {
                let mut bit = 0;
                shape(&mut |_, _| {
                    bit += 1;
                    mask >> (bit - 1) & 1 == 1
                })
            })
            .collect();
    }
    let mut out = vec![shape(&mut |_, _| false), shape(&mut |_, _| true)];
    let n = pieces.len() as u64;
    for _ in 2..budget {
        let mode = rng.below(4);
        let p = 1 + rng.below(3); // inclusion probability p/4
        let cut = rng.below(n + 1) as usize;
        let one = rng.below(n) as usize;
        // Per op: include it? torn?
        let mut plan: Vec<(bool, bool)> = (0..pieces.len())
            .map(|i| match mode {
                0 => (rng.chance(p, 4), rng.chance(1, 3)),
                1 => (i <= cut, i == cut),
                2 => (i == one, rng.chance(1, 2)),
                _ => (i != one, i == one),
            })
            .collect();
        if mode == 3 {
            // All but one, which may be partly there.
            plan[one] = (true, true);
        }
        let c = shape(&mut |i, _| {
            let (incl, torn) = plan[i];
            incl && (!torn || rng.chance(1, 2))
        });
        out.push(c);
    }
    out
}

fn explore(w: &Workload, cfg: &Config) -> Outcome {
    let rec = record(w);
    let log = &rec.log;
    let mut out = Outcome {
        log_len: log.len(),
        ..Default::default()
    };
    let mut rng = Rng(w.seed ^ cfg.seed.rotate_left(17));
    let budget = SAMPLES_PER_POINT * cfg.scale;
    let mut buf = Vec::new();
    let mut base = log.initial().to_vec();
    let mut base_end = 0;
    for k in 0..=log.len() {
        out.points += 1;
        let flight = log.in_flight(k);
        if flight.start > base_end {
            log.replay(&mut base, base_end..flight.start);
            base_end = flight.start;
        }
        let exp = rec.expected(k);
        let pieces: Vec<usize> = log.ops()[flight.clone()]
            .iter()
            .map(RecordedOp::pieces)
            .collect();
        let mut seen = HashSet::new();
        for choice in choices(&pieces, budget, &mut rng) {
            let mut bytes = base.clone();
            log.apply_in_flight(&mut bytes, k, |i, p| choice[i - flight.start][p]);
            let h = hash(&bytes);
            if !seen.insert(h) {
                continue;
            }
            out.images.insert(h);
            out.states += 1;
            let needs_check = bytes.get(0x10).is_some_and(|f| f & 2 != 0);
            let result = if needs_check && rng.chance(1, RECOVERY_ONE_IN) {
                out.recoveries += 1;
                verify_with_recovery_crashes(
                    &rec,
                    &exp,
                    bytes,
                    &mut rng,
                    &mut buf,
                    &mut out.recovery_states,
                )
            } else {
                verify(
                    &rec,
                    &exp,
                    Box::new(MemoryStorage::from_bytes(bytes)),
                    &mut buf,
                    &mut || {},
                )
            };
            if let Err(why) = result {
                out.violations.push(format!(
                    "{}: crash point {k} of {} ({}); last flush {:?}; in flight {:?}; \
                     applied: [{}]: {why}",
                    w.name,
                    log.len(),
                    rec.running(k),
                    log.last_flush(k),
                    flight,
                    applied(log, flight.clone(), &choice)
                ));
                if out.violations.len() >= MAX_VIOLATIONS {
                    return out;
                }
            }
        }
    }
    out
}

/// A scripted tour of every allocation path, with or without a backing file.
fn tour(backing: bool) -> Workload {
    use Step::*;
    let l2 = L2_REACH;
    let k = 1024;
    let steps = vec![
        // First allocation: NEED_CHECK (without backing), a new L2 table.
        Write { off: 0, len: 4096 },
        // Partial cluster: head and tail from the backing file.
        Write {
            off: 8192 + 512,
            len: 1024,
        },
        // Across the L2 table boundary: an existing table, then a new one.
        Write {
            off: l2 - 4096,
            len: 12288,
        },
        Flush,
        // Reads filling clusters (copy-on-read, over the backing file): a whole cluster,
        // a part of one beside data, and a run across the table boundary.
        Read {
            off: 16 * k,
            len: 4096,
        },
        Read {
            off: 8192 + 2048,
            len: 6144,
        },
        Read {
            off: l2 - 12288,
            len: 20480,
        },
        // Racing allocations: two writers in one unallocated cluster, neighbours sharing
        // an L2 sector, and a write in place beside them.
        Parallel {
            writes: vec![
                (40 * k, 512),
                (40 * k + 1024, 1024),
                (48 * k, 4096),
                (52 * k + 512, 1024),
                (l2 + 8192, 512),
            ],
        },
        // In place.
        Write {
            off: 1024,
            len: 2048,
        },
        // Zero clusters over the backing file (nothing to do without one).
        Zeroes {
            off: 64 * k,
            len: 8192,
        },
        // A partial write into a zero cluster.
        Write {
            off: 64 * k + 1024,
            len: 512,
        },
        // Zeroing a data cluster, whole and in part.
        Zeroes { off: 0, len: 4096 },
        Zeroes {
            off: 8192 + 1024,
            len: 1024,
        },
        Discard {
            off: l2 - 8192,
            len: 16384,
        },
        // Many allocations in one flush window.
        Write {
            off: 128 * k,
            len: 3 * 4096,
        },
        Write {
            off: 300 * k + 512,
            len: 7 * 512,
        },
        Write {
            off: l2 + 64 * k,
            len: 8192,
        },
        Write {
            off: SIZE0 - 4096,
            len: 4096,
        },
        Write {
            off: 128 * k + 4096,
            len: 512,
        },
        Write {
            off: l2 - 512 * k,
            len: 4096,
        },
        Zeroes {
            off: 256 * k,
            len: 16384,
        },
        Write {
            off: 256 * k + 4096,
            len: 4096,
        },
        Resize {
            size: SIZE0 + 512 * k,
        },
        Write {
            off: SIZE0 + 100 * k,
            len: 4096,
        },
        Flush,
        // Shrink into a data cluster, dropping the second table; leaks are reclaimed.
        Resize {
            size: l2 - 512 * k + 1536,
        },
        // Allocations over reclaimed file space.
        Write {
            off: 5 * 4096,
            len: 4096,
        },
        Write {
            off: l2 - 512 * k - 4096,
            len: 4096 + 1536,
        },
        // Grow back: the dropped range must not show its old contents.
        Resize { size: SIZE0 },
        // Racing to create the second table again.
        Parallel {
            writes: vec![
                (l2 + 4096, 4096),
                (l2 + 3 * 4096, 1024),
                (l2 + 100 * k, 512),
            ],
        },
        Zeroes {
            off: l2 + 64 * k,
            len: 8192,
        },
        // Shrink into the second table without a flush before it.
        Resize { size: l2 + 8192 },
        Write {
            off: l2 + 4096 + 512,
            len: 512,
        },
        Write {
            off: 700 * k,
            len: 2 * 4096,
        },
        Read {
            off: 600 * k,
            len: 64 * k,
        },
    ];
    let mut steps = steps;
    if backing {
        // Everything else in, then no backing file.
        steps.push(Stream);
    }
    steps.push(Close);
    Workload {
        name: format!(
            "tour ({})",
            if backing { "raw backing" } else { "no backing" }
        ),
        backing,
        table: 1,
        garbage: 0,
        setup: Vec::new(),
        steps,
        seed: if backing { 1 } else { 2 },
    }
}

/// Leak reclamation that moves an L2 table: table 0 is created last, so that after a
/// shrink drops table 1 and its clusters, table 0 and a data cluster sit at the end of
/// the file above the holes and are moved down into them.
fn reclaim(backing: bool) -> Workload {
    use Step::*;
    let l2 = L2_REACH;
    Workload {
        name: format!(
            "reclaim ({})",
            if backing { "raw backing" } else { "no backing" }
        ),
        backing,
        table: 1,
        garbage: 0,
        setup: Vec::new(),
        steps: vec![
            Write {
                off: l2 + 4096,
                len: 8192,
            },
            Write {
                off: l2 + 65536,
                len: 4096,
            },
            Write { off: 0, len: 4096 },
            Write {
                off: 3 * 4096,
                len: 4096,
            },
            Write { off: 512, len: 512 },
            // Durable before the shrink: losing any of it is a violation.
            Flush,
            Resize { size: l2 - 4096 },
            Write {
                off: 5 * 4096 + 512,
                len: 1024,
            },
            Resize { size: SIZE0 },
            Write {
                off: l2 + 4096,
                len: 512,
            },
            Close,
        ],
        seed: if backing { 4 } else { 5 },
    }
}

/// Discards that free clusters, allocations that reuse them once the drop is durable, a
/// write that takes back the cluster its own discard freed, then a compaction and a
/// defragmentation of a file whose data lies out of guest order, with writes between.
fn reorganize(backing: bool) -> Workload {
    use Step::*;
    let l2 = L2_REACH;
    let k = 1024;
    Workload {
        name: format!(
            "reorganize ({})",
            if backing { "raw backing" } else { "no backing" }
        ),
        backing,
        table: 1,
        garbage: 0,
        // Clusters in reverse guest order, in two tables.
        setup: (0..12)
            .rev()
            .map(|i| (i * 16 * k, 4096))
            .chain([(l2 + 8 * k, 8192), (l2 - 4096, 4096)])
            .collect(),
        steps: vec![
            // Freed: whole clusters, a run, and one only in part (punched, kept).
            Discard {
                off: 16 * k,
                len: 4096,
            },
            Discard {
                off: 64 * k,
                len: 3 * 16 * k,
            },
            Discard {
                off: 32 * k + 512,
                len: 1024,
            },
            // The cluster its discard freed, taken back before any flush.
            Write {
                off: 64 * k + 512,
                len: 1024,
            },
            Flush,
            Flush,
            // New clusters from the free set.
            Write {
                off: 200 * k,
                len: 8192,
            },
            Write {
                off: l2 + 64 * k,
                len: 4096,
            },
            Discard {
                off: l2 + 8 * k,
                len: 4096,
            },
            Reorganize(Reorganization::Compact),
            Write {
                off: 16 * k + 1024,
                len: 512,
            },
            Discard {
                off: 160 * k,
                len: 4096,
            },
            Flush,
            Reorganize(Reorganization::Defrag),
            Write {
                off: 176 * k,
                len: 4096,
            },
            Reorganize(Reorganization::Compact),
            Close,
        ],
        seed: if backing { 6 } else { 7 },
    }
}

/// Starts from a file with a partial cluster of garbage at its end.
fn trailing_garbage() -> Workload {
    use Step::*;
    Workload {
        name: "trailing garbage".into(),
        backing: false,
        table: 1,
        garbage: 1000,
        // An L2 table already exists: the next allocations update it without a flush.
        setup: vec![(0, 4096), (L2_REACH + 4096, 4096)],
        steps: vec![
            Write {
                off: 4096 + 512,
                len: 512,
            },
            Write { off: 0, len: 512 },
            Flush,
            Write {
                off: 3 * 4096,
                len: 1024,
            },
            Close,
        ],
        seed: 3,
    }
}

/// A random workload: `n` steps, offsets biased to cluster, table and disk ends.
fn random(backing: bool, table: u32, n: usize, seed: u64) -> Workload {
    let mut rng = Rng(seed);
    let mut size = size0(table);
    let mut steps = Vec::new();
    let range = |rng: &mut Rng, size: u64| -> (u64, u64) {
        let sectors = size / SECTOR;
        let spot = match rng.below(4) {
            0 => rng.below(sectors),
            1 => (rng.below(size / CS) * CS) / SECTOR + rng.below(3),
            2 => (reach(table) / SECTOR)
                .saturating_sub(rng.below(16))
                .min(sectors - 1),
            _ => sectors - 1 - rng.below(16).min(sectors - 1),
        };
        let len = match rng.below(3) {
            0 => 1 + rng.below(4),
            1 => 8 * (1 + rng.below(3)),
            _ => 1 + rng.below(40),
        };
        let len = len.min(sectors - spot);
        (spot * SECTOR, len * SECTOR)
    };
    for _ in 0..n {
        let step = match rng.below(17) {
            0..=6 => {
                let (off, len) = range(&mut rng, size);
                Step::Write { off, len }
            }
            7 | 8 => {
                let (off, len) = range(&mut rng, size);
                Step::Zeroes { off, len }
            }
            9 | 10 => {
                let (off, len) = range(&mut rng, size);
                Step::Discard { off, len }
            }
            11 => Step::Flush,
            12 => {
                // Disjoint sectors, often in the same clusters, L2 sectors or tables.
                let mut writes: Vec<(u64, u64)> = Vec::new();
                for _ in 0..2 + rng.below(3) {
                    let (off, len) = range(&mut rng, size);
                    if writes.iter().all(|&(o, l)| off + len <= o || o + l <= off) {
                        writes.push((off, len));
                    }
                }
                Step::Parallel { writes }
            }
            13 => Step::Flush,
            14 if rng.below(3) == 0 => Step::Reorganize(Reorganization::Compact),
            14 if rng.below(2) == 0 => Step::Reorganize(Reorganization::Defrag),
            15 | 16 => {
                let (off, len) = range(&mut rng, size);
                Step::Read { off, len }
            }
            _ => {
                // From half a table's reach to well into the second table.
                let new = (reach(table) / 2 + rng.below(reach(table) * 5 / 4)) / SECTOR * SECTOR;
                size = new;
                Step::Resize { size: new }
            }
        };
        steps.push(step);
    }
    if backing && rng.below(2) == 0 {
        steps.push(Step::Stream);
    }
    steps.push(Step::Close);
    Workload {
        name: format!(
            "random ({}, table_size {table}, seed {seed:#x})",
            if backing { "raw backing" } else { "no backing" }
        ),
        backing,
        table,
        garbage: 0,
        setup: Vec::new(),
        steps,
        seed,
    }
}

#[test]
fn every_crash_state_is_consistent() {
    let cfg = config();
    let mut workloads = vec![
        tour(false),
        tour(true),
        reclaim(false),
        reclaim(true),
        reorganize(false),
        reorganize(true),
        trailing_garbage(),
    ];
    for i in 0..cfg.scale {
        let seed = cfg.seed.wrapping_add(i.wrapping_mul(0x1000_0001));
        for (j, backing) in [false, true, false, true, false, true]
            .into_iter()
            .enumerate()
        {
            workloads.push(random(backing, 1, 20, seed ^ ((j as u64) << 40)));
        }
        // Two-cluster tables: reclaiming leaks must find a run of free clusters to move
        // a table into.
        workloads.push(random(false, 2, 20, seed ^ (0x2 << 48)));
        workloads.push(random(true, 2, 20, seed ^ (0x3 << 48)));
    }
    for job in [Reorganization::Compact, Reorganization::Defrag] {
        for backing in [false, true] {
            assert!(
                workloads.iter().any(|w| w.backing == backing
                    && w.steps
                        .iter()
                        .any(|s| matches!(s, Step::Reorganize(j) if *j == job))),
                "no workload {} a backing file runs a {}",
                if backing { "over" } else { "without" },
                job.name()
            );
        }
    }
    let outcomes: Vec<(String, Outcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = workloads
            .iter()
            .map(|w| s.spawn(|| (w.name.clone(), explore(w, &cfg))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut states = 0;
    let mut recovery_states = 0;
    let mut images = 0;
    let mut violations = Vec::new();
    for (name, o) in &outcomes {
        eprintln!(
            "crash: {name}: {} log ops, {} crash points, {} states ({} distinct images); \
             {} repairs at open crash-tested, leaving {} more states; {} violations",
            o.log_len,
            o.points,
            o.states,
            o.images.len(),
            o.recoveries,
            o.recovery_states,
            o.violations.len()
        );
        states += o.states;
        recovery_states += o.recovery_states;
        images += o.images.len();
        violations.extend(o.violations.iter().cloned());
    }
    let total = states + recovery_states;
    eprintln!(
        "crash: {total} crash states explored: {states} after guest operations ({images} \
         distinct images) and {recovery_states} during repairs at open; {} workloads \
         (QED_CRASH_SCALE={}, QED_CRASH_SEED={:#x}); {} violations",
        outcomes.len(),
        cfg.scale,
        cfg.seed,
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} crash-state violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(
        states >= MIN_STATES,
        "only {states} crash states explored after guest operations"
    );
}
