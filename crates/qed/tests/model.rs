//! Model-based tests: random sequences of operations run against an image and against a
//! plain byte vector, and every read must agree with the vector.
//!
//! Each geometry gets its own test so that a failure names the geometry and the tests
//! run in parallel. Sizes are small but chosen so that operations cross cluster, L2 page
//! and (for small tables) L2 table boundaries.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use qed::{BlockDevice, CreateOptions, Format, Image, Mapping, OpenOptions, Reorganization};
use std::path::Path;

/// Entries in one cached page of an L2 table; runs of the mapping break there.
const PAGE_ENTRIES: u64 = 512;
/// How far a file image grows ahead of the clusters in it (8 MiB): what a crash can
/// leave past the last one.
const GROW_STEP: u64 = 8 << 20;

/// Cases per geometry. `with_cases` would override the environment, so the variable
/// proptest normally honours is read here.
fn config() -> ProptestConfig {
    let cases = qed_testkit::settings::env_u64("PROPTEST_CASES").map_or(32, |n| {
        u32::try_from(n).unwrap_or_else(|_| panic!("PROPTEST_CASES={n}: too many"))
    });
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

#[derive(Debug, Clone, Copy)]
struct Geo {
    cluster: u32,
    table: u32,
    size: u64,
    /// L2 cache bound for opening the image under test; `None` is the default.
    l2_cache: Option<usize>,
}

impl Geo {
    fn cs(self) -> u64 {
        self.cluster.into()
    }

    fn l2_coverage(self) -> u64 {
        self.cs() * (self.cs() * u64::from(self.table) / 8)
    }

    fn page_reach(self) -> u64 {
        self.cs() * PAGE_ENTRIES
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    /// Move clusters into free space and cut the file (`qed::compact`), or lay the file
    /// out in guest order (`qed::defrag`).
    Reorganize(Reorganization),
    /// Close and open again, first appending `garbage` bytes: a partial trailing cluster
    /// is unreferenced, and the next allocation must overwrite it.
    Reopen {
        garbage: u64,
    },
    /// Flush, then open a copy of the file taken while the image was open, as a process
    /// killed right after a flush leaves it: everything must be there. Table entries are
    /// written back at flushes, so without the flush the latest writes could be missing
    /// (crash.rs covers that: each sector old or new).
    Crash,
}

/// What the image under test sits on.
#[derive(Debug, Clone)]
enum Backing {
    None,
    /// A raw file of `len` bytes of pattern; `len` may be below the image size, unaligned.
    Raw {
        len: u64,
        seed: u64,
    },
    /// A QED image written through the library, optionally itself over a raw file.
    Qed {
        cluster: u32,
        table: u32,
        size: u64,
        under: Option<(u64, u64)>,
        ops: Vec<Op>,
    },
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = vec![0u8; len.next_multiple_of(8) as usize];
    for word in out.chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// A position in `[0, size]`, biased towards the boundaries where bugs live: clusters,
/// L2 pages, L2 tables and the end of the disk.
fn position(geo: Geo) -> BoxedStrategy<u64> {
    let size = geo.size;
    let cs = geo.cs() as i64;
    let near = move |unit: u64, span: i64| {
        (0..=size / unit, -span..=span)
            .prop_map(move |(k, d)| (k as i64 * unit as i64 + d).clamp(0, size as i64) as u64)
    };
    prop_oneof![
        3 => 0..=size,
        4 => near(geo.cs(), 600),
        2 => near(geo.page_reach(), 3 * cs),
        2 => near(geo.l2_coverage(), 3 * cs),
        1 => (0..3 * geo.cs()).prop_map(move |d| size.saturating_sub(d)),
    ]
    .boxed()
}

/// A length, mostly around a cluster, sometimes large enough to span L2 tables.
fn length(geo: Geo) -> BoxedStrategy<u64> {
    let cs = geo.cs();
    let big = geo.size.min(3 << 20);
    prop_oneof![
        3 => 0..=600u64,
        4 => 0..=3 * cs,
        2 => (1..=4u64, -600i64..=600).prop_map(move |(k, d)| (k * cs).saturating_add_signed(d)),
        1 => 0..=big,
    ]
    .boxed()
}

/// A guest range inside the disk.
fn range(geo: Geo) -> BoxedStrategy<(u64, u64)> {
    let size = geo.size;
    let cs = geo.cs();
    let clusters = size.div_ceil(cs);
    prop_oneof![
        4 => (position(geo), length(geo)).prop_map(move |(off, len)| (off, len.min(size - off))),
        // Whole clusters, where write_zeroes and discard take their cluster paths.
        1 => (0..clusters, 1..=8u64).prop_map(move |(k, n)| {
            let off = k * cs;
            (off, (n * cs).min(size - off))
        }),
    ]
    .boxed()
}

fn op(geo: Geo) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(geo), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        3 => range(geo).prop_map(|(off, len)| Op::WriteZeroes { off, len }),
        3 => range(geo).prop_map(|(off, len)| Op::Discard { off, len }),
        4 => range(geo).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reorganize(Reorganization::Compact)),
        1 => Just(Op::Reorganize(Reorganization::Defrag)),
        1 => prop_oneof![
            3 => Just(0u64),
            1 => 1..geo.cs(),
        ]
        .prop_map(|garbage| Op::Reopen { garbage }),
        1 => Just(Op::Crash),
    ]
}

fn backing(geo: Geo) -> impl Strategy<Value = Backing> {
    let size = geo.size;
    let raw = (0..=size + 3 * geo.cs(), any::<u64>());
    let qed = (
        prop_oneof![Just(4096u32), Just(65536)],
        prop_oneof![Just(1u32), Just(4)],
        (size / 2..=size + 2 * geo.cs()).prop_map(|s| s.next_multiple_of(512)),
        proptest::option::of((0..=size, any::<u64>())),
        proptest::collection::vec(
            prop_oneof![
                3 => (range(geo), any::<u64>())
                    .prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
                1 => range(geo).prop_map(|(off, len)| Op::WriteZeroes { off, len }),
            ],
            0..8,
        ),
    );
    prop_oneof![
        1 => Just(Backing::None),
        1 => raw.prop_map(|(len, seed)| Backing::Raw { len, seed }),
        1 => qed.prop_map(|(cluster, table, size, under, ops)| Backing::Qed {
            cluster,
            table,
            size,
            under,
            ops,
        }),
    ]
}

fn case(geo: Geo) -> impl Strategy<Value = (Backing, Vec<Op>)> {
    (backing(geo), proptest::collection::vec(op(geo), 1..40))
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, TestCaseError>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, TestCaseError> {
        self.map_err(|e| fail(format!("{}: {e}", what())))
    }
}

/// Reads `[off, off + len)` and compares it with the model, naming the first byte that
/// differs and how the image maps it.
fn compare(img: &Image, model: &[u8], off: u64, len: u64, what: &str) -> Result<(), TestCaseError> {
    // Large enough that a generated read is one call, crossing the L2 tables it spans.
    const CHUNK: u64 = 8 << 20;
    let mut buf = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let pos = off + done;
        let buf = &mut buf[..n as usize];
        img.read_at(buf, pos)
            .ctx(|| format!("{what}: reading {n} bytes at {pos:#x}"))?;
        let want = &model[pos as usize..(pos + n) as usize];
        if buf != want {
            let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            let at = pos + i as u64;
            let bad = buf[i..]
                .iter()
                .zip(&want[i..])
                .filter(|(a, b)| a != b)
                .count();
            return Err(fail(format!(
                "{what}: byte {at:#x} reads {:#04x}, expected {:#04x} ({bad} bytes differ \
                 in this chunk from there; mapping {:?})",
                buf[i],
                want[i],
                img.lookup(at, 1)
            )));
        }
        done += n;
    }
    Ok(())
}

/// Checks the image: no corruption, and no leaks but the clusters it freed and holds
/// for reuse, plus `carried` more (leaks a close left, which it finds again). Returns how
/// many more there were.
fn assert_clean(
    img: &Image,
    what: &str,
    carried: std::ops::RangeInclusive<u64>,
) -> Result<u64, TestCaseError> {
    let r = img.check().ctx(|| format!("{what}: check"))?;
    let extra = r.leaks.checked_sub(r.freed);
    prop_assert!(
        r.corruptions == 0 && r.check_errors == 0 && extra.is_some_and(|e| carried.contains(&e)),
        "{}: check is not clean (leaks beyond those freed: {:?}): {:?}",
        what,
        carried,
        r
    );
    Ok(extra.unwrap_or(0))
}

fn open_options(geo: Option<Geo>) -> OpenOptions {
    let mut opts = OpenOptions::default();
    if let Some(bytes) = geo.and_then(|g| g.l2_cache) {
        opts.l2_cache_bytes = bytes;
    }
    opts
}

fn open(path: &Path, geo: Option<Geo>, what: &str) -> Result<Image, TestCaseError> {
    let img = Image::open(path, &open_options(geo)).ctx(|| format!("{what}: open"))?;
    // Close clears NEED_CHECK, so a reopen must not have had to repair anything.
    prop_assert!(
        img.open_repair().is_none() && !img.header().needs_check(),
        "{}: image was left marked as needing a check",
        what
    );
    Ok(img)
}

/// Opens an image whose last session was flushed but not closed. The metadata is
/// consistent: a check (or the repair at open) finds no corruption. Space the file had
/// grown ahead of its last cluster is leaked, and nothing else: reclaiming the leaks
/// leaves a file that ends at the image's last cluster.
fn open_after_crash(
    path: &Path,
    geo: Geo,
    freed: u64,
    what: &str,
) -> Result<(Image, u64), TestCaseError> {
    let mut img = Image::open(path, &open_options(Some(geo))).ctx(|| format!("{what}: open"))?;
    if let Some(r) = img.open_repair() {
        prop_assert!(
            r.corruptions == 0 && r.check_errors == 0,
            "{}: repair at open found problems: {:?}",
            what,
            r
        );
    }
    prop_assert!(
        !img.header().needs_check(),
        "{}: NEED_CHECK survived the repair at open",
        what
    );
    let before = img.file_len().ctx(|| format!("{what}: length"))?;
    let r = img
        .repair(qed::RepairMode::Leaks)
        .ctx(|| format!("{what}: reclaiming leaks"))?;
    prop_assert!(
        r.corruptions == 0 && r.check_errors == 0 && r.leaks == r.leaks_fixed,
        "{}: after a crash: {:?}",
        what,
        r
    );
    let after = img.file_len().ctx(|| format!("{what}: length"))?;
    prop_assert!(
        before - after <= GROW_STEP + geo.cs() + freed,
        "{}: {} bytes leaked, more than the file grows ahead and the image freed",
        what,
        before - after
    );
    // Holes too small for the table after them are punched, and stay leaks.
    Ok((img, r.leaks_punched))
}

/// What the image must read as, and the clusters known to be data clusters.
struct Model {
    bytes: Vec<u8>,
    cluster_size: u64,
    /// Clusters a write has touched since they were last discarded or zeroed whole. A
    /// write always leaves data clusters behind, and only a discard, or a compaction of
    /// a cluster zeroed whole, turns a data cluster back into anything else, so the
    /// image must report these as data; which other clusters are data is up to it.
    written: Vec<bool>,
}

impl Model {
    fn new(bytes: Vec<u8>, cluster_size: u64) -> Self {
        let clusters = (bytes.len() as u64).div_ceil(cluster_size) as usize;
        Self {
            bytes,
            cluster_size,
            written: vec![false; clusters],
        }
    }

    fn range(&mut self, off: u64, len: u64) -> &mut [u8] {
        &mut self.bytes[off as usize..(off + len) as usize]
    }
}

/// Applies one operation to the image and to the model.
/// `carried`: the leaks the image had when opened, which only a compaction takes away.
fn apply(
    img: &Image,
    model: &mut Model,
    op: &Op,
    what: &str,
    carried: &mut u64,
) -> Result<(), TestCaseError> {
    let cs = model.cluster_size;
    match *op {
        Op::Write { off, len, seed } => {
            let data = pattern(seed, len);
            img.write_at(&data, off).ctx(|| what.to_string())?;
            model.range(off, len).copy_from_slice(&data);
            if len > 0 {
                for c in off / cs..=(off + len - 1) / cs {
                    model.written[c as usize] = true;
                }
            }
        }
        Op::WriteZeroes { off, len } => {
            img.write_zeroes(off, len).ctx(|| what.to_string())?;
            model.range(off, len).fill(0);
            // A whole data cluster zeroed is punched: a compaction may free it.
            let mut c = off.next_multiple_of(cs);
            while c + cs <= off + len {
                model.written[(c / cs) as usize] = false;
                c += cs;
            }
        }
        Op::Discard { off, len } => {
            // Every cluster wholly inside the range reads as zeros afterwards, whatever it
            // was: data, a zero cluster, or unallocated over backing data. The model knows
            // which clusters a write left as data; the image may know more, never fewer.
            let mut whole = Vec::new();
            let mut c = off.next_multiple_of(cs);
            while c + cs <= off + len {
                let (m, _) = img.lookup(c, cs).ctx(|| format!("{what}: lookup {c:#x}"))?;
                let data = matches!(m, Mapping::Data(_));
                prop_assert!(
                    data || !model.written[(c / cs) as usize],
                    "{}: cluster at {:#x} was written but maps as {:?}",
                    what,
                    c,
                    m
                );
                whole.push(c);
                c += cs;
            }
            img.discard(off, len).ctx(|| what.to_string())?;
            for c in whole {
                model.range(c, cs).fill(0);
                // Freed, or never data: the cluster is not data now.
                model.written[(c / cs) as usize] = false;
            }
        }
        Op::Read { off, len } => compare(img, &model.bytes, off, len, what)?,
        Op::Flush => {
            img.flush().ctx(|| what.to_string())?;
            assert_clean(img, what, *carried..=*carried)?;
        }
        Op::Reorganize(job) => {
            let end = job
                .run(img, &Default::default(), &mut qed::no_progress)
                .ctx(|| what.to_string())?;
            prop_assert!(
                matches!(end, qed::ReorganizeEnd::Done { .. }),
                "{}: {:?}",
                what,
                end
            );
            // The job filled or gave back every leak it found.
            *carried = 0;
            assert_clean(img, what, 0..=0)?;
            compare(img, &model.bytes, 0, model.bytes.len() as u64, what)?;
        }
        Op::Reopen { .. } | Op::Crash => unreachable!("handled by the caller"),
    }
    Ok(())
}

/// Creates the backing file(s) in `dir`, names them in `opts` and returns the guest
/// content they give the image `opts` describes.
fn make_backing(
    dir: &Path,
    spec: &Backing,
    opts: &mut CreateOptions,
) -> Result<Vec<u8>, TestCaseError> {
    let mut content = vec![0u8; opts.size as usize];
    let overlay = |content: &mut [u8], data: &[u8]| {
        let n = data.len().min(content.len());
        content[..n].copy_from_slice(&data[..n]);
    };
    match spec {
        Backing::None => Ok(content),
        Backing::Raw { len, seed } => {
            let data = pattern(*seed, *len);
            std::fs::write(dir.join("base.raw"), &data).ctx(|| "writing base.raw".into())?;
            overlay(&mut content, &data);
            opts.backing_file = Some("base.raw".into());
            opts.backing_format = Some(Format::Raw);
            Ok(content)
        }
        Backing::Qed {
            cluster,
            table,
            size: bsize,
            under,
            ops,
        } => {
            let mut bmodel = Model::new(vec![0u8; *bsize as usize], (*cluster).into());
            let mut base_opts = CreateOptions {
                cluster_size: *cluster,
                table_size: *table,
                ..CreateOptions::new(*bsize)
            };
            if let Some((len, seed)) = under {
                let data = pattern(*seed, *len);
                std::fs::write(dir.join("under.raw"), &data).ctx(|| "writing under.raw".into())?;
                overlay(&mut bmodel.bytes, &data);
                base_opts.backing_file = Some("under.raw".into());
                base_opts.backing_format = Some(Format::Raw);
            }
            let path = dir.join("base.qed");
            Image::create(&path, &base_opts).ctx(|| "creating base.qed".into())?;
            let img = open(&path, None, "base.qed")?;
            for (i, op) in ops.iter().enumerate() {
                let what = format!("base.qed op {i} {op:?}");
                // The ops were drawn for the top image's size; keep them inside this one.
                let op = match *op {
                    Op::Write { off, len, seed } if off < *bsize => Op::Write {
                        off,
                        len: len.min(bsize - off),
                        seed,
                    },
                    Op::WriteZeroes { off, len } if off < *bsize => Op::WriteZeroes {
                        off,
                        len: len.min(bsize - off),
                    },
                    _ => continue,
                };
                apply(&img, &mut bmodel, &op, &what, &mut 0)?;
            }
            img.close().ctx(|| "closing base.qed".into())?;
            let img = open(&path, None, "base.qed reopened")?;
            assert_clean(&img, "base.qed", 0..=0)?;
            compare(&img, &bmodel.bytes, 0, *bsize, "base.qed contents")?;
            drop(img);
            overlay(&mut content, &bmodel.bytes);
            // The header cannot record this (only raw has a flag): opening it probes.
            opts.backing_file = Some("base.qed".into());
            opts.backing_format = Some(Format::Qed);
            Ok(content)
        }
    }
}

/// Appends up to `garbage` pattern bytes without completing the file's last cluster: a
/// whole unreferenced cluster would be a leak, which is not what this simulates.
fn append_garbage(path: &Path, cs: u64, garbage: u64) -> std::io::Result<()> {
    use std::io::Write;
    let len = std::fs::metadata(path)?.len();
    let n = garbage.min(cs - 1 - len % cs);
    if n > 0 {
        let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
        f.write_all(&pattern(garbage ^ len, n))?;
    }
    Ok(())
}

fn run_case(geo: Geo, spec: &Backing, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().ctx(|| "tempdir".into())?;
    let mut opts = CreateOptions {
        cluster_size: geo.cluster,
        table_size: geo.table,
        ..CreateOptions::new(geo.size)
    };
    let content = make_backing(dir.path(), spec, &mut opts)?;
    let mut model = Model::new(content, geo.cs());
    let path = dir.path().join("top.qed");
    Image::create(&path, &opts).ctx(|| "create".into())?;
    let mut img = open(&path, Some(geo), "first open")?;
    prop_assert_eq!(img.size(), geo.size);
    if geo.l2_cache.is_some() {
        // Random ops alone rarely touch more L2 tables than the cache holds; give every
        // table an entry so that whole-image reads cycle through all of them.
        let cov = geo.l2_coverage();
        for k in 0..geo.size.div_ceil(cov) {
            let off = k * cov + k * 7919 % cov.min(geo.size - k * cov);
            let len = 64.min(geo.size - off);
            let op = Op::Write { off, len, seed: k };
            apply(&img, &mut model, &op, &format!("prelude {op:?}"), &mut 0)?;
        }
    }
    // Leaks a close left (freed clusters it did not cut off the end), found again after
    // each reopen; only a compaction or a repair takes them away.
    let mut carried = 0;
    for (i, op) in ops.iter().enumerate() {
        let what = format!("op {i} {op:?}");
        let allowed = match *op {
            Op::Reopen { garbage } => {
                let left = carried + img.freed_bytes() / geo.cs();
                img.close().ctx(|| format!("{what}: close"))?;
                append_garbage(&path, geo.cs(), garbage).ctx(|| format!("{what}: garbage"))?;
                img = open(&path, Some(geo), &what)?;
                0..=left
            }
            Op::Crash => {
                img.flush().ctx(|| format!("{what}: flush"))?;
                let freed = carried * geo.cs() + img.freed_bytes();
                let copy = dir.path().join("crashed.qed");
                std::fs::copy(&path, &copy).ctx(|| format!("{what}: copy"))?;
                img.close().ctx(|| format!("{what}: close"))?;
                std::fs::rename(&copy, &path).ctx(|| format!("{what}: rename"))?;
                let punched;
                (img, punched) = open_after_crash(&path, geo, freed, &what)?;
                punched..=punched
            }
            _ => {
                apply(&img, &mut model, op, &what, &mut carried)?;
                continue;
            }
        };
        carried = assert_clean(&img, &what, allowed)?;
        compare(&img, &model.bytes, 0, geo.size, &what)?;
    }
    compare(&img, &model.bytes, 0, geo.size, "final contents")?;
    let left = carried + img.freed_bytes() / geo.cs();
    img.close().ctx(|| "final close".into())?;
    let img = open(&path, Some(geo), "final reopen")?;
    assert_clean(&img, "final reopen", 0..=left)?;
    compare(
        &img,
        &model.bytes,
        0,
        geo.size,
        "final contents after reopen",
    )?;
    Ok(())
}

const MIB: u64 = 1 << 20;

/// 4 KiB clusters, one-cluster tables: an L2 table maps 2 MiB, so 6 MiB needs three.
const G_4K_T1: Geo = Geo {
    cluster: 4096,
    table: 1,
    size: 6 * MIB,
    l2_cache: None,
};
/// Two pages per L2 table (4 MiB each); the size is not a whole number of clusters.
const G_4K_T2: Geo = Geo {
    cluster: 4096,
    table: 2,
    size: 9 * MIB - 512,
    l2_cache: None,
};
/// L2 tables of 8 MiB: crosses a page boundary inside a table and one table boundary.
const G_4K_T4: Geo = Geo {
    cluster: 4096,
    table: 4,
    size: 9 * MIB,
    l2_cache: None,
};
const G_4K_T16: Geo = Geo {
    cluster: 4096,
    table: 16,
    size: 5 * MIB,
    l2_cache: None,
};
const G_64K_T1: Geo = Geo {
    cluster: 65536,
    table: 1,
    size: 5 * MIB + 1536,
    l2_cache: None,
};
const G_64K_T4: Geo = Geo {
    cluster: 65536,
    table: 4,
    size: 8 * MIB,
    l2_cache: None,
};
const G_1M_T2: Geo = Geo {
    cluster: 1 << 20,
    table: 2,
    size: 7 * MIB + 4096,
    l2_cache: None,
};
/// Many L2 tables and the smallest L2 cache (16 pages of 2 MiB reach here), so pages are
/// evicted and reloaded while the image is in use.
const G_4K_T1_EVICT: Geo = Geo {
    cluster: 4096,
    table: 1,
    size: 36 * MIB,
    l2_cache: Some(0),
};

proptest! {
    #![proptest_config(config())]

    #[test]
    fn model_4k_table1((spec, ops) in case(G_4K_T1)) {
        run_case(G_4K_T1, &spec, &ops)?;
    }

    #[test]
    fn model_4k_table2((spec, ops) in case(G_4K_T2)) {
        run_case(G_4K_T2, &spec, &ops)?;
    }

    #[test]
    fn model_4k_table4((spec, ops) in case(G_4K_T4)) {
        run_case(G_4K_T4, &spec, &ops)?;
    }

    #[test]
    fn model_4k_table16((spec, ops) in case(G_4K_T16)) {
        run_case(G_4K_T16, &spec, &ops)?;
    }

    #[test]
    fn model_64k_table1((spec, ops) in case(G_64K_T1)) {
        run_case(G_64K_T1, &spec, &ops)?;
    }

    #[test]
    fn model_64k_table4((spec, ops) in case(G_64K_T4)) {
        run_case(G_64K_T4, &spec, &ops)?;
    }

    #[test]
    fn model_4k_table1_l2_eviction((spec, ops) in case(G_4K_T1_EVICT)) {
        run_case(G_4K_T1_EVICT, &spec, &ops)?;
    }

    #[test]
    fn model_1m_table2((spec, ops) in case(G_1M_T2)) {
        run_case(G_1M_T2, &spec, &ops)?;
    }
}

/// Several threads write, zero, discard and read back interleaved stripes of one image
/// at once, while another flushes and checks. Stripes are not cluster aligned, so writers
/// race to allocate the clusters they share and the L2 tables; each thread only ever
/// touches its own bytes, and only discards clusters wholly inside its own stripe, so the
/// final content is known whatever the interleaving.
///
/// With `moving`, the other thread compacts and defragments, in turn, instead of checking:
/// clusters move under the writers and readers, which must never notice.
fn concurrent_smoke(geo: Geo, stripe: u64, backed: bool, seed: u64, moving: bool) -> u64 {
    const THREADS: u64 = 8;
    const OPS: usize = 200;
    let cs = geo.cs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("top.qed");
    let mut model = vec![0u8; geo.size as usize];
    let mut opts = CreateOptions {
        cluster_size: geo.cluster,
        table_size: geo.table,
        ..CreateOptions::new(geo.size)
    };
    if backed {
        let data = pattern(seed ^ 0xbac, geo.size - 3 * MIB + 123);
        std::fs::write(dir.path().join("base.raw"), &data).unwrap();
        model[..data.len()].copy_from_slice(&data);
        opts.backing_file = Some("base.raw".into());
        opts.backing_format = Some(Format::Raw);
    }
    Image::create(&path, &opts).unwrap();
    let img = open(&path, None, "first open").unwrap();

    let stripes = geo.size / stripe;
    let running = std::sync::atomic::AtomicU64::new(THREADS);
    let moved = std::sync::atomic::AtomicU64::new(0);
    let finals: Vec<Vec<(u64, Vec<u8>)>> = std::thread::scope(|s| {
        let img = &img;
        let running = &running;
        let moved = &moved;
        s.spawn(move || {
            use std::sync::atomic::Ordering;
            let mut round = 0u64;
            while running.load(Ordering::Acquire) > 0 {
                if !moving {
                    img.flush().unwrap();
                    assert_clean(img, "while writers run", 0..=0).unwrap();
                    continue;
                }
                let job = [Reorganization::Compact, Reorganization::Defrag][(round % 2) as usize];
                let end = job.run(img, &Default::default(), &mut qed::no_progress);
                match end {
                    Ok(qed::ReorganizeEnd::Done { moved: m, .. }) => {
                        moved.fetch_add(m, Ordering::Relaxed);
                    }
                    other => panic!("round {round}: {other:?}"),
                }
                round += 1;
            }
        });
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let model = &model;
                s.spawn(move || {
                    // Counted out however the thread ends: a writer that panics must not
                    // leave the flushing thread looping for ever.
                    struct Leaving<'a>(&'a std::sync::atomic::AtomicU64);
                    impl Drop for Leaving<'_> {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                        }
                    }
                    let _leaving = Leaving(running);
                    // This thread owns stripes t, t + THREADS, ...; keep its view of them.
                    let mut mine: Vec<(u64, Vec<u8>)> = (t..stripes)
                        .step_by(THREADS as usize)
                        .map(|k| {
                            let off = k * stripe;
                            (off, model[off as usize..(off + stripe) as usize].to_vec())
                        })
                        .collect();
                    let mut rng = seed.wrapping_mul(31).wrapping_add(t);
                    for _ in 0..OPS {
                        let idx = (splitmix(&mut rng) % mine.len() as u64) as usize;
                        let (base, bytes) = &mut mine[idx];
                        let base = *base;
                        let a = splitmix(&mut rng) % stripe;
                        let b = splitmix(&mut rng) % stripe;
                        let (lo, hi) = (a.min(b), a.max(b) + 1);
                        let (pos, len) = (base + lo, hi - lo);
                        match splitmix(&mut rng) % 6 {
                            0 => {
                                img.write_zeroes(pos, len).unwrap();
                                bytes[lo as usize..hi as usize].fill(0);
                            }
                            1 => {
                                // Every cluster wholly inside reads as zeros afterwards.
                                img.discard(pos, len).unwrap();
                                let mut c = pos.next_multiple_of(cs);
                                while c + cs <= pos + len {
                                    let at = (c - base) as usize;
                                    bytes[at..at + cs as usize].fill(0);
                                    c += cs;
                                }
                            }
                            2 | 3 => {
                                let mut buf = vec![0u8; len as usize];
                                img.read_at(&mut buf, pos).unwrap();
                                assert!(
                                    buf == bytes[lo as usize..hi as usize],
                                    "thread {t} read {len} bytes at {pos:#x} wrongly"
                                );
                            }
                            _ => {
                                let data = pattern(splitmix(&mut rng), len);
                                img.write_at(&data, pos).unwrap();
                                bytes[lo as usize..hi as usize].copy_from_slice(&data);
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (off, bytes) in finals.into_iter().flatten() {
        model[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    }

    compare(&img, &model, 0, geo.size, "after the threads").unwrap();
    assert_clean(&img, "after the threads", 0..=0).unwrap();
    let left = img.freed_bytes() / cs;
    img.close().unwrap();
    let img = open(&path, None, "reopen").unwrap();
    assert_clean(&img, "reopen", 0..=left).unwrap();
    compare(&img, &model, 0, geo.size, "after reopen").unwrap();
    moved.into_inner()
}

/// 4 KiB clusters with stripes of a little over two clusters: every stripe holds a whole
/// cluster to discard or zero, and the image spans four L2 tables.
const CONCURRENT_4K: (Geo, u64) = (
    Geo {
        size: 8 * MIB,
        ..G_4K_T1
    },
    9000,
);
/// 64 KiB clusters with stripes much smaller than a cluster: most allocations race with
/// those of several other threads for the same cluster.
const CONCURRENT_64K: (Geo, u64) = (G_64K_T4, 20000);

#[test]
fn concurrent_writers_without_backing() {
    for seed in 0..4 {
        for (geo, stripe) in [CONCURRENT_4K, CONCURRENT_64K] {
            concurrent_smoke(geo, stripe, false, seed, false);
        }
    }
}

#[test]
fn concurrent_writers_over_raw_backing() {
    for seed in 0..4 {
        for (geo, stripe) in [CONCURRENT_4K, CONCURRENT_64K] {
            concurrent_smoke(geo, stripe, true, seed, false);
        }
    }
}

#[test]
fn concurrent_writers_while_clusters_move() {
    let mut moved = 0;
    for seed in 0..4 {
        for (geo, stripe) in [CONCURRENT_4K, CONCURRENT_64K] {
            moved += concurrent_smoke(geo, stripe, seed % 2 == 1, seed, true);
        }
    }
    // Otherwise the jobs only ever found nothing to do, and nothing was tested.
    assert!(moved > 0, "no cluster moved while the writers ran");
}
