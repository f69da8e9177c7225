//! `qed convert --in-place`: qcow2 to QED, QED to qcow2 and raw to QED in the same file,
//! on images QEMU's own tools made, judged by QEMU's own tools.
//!
//! Every conversion is held against an untouched copy of the image it started from:
//! `qemu-img compare` must find the guest contents identical, `qemu-img check` (and `qed
//! check` for QED) must find no corruption and no leak, `qemu-img info` must show the
//! virtual size, the cluster size, the backing file and its format carried over, and
//! `qemu-img map` must show the same structure: what was unallocated still reads
//! through to the backing file, what was a zero cluster is still one, what held data
//! still does. QEMU must then be able to allocate in the result without corrupting it.
//! Before each conversion a dry run must leave the file byte for byte as it was and
//! report what the conversion does; afterwards the file may not have grown past what
//! the dry run said it might.
//!
//! Images the conversion cannot carry (internal snapshots, encryption, an external data
//! file, extended L2 entries, persistent bitmaps, clusters under 4 KiB, a dirty or
//! corrupt image, a conversion to the format it already has) must be refused with
//! status 1, a message naming the feature and the way out, and no byte changed.

mod common;

use common::dir::{count, Dir, K, M};
use common::qemu::phantom_leaks;
use common::{QED, QEMU_IMG, QEMU_IO};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

// ---------------------------------------------------------------------------------------
// What an image is, as QEMU sees it.

/// What a guest range of an image is, in the image itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Nothing in the image: reads through to the backing file, or as zeros without one.
    Unallocated,
    /// A zero cluster: reads as zeros, hides the backing file.
    Zero,
    /// Data the image holds (compressed or not).
    Data,
}

/// The image's own structure, from `qemu-img map`: runs of `(start, length, kind)`,
/// adjacent runs of one kind joined, so that where the data lies in the file does not
/// count.
fn structure(d: &Dir, file: &str) -> Vec<(u64, u64, Kind)> {
    let mut runs: Vec<(u64, u64, Kind)> = Vec::new();
    for r in d.map(file) {
        let kind = if r["depth"] != 0 || r["present"] == false {
            Kind::Unallocated
        } else if r["data"] == true {
            Kind::Data
        } else {
            assert_eq!(
                r["zero"], true,
                "{file}: a present run neither data nor zero: {r}"
            );
            Kind::Zero
        };
        let (start, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        match runs.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == start => last.1 += len,
            _ => runs.push((start, len, kind)),
        }
    }
    runs
}

/// Where each guest cluster the image itself holds data for lies in the file, by
/// `qemu-img map`: guest offset to file offset (compressed clusters have none).
fn placement(d: &Dir, file: &str, cluster: u64) -> BTreeMap<u64, u64> {
    let mut at = BTreeMap::new();
    for r in d.map(file) {
        if r["depth"] != 0 || r["data"] != true {
            continue;
        }
        let Some(offset) = r["offset"].as_u64() else {
            continue;
        };
        let (start, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        let mut g = start / cluster * cluster;
        while g < start + len {
            at.insert(g, offset + g - start);
            g += cluster;
        }
    }
    at
}

/// Bytes of compressed clusters the image itself holds, by `qemu-img map`.
fn compressed_bytes(d: &Dir, file: &str) -> u64 {
    d.map(file)
        .iter()
        .filter(|r| r["compressed"] == true && r["depth"] == 0)
        .map(|r| r["length"].as_u64().unwrap())
        .sum()
}

/// `qemu-img info -f FMT --output=json FILE`.
fn info(d: &Dir, file: &str, fmt: &str) -> Value {
    let out = d.img(&["info", "-f", fmt, "--output=json", file]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info JSON ({e}):\n{out}"))
}

/// What must survive every conversion of one image.
struct Truth {
    /// The untouched copy, and its format.
    orig: String,
    orig_fmt: &'static str,
    size: u64,
    cluster: u64,
    /// The backing file's name as the image gives it, and its real format.
    backing: Option<(String, &'static str)>,
    structure: Vec<(u64, u64, Kind)>,
}

impl Truth {
    /// Keeps an untouched copy of `file` (format `fmt`), and what QEMU says of it.
    fn of(d: &Dir, file: &str, fmt: &'static str, backing_fmt: Option<&'static str>) -> Truth {
        let orig = format!("{file}.orig");
        d.copy(file, &orig);
        let i = info(d, file, fmt);
        let name = i
            .get("backing-filename")
            .map(|b| b.as_str().expect("a name"));
        assert_eq!(
            name.is_some(),
            backing_fmt.is_some(),
            "{file}: a backing file where none was meant, or none where one was: {i:#}"
        );
        let backing = name.zip(backing_fmt).map(|(n, f)| (n.to_owned(), f));
        Truth {
            orig,
            orig_fmt: fmt,
            size: i["virtual-size"].as_u64().unwrap(),
            cluster: i["cluster-size"].as_u64().unwrap(),
            backing,
            structure: structure(d, file),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running and judging a conversion.

/// The keys of the dry run's JSON.
const DRY_RUN_KEYS: [&str; 9] = [
    "filename",
    "source-format",
    "target-format",
    "cluster-size",
    "file-length",
    "metadata-bytes",
    "decompressed-clusters",
    "decompressed-bytes",
    "extra-bytes",
];

fn in_place_args<'a>(to: &'a str, extra: &[&'a str], file: &'a str) -> Vec<&'a str> {
    let mut args = vec!["convert", "--in-place"];
    if to == "qcow2" {
        args.extend(["-O", "qcow2"]);
    }
    args.extend(extra);
    args.push(file);
    args
}

fn u(j: &Value, key: &str) -> u64 {
    j[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number: {j:#}"))
}

/// Both dry runs (human and JSON) of converting `file` from `from` to `to`: they change
/// no byte, and the JSON tells the formats, the geometry, the file's length and the
/// compressed clusters that would become normal ones. Returns the JSON.
fn dry_run(d: &Dir, file: &str, from: &str, to: &str, cluster: u64) -> Value {
    let before = d.bytes(file);
    let compressed = compressed_bytes(d, file);
    assert_eq!(
        compressed % cluster,
        0,
        "{file}: partial compressed clusters"
    );

    let human = d.qed(&in_place_args(to, &["--dry-run"], file));
    assert!(!human.trim().is_empty(), "the dry run printed nothing");
    assert!(
        d.bytes(file) == before,
        "`qed convert --in-place --dry-run {file}` changed the file"
    );

    let out = d.qed(&in_place_args(to, &["--dry-run", "--output=json"], file));
    assert!(
        d.bytes(file) == before,
        "`qed convert --in-place --dry-run --output=json {file}` changed the file"
    );
    let j: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("the dry run printed invalid JSON ({e}):\n{out}"));
    for key in DRY_RUN_KEYS {
        assert!(
            j.get(key).is_some(),
            "the dry run's JSON has no {key}: {j:#}"
        );
    }
    assert_eq!(j["filename"], file, "{j:#}");
    assert_eq!(j["source-format"], from, "{j:#}");
    assert_eq!(j["target-format"], to, "{j:#}");
    assert_eq!(u(&j, "cluster-size"), cluster, "{j:#}");
    assert_eq!(u(&j, "file-length"), before.len() as u64, "{j:#}");
    assert!(u(&j, "metadata-bytes") > 0, "no new metadata: {j:#}");
    assert_eq!(
        u(&j, "decompressed-clusters"),
        compressed / cluster,
        "qemu-img map shows {compressed} bytes of compressed clusters: {j:#}"
    );
    assert_eq!(u(&j, "decompressed-bytes"), compressed, "{j:#}");
    let _ = u(&j, "extra-bytes");
    j
}

/// Asserts that the checkers find `file` (of format `fmt`) sound: no corruption, no
/// leak (save those QEMU's own rounding invents on QED images with small clusters).
fn assert_clean(d: &Dir, file: &str, fmt: &str) {
    let args = ["check", "-f", fmt, "--output=json", file];
    let out = d.run(QEMU_IMG, &args);
    let theirs: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", d.describe(QEMU_IMG, &args, &out)));
    let phantom = if fmt == "qed" {
        let cluster = info(d, file, fmt)["cluster-size"].as_u64().unwrap();
        phantom_leaks(d.len(file), cluster)
    } else {
        0
    };
    assert_eq!(
        out.status.code(),
        Some(if phantom > 0 { 3 } else { 0 }),
        "{}",
        d.describe(QEMU_IMG, &args, &out)
    );
    assert_eq!(count(&theirs, "check-errors"), 0, "{theirs:#}");
    assert_eq!(count(&theirs, "corruptions"), 0, "{theirs:#}");
    assert_eq!(
        count(&theirs, "leaks"),
        phantom,
        "qemu-img check of {file} finds leaks besides the {phantom} its arithmetic invents: \
         {theirs:#}"
    );
    if fmt == "qed" {
        let (code, ours) = d.qed_check(file, None);
        assert_eq!(code, 0, "qed check {file}: {ours:#}");
        for key in ["check-errors", "corruptions", "leaks"] {
            assert_eq!(count(&ours, key), 0, "{key} in {file}: {ours:#}");
        }
    }
}

/// Converts `file`, now of format `from`, in place to `to` (`extra` given to the
/// conversion too), and judges the result against `truth`.
fn convert_and_judge(
    d: &Dir,
    file: &str,
    from: &str,
    to: &'static str,
    truth: &Truth,
    extra: &[&str],
) {
    let dry = dry_run(d, file, from, to, truth.cluster);
    // From QED nothing is compacted: every data cluster stays where it is.
    let stays = (from == "qed").then(|| placement(d, file, truth.cluster));
    let args = in_place_args(to, extra, file);
    let out = d.expect(QED, &args, 0);
    if extra.contains(&"-q") {
        assert!(
            out.stdout.is_empty(),
            "-q printed: {}",
            d.describe(QED, &args, &out)
        );
    }
    let len = d.len(file);
    assert!(
        len <= u(&dry, "file-length") + u(&dry, "extra-bytes"),
        "{file} is {len} bytes after the conversion, more than the dry run's file-length \
         plus extra-bytes: {dry:#}"
    );

    // qemu-img probes the new format, and sees everything carried over.
    let probed = d.info(file);
    assert_eq!(probed["format"], to, "{probed:#}");
    let i = info(d, file, to);
    assert_eq!(u(&i, "virtual-size"), truth.size, "{i:#}");
    assert_eq!(u(&i, "cluster-size"), truth.cluster, "{i:#}");
    assert_eq!(i["dirty-flag"], false, "{i:#}");
    match &truth.backing {
        None => assert!(i.get("backing-filename").is_none(), "{i:#}"),
        Some((name, fmt)) => {
            assert_eq!(i["backing-filename"], name.as_str(), "{i:#}");
            let recorded = i.get("backing-filename-format");
            if to == "qcow2" || *fmt == "raw" {
                // qcow2 records every backing format; QED records raw (and only raw).
                assert_eq!(recorded, Some(&Value::from(*fmt)), "{i:#}");
            } else {
                assert!(
                    recorded.is_none() || recorded == Some(&Value::from(*fmt)),
                    "a {fmt} backing file recorded as {recorded:?}: {i:#}"
                );
            }
        }
    }
    if to == "qcow2" {
        let spec = &i["format-specific"]["data"];
        assert_eq!(spec["compat"], "1.1", "{i:#}");
        assert_eq!(spec["corrupt"], false, "{i:#}");
    }

    let same = d.expect(
        QEMU_IMG,
        &["compare", "-f", truth.orig_fmt, "-F", to, &truth.orig, file],
        0,
    );
    assert!(String::from_utf8_lossy(&same.stdout).contains("Images are identical."));
    assert_clean(d, file, to);
    if let Some(before) = stays {
        assert_eq!(
            placement(d, file, truth.cluster),
            before,
            "data clusters of {file} moved (guest offset to file offset; left after the \
             conversion)"
        );
    }
    let now = structure(d, file);
    assert_eq!(
        now, truth.structure,
        "qemu-img map of {file} as {to} (left) and of the image it was (right) differ"
    );
    qemu_allocates(d, file, to, truth);
}

/// QEMU writes new clusters into a copy of `file` (of format `fmt`): one where the image
/// had nothing and one over data, then checks and reads it back. Wrong free space or
/// reference counts make it allocate over metadata or data, which its check reports.
fn qemu_allocates(d: &Dir, file: &str, fmt: &str, truth: &Truth) {
    let copy = format!("{file}.write.{fmt}");
    d.copy(file, &copy);
    let c = truth.cluster;
    let unallocated = truth
        .structure
        .iter()
        .filter(|r| r.2 == Kind::Unallocated)
        .map(|r| (r.0.div_ceil(c) * c, r.0 + r.1))
        .find(|&(at, end)| at + c <= end)
        .map(|(at, _)| at);
    let data = truth
        .structure
        .iter()
        .find(|r| r.2 == Kind::Data)
        .map(|r| r.0);
    let mut writes = Vec::new();
    for (at, p) in [(unallocated, 0x5a), (data, 0x5b)] {
        if let Some(at) = at {
            writes.push((at, c.min(64 * K), p as u8));
        }
    }
    assert!(!writes.is_empty(), "{file}: nowhere to write");
    d.write_runs(fmt, &copy, &writes);
    assert_clean(d, &copy, fmt);
    let reads: Vec<String> = writes
        .iter()
        .map(|(at, len, p)| format!("read -P {p:#x} {at} {len}"))
        .collect();
    let mut args = vec!["-r", "-f", fmt];
    for r in &reads {
        args.extend(["-c", r.as_str()]);
    }
    args.push(&copy);
    let out = d.expect(QEMU_IO, &args, 0);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "{}",
        d.describe(QEMU_IO, &args, &out)
    );
    std::fs::remove_file(d.path(&copy)).expect("remove the copy");
}

/// qcow2 to QED and back to qcow2, in place, judged at each step.
fn qcow2_round_trip(d: &Dir, file: &str, backing_fmt: Option<&'static str>) {
    let truth = Truth::of(d, file, "qcow2", backing_fmt);
    convert_and_judge(d, file, "qcow2", "qed", &truth, &[]);
    convert_and_judge(d, file, "qed", "qcow2", &truth, &[]);
}

/// QED to qcow2 and back to QED, in place, judged at each step.
fn qed_round_trip(d: &Dir, file: &str, backing_fmt: Option<&'static str>) {
    let truth = Truth::of(d, file, "qed", backing_fmt);
    convert_and_judge(d, file, "qed", "qcow2", &truth, &[]);
    convert_and_judge(d, file, "qcow2", "qed", &truth, &[]);
}

// ---------------------------------------------------------------------------------------
// Images QEMU makes.

#[derive(Clone, Copy, Debug)]
enum Backing {
    None,
    Raw,
    Qcow2,
    Qed,
}

impl Backing {
    fn format(self) -> Option<&'static str> {
        match self {
            Backing::None => None,
            Backing::Raw => Some("raw"),
            Backing::Qcow2 => Some("qcow2"),
            Backing::Qed => Some("qed"),
        }
    }
}

/// What QEMU writes into the images: `unit` is the cluster size, at least 1 MiB, so that
/// every cluster size sees the same shapes; the images are 32 units.
fn unit(cluster: u64) -> u64 {
    cluster.max(M)
}

/// A backing file of format `fmt`, 32 units, data over the first ten units and the
/// twentieth, written by qemu-io. Returns its name.
fn backing_file(d: &Dir, fmt: &str, unit: u64) -> String {
    let name = format!("base-{}.{fmt}", unit / M);
    let size = (32 * unit).to_string();
    d.img(&["create", "-q", "-f", fmt, &name, &size]);
    d.write_runs(fmt, &name, &[(0, 10 * unit, 0x11), (20 * unit, unit, 0x12)]);
    name
}

/// The image `file` of format `fmt` (creation options `opts`) over `backing`, written by
/// qemu-io: data in whole and partial clusters, the last cluster, then, where `fmt`
/// has them, zero clusters (over nothing, over data kept allocated, over data unmapped,
/// over the backing file's data), discards (of data and of nothing) and compressed
/// clusters.
fn qemu_image(d: &Dir, file: &str, fmt: &str, opts: &str, cluster: u64, backing: Backing) {
    let u = unit(cluster);
    let size = (32 * u).to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let base;
    if let Some(bfmt) = backing.format() {
        base = backing_file(d, bfmt, u);
        args.extend(["-b", &base, "-F", bfmt]);
    }
    args.extend([file, &size]);
    d.img(&args);
    let c = cluster;
    let mut cmds = vec![
        format!("write -P 0x21 0 {}", u / 2),
        format!("write -P 0x22 {} {}", u + 4 * K, 12 * K),
        format!("write -P 0x23 {} {}", 3 * u, 3 * u),
        format!("write -P 0x24 {} {}", 32 * u - 64 * K, 64 * K),
        format!("write -z {} {}", 8 * u, 2 * c),
        format!("write -z {} {c}", 3 * u),
        format!("write -z -u {} {c}", 4 * u),
        format!("discard {} {c}", 5 * u),
        format!("discard {} {c}", 12 * u),
    ];
    if fmt == "qcow2" {
        cmds.extend([
            format!("write -c -P 0x25 {} {c}", 14 * u),
            format!("write -c -P 0x26 {} {c}", 14 * u + c),
        ]);
    }
    d.io(fmt, file, &cmds);
}

/// A qcow2 image as [`qemu_image`] makes it, checked to hold what it is said to hold.
fn qemu_qcow2(d: &Dir, compat: &str, cluster: u64, backing: Backing) -> String {
    let file = format!("v{compat}-{}k-{backing:?}.qcow2", cluster / K);
    let opts = format!("compat={compat},cluster_size={cluster}");
    qemu_image(d, &file, "qcow2", &opts, cluster, backing);
    let map = d.map(&file);
    let u = unit(cluster);
    assert_eq!(compressed_bytes(d, &file), 2 * cluster, "{map:?}");
    if compat == "1.1" {
        let zero_at = |at: u64| {
            map.iter().any(|r| {
                r["start"] == at && r["zero"] == true && r["data"] == false && r["depth"] == 0
            })
        };
        assert!(zero_at(8 * u), "no zero cluster at {}: {map:?}", 8 * u);
        assert!(zero_at(3 * u), "no zero cluster at {}: {map:?}", 3 * u);
    }
    let (code, check) = d.qemu_check(&file);
    assert_eq!(code, 0, "{check:#}");
    file
}

fn qcow2_matrix(compat: &str, backing: Backing) {
    for cluster in [4 * K, 64 * K, 2 * M] {
        let d = Dir::new();
        let file = qemu_qcow2(&d, compat, cluster, backing);
        qcow2_round_trip(&d, &file, backing.format());
    }
}

// ---------------------------------------------------------------------------------------
// qcow2 to QED and back.

#[test]
fn qcow2_v3_round_trips_in_place() {
    qcow2_matrix("1.1", Backing::None);
}

#[test]
fn qcow2_v3_over_raw_round_trips_in_place() {
    qcow2_matrix("1.1", Backing::Raw);
}

#[test]
fn qcow2_v3_over_qcow2_round_trips_in_place() {
    qcow2_matrix("1.1", Backing::Qcow2);
}

#[test]
fn qcow2_v2_round_trips_in_place() {
    qcow2_matrix("0.10", Backing::None);
}

#[test]
fn qcow2_v2_over_raw_round_trips_in_place() {
    qcow2_matrix("0.10", Backing::Raw);
}

#[test]
fn qcow2_v2_over_qcow2_round_trips_in_place() {
    qcow2_matrix("0.10", Backing::Qcow2);
}

/// Every cluster compressed, as `qemu-img convert -c` writes them, and compressed
/// clusters over a backing file.
#[test]
fn qcow2_compressed_by_qemu_img_convert_round_trips_in_place() {
    let d = Dir::new();
    d.raw_image(
        "src.raw",
        "8M",
        &[
            (0, 3 * M, 0x31),
            (4 * M + 512, 100 * K, 0x32),
            (8 * M - 4 * K, 4 * K, 0x33),
        ],
    );
    d.img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "all.qcow2",
    ]);
    let compressed = compressed_bytes(&d, "all.qcow2");
    assert!(
        compressed >= 3 * M,
        "qemu-img convert -c compressed {compressed} bytes"
    );
    qcow2_round_trip(&d, "all.qcow2", None);

    // zstd, QEMU's other compression type.
    d.img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "src.raw",
        "zstd.qcow2",
    ]);
    assert_eq!(
        d.info("zstd.qcow2")["format-specific"]["data"]["compression-type"],
        "zstd"
    );
    assert!(compressed_bytes(&d, "zstd.qcow2") >= 3 * M);
    qcow2_round_trip(&d, "zstd.qcow2", None);

    // Compressed over a backing file: convert -c -B stores only what differs.
    d.raw_image("base.raw", "8M", &[(0, 2 * M, 0x31)]);
    d.img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-B",
        "base.raw",
        "-F",
        "raw",
        "src.raw",
        "over.qcow2",
    ]);
    assert!(compressed_bytes(&d, "over.qcow2") > 0);
    assert!(d.info("over.qcow2")["backing-filename"] == "base.raw");
    qcow2_round_trip(&d, "over.qcow2", Some("raw"));
}

/// An image `qemu-img check` finds leaking (status 3, no corruption): qemu-io was killed
/// (abort) after the reference counts of a new cluster reached the file and before the
/// L2 entry naming it did. The conversion leaves no leak behind.
#[test]
fn qcow2_with_leaks_converts_without_them() {
    let d = Dir::new();
    d.img(&["create", "-q", "-f", "qcow2", "leaky.qcow2", "16M"]);
    d.write_runs(
        "qcow2",
        "leaky.qcow2",
        &[(M, 64 * K, 0x22), (5 * M, M, 0x23)],
    );
    // With writethrough caching each metadata update is written at once, refcounts
    // before the L2 table; blkdebug holds the L2 update and qemu-io aborts meanwhile.
    aborted_qemu_io(
        &d,
        &[
            "-t",
            "writethrough",
            "-c",
            "break l2_update A",
            "-c",
            "aio_write -P 0x11 4M 128k",
            "-c",
            "wait_break A",
            "-c",
            "abort",
            "blkdebug::leaky.qcow2",
        ],
    );
    let (code, check) = d.qemu_check("leaky.qcow2");
    assert_eq!(code, 3, "{check:#}");
    assert!(count(&check, "leaks") > 0, "{check:#}");
    assert_eq!(count(&check, "corruptions"), 0, "{check:#}");
    assert_eq!(d.info("leaky.qcow2")["dirty-flag"], false);
    qcow2_round_trip(&d, "leaky.qcow2", None);
}

/// Runs qemu-io with `args`, which must end in its `abort` command (no core file).
fn aborted_qemu_io(d: &Dir, args: &[&str]) {
    let mut cmd = Command::new(QEMU_IO);
    cmd.args(args).current_dir(d.tmp.path());
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    let out = cmd.output().expect("run qemu-io");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{}",
        d.describe(QEMU_IO, args, &out)
    );
}

/// A plain image: nothing compressed, so the dry run reports nothing to decompress; -q
/// prints nothing, -p is taken, and so is the source's format given with -f.
#[test]
fn plain_qcow2_quiet_with_progress_and_format_given() {
    let d = Dir::new();
    d.img(&["create", "-q", "-f", "qcow2", "plain.qcow2", "16M"]);
    d.write_runs(
        "qcow2",
        "plain.qcow2",
        &[(0, M, 0x41), (9 * M, 64 * K, 0x42)],
    );
    let truth = Truth::of(&d, "plain.qcow2", "qcow2", None);
    assert_eq!(truth.cluster, 64 * K);
    let dry = dry_run(&d, "plain.qcow2", "qcow2", "qed", truth.cluster);
    assert_eq!(u(&dry, "decompressed-clusters"), 0, "{dry:#}");
    assert_eq!(u(&dry, "decompressed-bytes"), 0, "{dry:#}");
    convert_and_judge(
        &d,
        "plain.qcow2",
        "qcow2",
        "qed",
        &truth,
        &["-q", "-f", "qcow2"],
    );
    convert_and_judge(
        &d,
        "plain.qcow2",
        "qed",
        "qcow2",
        &truth,
        &["-p", "-f", "qed"],
    );
}

/// The dry run tells a compressed image from one without compressed clusters.
#[test]
fn dry_run_counts_compressed_clusters() {
    let d = Dir::new();
    d.raw_image("src.raw", "4M", &[(0, M, 0x51), (3 * M, 64 * K, 0x52)]);
    d.img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "plain.qcow2",
    ]);
    d.img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "packed.qcow2",
    ]);
    let plain = dry_run(&d, "plain.qcow2", "qcow2", "qed", 64 * K);
    let packed = dry_run(&d, "packed.qcow2", "qcow2", "qed", 64 * K);
    assert_eq!(u(&plain, "decompressed-bytes"), 0, "{plain:#}");
    assert_eq!(u(&packed, "decompressed-clusters"), 17, "{packed:#}");
    assert_eq!(u(&packed, "decompressed-bytes"), 17 * 64 * K, "{packed:#}");
    // What the compressed clusters become must fit in what the file may grow by.
    assert!(
        u(&packed, "extra-bytes") >= u(&packed, "decompressed-bytes"),
        "{packed:#}"
    );
}

// ---------------------------------------------------------------------------------------
// QED to qcow2 and back.

fn qemu_qed(d: &Dir, cluster: u64, backing: Backing) -> String {
    let file = format!("{}k-{backing:?}.qed", cluster / K);
    let opts = format!("cluster_size={cluster}");
    qemu_image(d, &file, "qed", &opts, cluster, backing);
    let map = d.map(&file);
    assert!(
        map.iter()
            .any(|r| r["start"] == 8 * unit(cluster) && r["zero"] == true && r["depth"] == 0),
        "no zero cluster: {map:?}"
    );
    d.clean(&file);
    file
}

#[test]
fn qed_written_by_qemu_round_trips_through_qcow2() {
    for (cluster, backing) in [
        (64 * K, Backing::None),
        (64 * K, Backing::Raw),
        (64 * K, Backing::Qed),
        (64 * K, Backing::Qcow2),
        (4 * K, Backing::None),
        (2 * M, Backing::Raw),
    ] {
        let d = Dir::new();
        let file = qemu_qed(&d, cluster, backing);
        qed_round_trip(&d, &file, backing.format());
    }
}

// ---------------------------------------------------------------------------------------
// raw to QED.

#[test]
fn raw_converts_in_place_to_qed() {
    for probe in [false, true] {
        let d = Dir::new();
        // Not a whole number of clusters long; data in the first cluster (where the
        // header goes), in partial clusters and at the very end, holes between.
        let size = 10 * M + 4 * K;
        d.raw_image(
            "disk.raw",
            &size.to_string(),
            &[
                (0, 100 * K, 0x61),
                (M + 512, 3 * K, 0x62),
                (3 * M, 2 * M, 0x63),
                (size - 8 * K, 8 * K, 0x64),
            ],
        );
        d.copy("disk.raw", "disk.raw.orig");
        let before = d.bytes("disk.raw");
        let dry_args: &[&str] = if probe {
            &[
                "convert",
                "--in-place",
                "--dry-run",
                "--output=json",
                "disk.raw",
            ]
        } else {
            &[
                "convert",
                "--in-place",
                "--dry-run",
                "--output=json",
                "-f",
                "raw",
                "disk.raw",
            ]
        };
        let dry: Value = serde_json::from_str(&d.qed(dry_args)).expect("dry run JSON");
        assert!(
            d.bytes("disk.raw") == before,
            "the dry run changed the file"
        );
        for key in DRY_RUN_KEYS {
            assert!(dry.get(key).is_some(), "no {key}: {dry:#}");
        }
        assert_eq!(dry["source-format"], "raw", "{dry:#}");
        assert_eq!(dry["target-format"], "qed", "{dry:#}");
        assert_eq!(u(&dry, "file-length"), size, "{dry:#}");
        assert_eq!(u(&dry, "decompressed-bytes"), 0, "{dry:#}");

        let args: &[&str] = if probe {
            &["convert", "--in-place", "disk.raw"]
        } else {
            &["convert", "--in-place", "-f", "raw", "disk.raw"]
        };
        d.expect(QED, args, 0);
        assert!(
            d.len("disk.raw") <= size + u(&dry, "extra-bytes"),
            "{} bytes: {dry:#}",
            d.len("disk.raw")
        );
        let i = info(&d, "disk.raw", "qed");
        assert_eq!(d.info("disk.raw")["format"], "qed");
        assert_eq!(u(&i, "virtual-size"), size, "{i:#}");
        assert_eq!(u(&i, "cluster-size"), u(&dry, "cluster-size"), "{i:#}");
        assert!(i.get("backing-filename").is_none(), "{i:#}");
        let same = d.expect(
            QEMU_IMG,
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qed",
                "disk.raw.orig",
                "disk.raw",
            ],
            0,
        );
        assert!(String::from_utf8_lossy(&same.stdout).contains("Images are identical."));
        assert_clean(&d, "disk.raw", "qed");
        // The data stays where it was in the file, but for the first cluster, where the
        // header goes.
        let cluster = u(&i, "cluster-size");
        let moved: Vec<(u64, u64)> = placement(&d, "disk.raw", cluster)
            .into_iter()
            .filter(|&(guest, file)| guest >= cluster && guest != file)
            .collect();
        assert!(
            moved.is_empty(),
            "data clusters moved (guest, file offset): {moved:?}"
        );

        // On to qcow2 and back, as any QED image.
        let truth = Truth {
            orig: "disk.raw.orig".into(),
            orig_fmt: "raw",
            size,
            cluster: u(&i, "cluster-size"),
            backing: None,
            structure: structure(&d, "disk.raw"),
        };
        qemu_allocates(&d, "disk.raw", "qed", &truth);
        convert_and_judge(&d, "disk.raw", "qed", "qcow2", &truth, &[]);
        convert_and_judge(&d, "disk.raw", "qcow2", "qed", &truth, &[]);
    }
}

// ---------------------------------------------------------------------------------------
// Refusals.

/// `qed convert --in-place ARGS FILE`, and its dry run, exit 1 naming every one of
/// `words` (case aside) and leave every byte of `file` as it was.
fn refused(d: &Dir, file: &str, args: &[&str], words: &[&str]) {
    let before = d.bytes(file);
    for dry in [true, false] {
        let mut all = vec!["convert", "--in-place"];
        if dry {
            all.push("--dry-run");
        }
        all.extend(args);
        all.push(file);
        let out = d.expect(QED, &all, 1);
        let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
        for w in words {
            assert!(
                said.contains(&w.to_lowercase()),
                "the refusal does not say {w:?}: {}",
                d.describe(QED, &all, &out)
            );
        }
        assert!(
            d.bytes(file) == before,
            "a refused `qed {}` changed {file}",
            all.join(" ")
        );
    }
}

/// As [`refused`], with any one of `alternatives` in the message.
fn refused_naming_one_of(d: &Dir, file: &str, args: &[&str], alternatives: &[&str]) {
    let before = d.bytes(file);
    let mut all = vec!["convert", "--in-place"];
    all.extend(args);
    all.push(file);
    let out = d.expect(QED, &all, 1);
    let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        alternatives
            .iter()
            .any(|w| said.contains(&w.to_lowercase())),
        "the refusal names none of {alternatives:?}: {}",
        d.describe(QED, &all, &out)
    );
    assert!(
        d.bytes(file) == before,
        "a refused conversion changed {file}"
    );
}

fn small_qcow2(d: &Dir, file: &str, opts: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(opts);
    args.extend([file, "16M"]);
    d.img(&args);
}

#[test]
fn refusals_change_nothing() {
    let d = Dir::new();
    let data = [(0, M, 0x71), (5 * M, 64 * K, 0x72)];

    small_qcow2(&d, "snap.qcow2", &[]);
    d.write_runs("qcow2", "snap.qcow2", &data);
    d.img(&["snapshot", "-c", "before", "snap.qcow2"]);
    refused(&d, "snap.qcow2", &[], &["snapshot", "qemu-img snapshot -d"]);

    let secret = "secret,id=sec0,data=123456";
    small_qcow2(
        &d,
        "luks.qcow2",
        &[
            "--object",
            secret,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
        ],
    );
    refused(&d, "luks.qcow2", &[], &["encrypt"]);

    small_qcow2(&d, "external.qcow2", &["-o", "data_file=external.data"]);
    let data_file = d.bytes("external.data");
    refused(&d, "external.qcow2", &[], &["data file"]);
    assert!(d.bytes("external.data") == data_file);

    small_qcow2(&d, "ext-l2.qcow2", &["-o", "extended_l2=on"]);
    d.write_runs("qcow2", "ext-l2.qcow2", &data);
    refused_naming_one_of(&d, "ext-l2.qcow2", &[], &["extended L2", "subcluster"]);
    refused_naming_one_of(
        &d,
        "ext-l2.qcow2",
        &["--dry-run"],
        &["extended L2", "subcluster"],
    );

    small_qcow2(&d, "bitmap.qcow2", &[]);
    d.write_runs("qcow2", "bitmap.qcow2", &data);
    d.img(&["bitmap", "--add", "bitmap.qcow2", "dirty0"]);
    refused(
        &d,
        "bitmap.qcow2",
        &[],
        &["bitmap", "qemu-img bitmap --remove"],
    );

    small_qcow2(&d, "tiny.qcow2", &["-o", "cluster_size=512"]);
    d.write_runs("qcow2", "tiny.qcow2", &data);
    refused(&d, "tiny.qcow2", &[], &["cluster size"]);
    small_qcow2(&d, "small.qcow2", &["-o", "cluster_size=2k"]);
    refused(&d, "small.qcow2", &[], &["cluster size"]);

    // Dirty: lazy refcounts, and the writer gone without closing the image.
    small_qcow2(&d, "dirty.qcow2", &["-o", "lazy_refcounts=on"]);
    aborted_qemu_io(
        &d,
        &["-c", "write -P 0x73 0 64k", "-c", "abort", "dirty.qcow2"],
    );
    assert_eq!(d.info("dirty.qcow2")["dirty-flag"], true);
    refused(&d, "dirty.qcow2", &[], &["qemu-img check -r all"]);

    // Corrupt: the bit QEMU sets when it finds its metadata inconsistent (incompatible
    // features at 72, bit 1).
    small_qcow2(&d, "corrupt.qcow2", &[]);
    d.write_runs("qcow2", "corrupt.qcow2", &data);
    common::dir::patch(&d, "corrupt.qcow2", |b| b[79] |= 2);
    let i = info(&d, "corrupt.qcow2", "qcow2");
    assert_eq!(i["format-specific"]["data"]["corrupt"], true, "{i:#}");
    refused(&d, "corrupt.qcow2", &[], &["qemu-img check -r all"]);

    // A QED image whose writer did not finish (NEED_CHECK).
    d.qed_image("dirty.qed", "16M", &[], &data);
    common::dir::patch(&d, "dirty.qed", |b| common::dir::set_need_check(b));
    refused(
        &d,
        "dirty.qed",
        &["-O", "qcow2"],
        &["qemu-img check -r all"],
    );

    // Already in the format asked for.
    small_qcow2(&d, "plain.qcow2", &[]);
    d.write_runs("qcow2", "plain.qcow2", &data);
    refused(&d, "plain.qcow2", &["-O", "qcow2"], &["already"]);
    d.qed_image("plain.qed", "16M", &[], &data);
    refused(&d, "plain.qed", &[], &["already"]);
    refused(&d, "plain.qed", &["-O", "qed"], &["already"]);

    // QED clusters larger than qcow2's largest (2 MiB).
    // (Two-cluster tables: with four, QEMU's size arithmetic overflows.)
    d.qed_image(
        "huge.qed",
        "64M",
        &["-o", "cluster_size=4M,table_size=2"],
        &data,
    );
    refused(&d, "huge.qed", &["-O", "qcow2"], &["cluster size"]);
}
