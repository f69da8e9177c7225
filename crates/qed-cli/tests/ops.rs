//! Whole-image operations of the `qed` tool (convert, compare, commit, rebase, resize,
//! measure, check with repair) on images that qemu-img and qemu-io made, judged by
//! qemu-img and qemu-io.
//!
//! QEMU is the oracle of every result here, so a missing qemu-img or qemu-io fails these
//! tests instead of skipping them: skipping would report an unjudged suite as passing.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use tempfile::TempDir;

const QED: &str = env!("CARGO_BIN_EXE_qed");
const QEMU_IMG: &str = "qemu-img";
const QEMU_IO: &str = "qemu-io";

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
const G: u64 = 1 << 30;

/// Default QED geometry, as qemu-img creates it.
const CLUSTER: u64 = 64 * K;
const HEADER_AND_L1: u64 = CLUSTER + 4 * CLUSTER;

/// A scratch directory. Every command runs inside it, so file names stay relative and
/// relative backing names resolve the way QEMU resolves them.
struct Dir {
    tmp: TempDir,
}

impl Dir {
    fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().expect("create a temporary directory"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn run(&self, prog: &str, args: &[&str]) -> Output {
        Command::new(prog)
            .args(args)
            .current_dir(self.tmp.path())
            .output()
            .unwrap_or_else(|e| {
                let hint = if prog.starts_with("qemu") {
                    " (these tests need qemu-img and qemu-io: apt-get install qemu-utils)"
                } else {
                    ""
                };
                panic!("cannot run {prog}: {e}{hint}")
            })
    }

    fn describe(&self, prog: &str, args: &[&str], out: &Output) -> String {
        let line: Vec<String> = args
            .iter()
            .map(|a| {
                let a = if a.len() > 200 {
                    format!("{}...({} bytes)", &a[..60], a.len())
                } else {
                    a.to_string()
                };
                if a.contains(' ') || a.is_empty() {
                    format!("'{a}'")
                } else {
                    a
                }
            })
            .collect();
        format!(
            "`{prog} {}` in {}\n  status: {}\n  stdout:\n{}\n  stderr:\n{}",
            line.join(" "),
            self.tmp.path().display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs `prog` and asserts its exit code.
    fn expect(&self, prog: &str, args: &[&str], code: i32) -> Output {
        let out = self.run(prog, args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "expected exit code {code} from {}",
            self.describe(prog, args, &out)
        );
        out
    }

    /// Runs `prog`, asserts that it succeeds and returns its stdout.
    fn ok(&self, prog: &str, args: &[&str]) -> String {
        let out = self.expect(prog, args, 0);
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    fn qed(&self, args: &[&str]) -> String {
        self.ok(QED, args)
    }

    fn img(&self, args: &[&str]) -> String {
        self.ok(QEMU_IMG, args)
    }

    /// Runs qemu-io commands on `file` (of format `fmt`); each must succeed. qemu-io
    /// reports a pattern mismatch on stdout, so that is checked besides the exit code.
    fn io(&self, fmt: &str, file: &str, cmds: &[String]) {
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(file);
        let out = self.expect(QEMU_IO, &args, 0);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !all.contains("Pattern verification failed") && !all.contains("error"),
            "{}",
            self.describe(QEMU_IO, &args, &out)
        );
    }

    /// Asserts through qemu-io (read-only) that each `(offset, len, byte)` reads as `byte`.
    fn expect_reads(&self, file: &str, reads: &[(u64, u64, u8)]) {
        let cmds: Vec<String> = reads
            .iter()
            .map(|(off, len, p)| format!("read -P {p:#x} {off} {len}"))
            .collect();
        let mut args = vec!["-r"];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(file);
        let out = self.run(QEMU_IO, &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && !stdout.contains("Pattern verification failed")
                && stdout.matches("read ").count() == reads.len(),
            "{}",
            self.describe(QEMU_IO, &args, &out)
        );
    }

    /// Asserts that `qed ARGS` fails with `needle` in its error message.
    fn qed_fails(&self, args: &[&str], needle: &str) -> String {
        let out = self.run(QED, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && stderr.contains(needle),
            "expected a failure mentioning {needle:?} from {}",
            self.describe(QED, args, &out)
        );
        stderr
    }

    /// Asserts that qemu-img sees the same guest contents in both images.
    fn same(&self, a: &str, b: &str) {
        let out = self.expect(QEMU_IMG, &["compare", a, b], 0);
        assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical."));
    }

    /// Asserts that `qemu-img check` finds nothing wrong.
    fn clean(&self, file: &str) {
        let (code, j) = self.qemu_check(file);
        assert_eq!(code, 0, "qemu-img check {file}: {j:#}");
        assert_eq!(count(&j, "corruptions"), 0, "{j:#}");
        assert_eq!(count(&j, "leaks"), 0, "{j:#}");
    }

    /// `qemu-img check --output=json`: exit code and report.
    fn qemu_check(&self, file: &str) -> (i32, Value) {
        let args = ["check", "--output=json", file];
        let out = self.run(QEMU_IMG, &args);
        let j = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", self.describe(QEMU_IMG, &args, &out)));
        (out.status.code().unwrap_or(-1), j)
    }

    /// `qed check --output=json [-r MODE]`: exit code and report.
    fn qed_check(&self, file: &str, repair: Option<&str>) -> (i32, Value) {
        let mut args = vec!["check", "--output=json"];
        if let Some(r) = repair {
            args.extend(["-r", r]);
        }
        args.push(file);
        let out = self.run(QED, &args);
        let j = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", self.describe(QED, &args, &out)));
        (out.status.code().unwrap_or(-1), j)
    }

    fn info(&self, file: &str) -> Value {
        serde_json::from_str(&self.img(&["info", "--output=json", file])).expect("info JSON")
    }

    fn map(&self, file: &str) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&self.img(&["map", "--output=json", file])).expect("map JSON");
        v.as_array().expect("map is an array").clone()
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    fn put(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }

    /// Bytes the file takes on disk.
    fn disk_usage(&self, name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path(name))
            .unwrap_or_else(|e| panic!("stat {name}: {e}"))
            .blocks()
            * 512
    }

    fn len(&self, name: &str) -> u64 {
        std::fs::metadata(self.path(name))
            .unwrap_or_else(|e| panic!("stat {name}: {e}"))
            .len()
    }

    fn copy(&self, from: &str, to: &str) {
        std::fs::copy(self.path(from), self.path(to))
            .unwrap_or_else(|e| panic!("copy {from} to {to}: {e}"));
    }

    /// A fresh QED image of `size` holding `(offset, len, byte)` runs, written by qemu-io.
    fn qed_image(&self, name: &str, size: &str, extra: &[&str], writes: &[(u64, u64, u8)]) {
        let mut args = vec!["create", "-q", "-f", "qed"];
        args.extend(extra);
        args.extend([name, size]);
        self.img(&args);
        self.write_runs("qed", name, writes);
    }

    fn raw_image(&self, name: &str, size: &str, writes: &[(u64, u64, u8)]) {
        self.img(&["create", "-q", "-f", "raw", name, size]);
        self.write_runs("raw", name, writes);
    }

    fn write_runs(&self, fmt: &str, name: &str, writes: &[(u64, u64, u8)]) {
        if writes.is_empty() {
            return;
        }
        let cmds: Vec<String> = writes
            .iter()
            .map(|(off, len, p)| format!("write -P {p:#x} {off} {len}"))
            .collect();
        self.io(fmt, name, &cmds);
    }
}

/// A count from a check report; qemu-img leaves out zero counts.
fn count(j: &Value, key: &str) -> u64 {
    j.get(key).map_or(0, |v| v.as_u64().expect("a count"))
}

fn le64(b: &[u8], at: u64) -> u64 {
    u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn le32(b: &[u8], at: u64) -> u64 {
    u32::from_le_bytes(b[at as usize..at as usize + 4].try_into().unwrap()).into()
}

fn set_le64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Bytes of guest data in a `qemu-img map` that the image at `depth` itself stores.
fn data_bytes(map: &[Value], depth: u64) -> u64 {
    map.iter()
        .filter(|r| r["data"] == true && r["depth"] == depth)
        .map(|r| r["length"].as_u64().unwrap())
        .sum()
}

// ----------------------------------------------------------------------------------
// convert

/// raw base <- qcow2 mid <- qcow2 top. The top holds a zero cluster over backing data,
/// a compressed cluster and a partial cluster. Returns the top's name.
fn qcow2_chain(d: &Dir, compat: &str) -> String {
    let (base, mid, top) = (
        format!("base-{compat}.raw"),
        format!("mid-{compat}.qcow2"),
        format!("top-{compat}.qcow2"),
    );
    d.raw_image(
        &base,
        "4M",
        &[(0, M, 0x11), (3 * M + 512 * K, 64 * K, 0x12)],
    );
    let o = format!("compat={compat}");
    d.img(&[
        "create", "-q", "-f", "qcow2", "-o", &o, "-b", &base, "-F", "raw", &mid, "4M",
    ]);
    d.write_runs("qcow2", &mid, &[(512 * K, M, 0x22)]);
    d.img(&[
        "create", "-q", "-f", "qcow2", "-o", &o, "-b", &mid, "-F", "qcow2", &top, "4M",
    ]);
    d.io(
        "qcow2",
        &top,
        &[
            "write -z 768k 128k".into(),
            "write -c -P 0x33 2M 64k".into(),
            "write -P 0x44 3M 4k".into(),
        ],
    );
    // The chain must really hold what it is said to hold.
    let map = d.map(&top);
    assert!(
        map.iter()
            .any(|r| r["start"] == 2 * M && r["compressed"] == true && r["depth"] == 0),
        "no compressed cluster at 2M: {map:?}"
    );
    if compat == "1.1" {
        assert!(
            map.iter().any(|r| r["start"] == 768 * K
                && r["zero"] == true
                && r["data"] == false
                && r["depth"] == 0),
            "no zero cluster at 768k: {map:?}"
        );
    }
    d.expect_reads(
        &top,
        &[
            (0, 512 * K, 0x11),
            (512 * K, 256 * K, 0x22),
            (768 * K, 128 * K, 0),
            (896 * K, 640 * K, 0x22),
            (2 * M, 64 * K, 0x33),
            (3 * M, 4 * K, 0x44),
            (3 * M + 512 * K, 64 * K, 0x12),
        ],
    );
    top
}

/// Converts `src` to qed (default geometry and 4k/2), and to raw; all must compare equal
/// to the source, and the qed ones must check clean.
fn convert_three_ways(d: &Dir, src: &str) {
    let (qed, small, raw) = (
        format!("{src}.qed"),
        format!("{src}.4k.qed"),
        format!("{src}.raw"),
    );
    d.qed(&["convert", src, &qed]);
    d.qed(&["convert", "-o", "cluster_size=4k,table_size=2", src, &small]);
    d.qed(&["convert", "-O", "raw", src, &raw]);
    for dst in [&qed, &small, &raw] {
        d.same(src, dst);
    }
    for dst in [&qed, &small] {
        d.clean(dst);
    }
    let i = d.info(&small);
    assert_eq!(i["format"], "qed");
    assert_eq!(i["cluster-size"], 4096);
    assert_eq!(d.info(&qed)["virtual-size"], 4 * M);
    assert_eq!(d.info(&raw)["format"], "raw");
}

#[test]
fn convert_qcow2_v3_chain() {
    let d = Dir::new();
    let top = qcow2_chain(&d, "1.1");
    convert_three_ways(&d, &top);
}

#[test]
fn convert_qcow2_v2_chain() {
    let d = Dir::new();
    let top = qcow2_chain(&d, "0.10");
    convert_three_ways(&d, &top);
}

#[test]
fn convert_qed_sources_with_raw_and_qed_backing() {
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, M, 0x11), (3 * M, 100 * K, 0x12)]);
    d.qed_image(
        "over-raw.qed",
        "4M",
        &["-b", "base.raw", "-F", "raw"],
        &[(100 * K, 200 * K, 0x55)],
    );
    d.io("qed", "over-raw.qed", &["write -z 512k 128k".into()]);
    d.qed_image(
        "over-qed.qed",
        "4M",
        &["-b", "over-raw.qed", "-F", "qed"],
        &[(M, 64 * K, 0x66), (3 * M + 10, 10, 0x67)],
    );
    d.expect_reads(
        "over-qed.qed",
        &[
            (0, 100 * K, 0x11),
            (100 * K, 200 * K, 0x55),
            (512 * K, 128 * K, 0),
            (M, 64 * K, 0x66),
            (3 * M, 10, 0x12),
            (3 * M + 10, 10, 0x67),
        ],
    );
    convert_three_ways(&d, "over-raw.qed");
    convert_three_ways(&d, "over-qed.qed");
}

#[test]
fn convert_keeps_zeros_sparse_and_s0_allocates_all() {
    let d = Dir::new();
    d.raw_image("sparse.raw", "64M", &[(10 * M, 64 * K, 0x77)]);
    d.qed(&["convert", "-f", "raw", "sparse.raw", "sparse.qed"]);
    d.same("sparse.raw", "sparse.qed");
    d.clean("sparse.qed");
    let map = d.map("sparse.qed");
    assert_eq!(data_bytes(&map, 0), 64 * K, "{map:?}");
    // Header, L1, one L2 table and one data cluster.
    assert_eq!(d.len("sparse.qed"), HEADER_AND_L1 + 4 * CLUSTER + CLUSTER);
    assert!(d.len("sparse.qed") * 50 < d.len("sparse.raw"));

    d.qed(&["convert", "-S", "0", "-f", "raw", "sparse.raw", "full.qed"]);
    d.same("sparse.raw", "full.qed");
    d.clean("full.qed");
    let map = d.map("full.qed");
    assert_eq!(data_bytes(&map, 0), 64 * M, "{map:?}");
    assert!(map.iter().all(|r| r["data"] == true), "{map:?}");
    assert!(d.len("full.qed") >= 64 * M + HEADER_AND_L1);
}

#[test]
fn convert_with_backing_stores_only_differences() {
    let d = Dir::new();
    d.raw_image(
        "back.raw",
        "4M",
        &[(0, M, 0x11), (2 * M, 64 * K, 0x99), (3 * M, 64 * K, 0x11)],
    );
    d.img(&[
        "convert", "-q", "-f", "raw", "-O", "raw", "back.raw", "src.raw",
    ]);
    // Differs from the backing file in one cluster, and one cluster goes back to zeros.
    d.io(
        "raw",
        "src.raw",
        &["write -P 0xab 1536k 8k".into(), "write -z 2M 64k".into()],
    );
    d.img(&[
        "convert", "-q", "-f", "raw", "-O", "qed", "back.raw", "back.qed",
    ]);

    for (back, fmt) in [("back.raw", "raw"), ("back.qed", "qed")] {
        let dst = format!("diff-{fmt}.qed");
        d.qed(&[
            "convert", "-f", "raw", "-B", back, "-F", fmt, "src.raw", &dst,
        ]);
        d.same("src.raw", &dst);
        d.clean(&dst);
        let info = d.info(&dst);
        assert_eq!(info["backing-filename"], back, "{info:#}");
        let map = d.map(&dst);
        let own: Vec<(u64, u64)> = map
            .iter()
            .filter(|r| r["depth"] == 0 && r["present"] == true)
            .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
            .collect();
        // Only the cluster holding the 8k write and the zeroed cluster are the image's own.
        assert_eq!(own, [(1536 * K, 64 * K), (2 * M, 64 * K)], "{map:?}");
        assert_eq!(data_bytes(&map, 0), 64 * K, "{map:?}");
    }
}

#[test]
fn convert_n_writes_into_existing_destination() {
    let d = Dir::new();
    d.raw_image(
        "src.raw",
        "4M",
        &[(0, 64 * K, 0x21), (3 * M + 4 * K, 4 * K, 0x22)],
    );
    // Destinations full of other data, so every zero run of the source must be written.
    d.qed_image("dst.qed", "4M", &[], &[(0, 4 * M, 0xcd)]);
    d.raw_image("dst.raw", "4M", &[(0, 4 * M, 0xcd)]);
    let before = d.len("dst.qed");
    d.qed(&["convert", "-n", "-f", "raw", "src.raw", "dst.qed"]);
    d.qed(&[
        "convert", "-n", "-f", "raw", "-O", "raw", "src.raw", "dst.raw",
    ]);
    d.same("src.raw", "dst.qed");
    d.same("src.raw", "dst.raw");
    d.clean("dst.qed");
    // Written in place: no new cluster was needed.
    assert_eq!(d.len("dst.qed"), before);
}

#[test]
fn convert_in_every_cache_mode_of_the_destination() {
    let d = Dir::new();
    // Steps of the copy (2 MiB) with data, with zeros, and a partial last one.
    d.raw_image(
        "src.raw",
        "9M",
        &[
            (0, 3 * M, 0x31),
            (5 * M + 4 * K, 12 * K, 0x32),
            (9 * M - 512, 512, 0x33),
        ],
    );
    for cache in ["unsafe", "writeback", "none"] {
        let (qed, raw) = (format!("{cache}.qed"), format!("{cache}.raw"));
        d.qed(&["convert", "-t", cache, "-f", "raw", "src.raw", &qed]);
        d.qed(&[
            "convert", "-t", cache, "-f", "raw", "-O", "raw", "src.raw", &raw,
        ]);
        d.same("src.raw", &qed);
        d.same("src.raw", &raw);
        d.clean(&qed);
    }
    d.qed_fails(
        &["convert", "-t", "writethrough", "src.raw", "wt.qed"],
        "invalid cache mode",
    );
    assert!(
        !d.path("wt.qed").exists(),
        "a refused convert creates nothing"
    );
}

// ----------------------------------------------------------------------------------
// compare

#[test]
fn compare_reports_like_qemu_img() {
    let d = Dir::new();
    d.raw_image("a.raw", "4M", &[(0, M, 0x31), (3 * M, 64 * K, 0x32)]);
    d.img(&["convert", "-q", "-f", "raw", "-O", "qed", "a.raw", "a.qed"]);

    let out = d.qed(&["compare", "a.qed", "a.raw"]);
    assert!(out.contains("Images are identical."), "{out}");

    // One byte differs, at an offset that is not sector aligned.
    d.img(&["convert", "-q", "-f", "raw", "-O", "qed", "a.raw", "b.qed"]);
    d.io("qed", "b.qed", &["write -P 0x01 1234567 1".into()]);
    let out = d.expect(QED, &["compare", "a.qed", "b.qed"], 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Content mismatch at offset 1234567!"),
        "{stdout}"
    );
    // qemu-img agrees that they differ (it reports the sector).
    let q = d.expect(QEMU_IMG, &["compare", "a.qed", "b.qed"], 1);
    assert!(String::from_utf8_lossy(&q.stdout).contains("offset 1234432"));

    // A difference where one side reads zeros and the other has data.
    d.img(&["convert", "-q", "-f", "raw", "-O", "qed", "a.raw", "c.qed"]);
    d.io("qed", "c.qed", &["write -P 0x05 2097452 1".into()]);
    let out = d.expect(QED, &["compare", "a.raw", "c.qed"], 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("Content mismatch at offset {}!", 2 * M + 300)),
        "{stdout}"
    );

    // A longer image whose tail reads as zeros.
    d.qed_image("long.qed", "8M", &[], &[]);
    d.img(&[
        "convert", "-q", "-n", "-f", "raw", "-O", "qed", "a.raw", "long.qed",
    ]);
    d.expect(QEMU_IMG, &["compare", "a.qed", "long.qed"], 0);
    let out = d.expect(QED, &["compare", "a.qed", "long.qed"], 0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Warning: Image size mismatch!"), "{stdout}");
    assert!(stdout.contains("Images are identical."), "{stdout}");
    let out = d.expect(QED, &["compare", "-s", "a.qed", "long.qed"], 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Strict mode: Image size mismatch!"),
        "{stdout}"
    );
    d.expect(QEMU_IMG, &["compare", "-s", "a.qed", "long.qed"], 1);

    // A longer image with data past the shorter one's end differs right at that end.
    d.io("qed", "long.qed", &["write -P 0x07 6M 512".into()]);
    let out = d.expect(QED, &["compare", "long.qed", "a.qed"], 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("Content mismatch at offset {}!", 6 * M)),
        "{stdout}"
    );

    // Across formats and backing chains.
    let top = qcow2_chain(&d, "1.1");
    d.img(&["convert", "-q", "-O", "raw", &top, "top.raw"]);
    d.qed(&["compare", &top, "top.raw"]);

    let out = d.expect(QED, &["compare", "a.qed", "missing.qed"], 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.qed"), "{stderr}");
}

// ----------------------------------------------------------------------------------
// commit

/// A top image over `base` holding data clusters, a zero cluster over backing data and a
/// partial cluster; returns the guest contents as QEMU reads them, as a raw file.
fn commit_pair(d: &Dir, base: &str, fmt: &str, top: &str) -> String {
    d.qed_image(
        top,
        "4M",
        &["-b", base, "-F", fmt],
        &[(512 * K, 256 * K, 0x5a)],
    );
    d.io(
        "qed",
        top,
        &[
            "write -z 64k 128k".into(),
            "write -P 0x5b 3145828 100".into(),
        ],
    );
    let map = d.map(top);
    assert!(
        map.iter().any(|r| r["start"] == 64 * K
            && r["zero"] == true
            && r["data"] == false
            && r["depth"] == 0),
        "no zero cluster at 64k in {top}: {map:?}"
    );
    let expected = format!("{top}.expected.raw");
    d.img(&["convert", "-q", "-O", "raw", top, &expected]);
    expected
}

#[test]
fn commit_into_raw_and_qed() {
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, 2 * M, 0x10), (3 * M, 64 * K, 0x11)]);
    d.qed_image(
        "base.qed",
        "4M",
        &[],
        &[(0, 2 * M, 0x10), (3 * M, 64 * K, 0x11)],
    );
    for (base, fmt) in [("base.raw", "raw"), ("base.qed", "qed")] {
        let top = format!("top-{fmt}.qed");
        let expected = commit_pair(&d, base, fmt, &top);
        assert!(d.len(&top) > HEADER_AND_L1);
        let out = d.qed(&["commit", &top]);
        assert!(out.contains("Image committed."), "{out}");
        d.same(base, &expected);
        d.same(&top, &expected);
        assert_eq!(d.len(&top), HEADER_AND_L1, "{top} was not emptied");
        let map = d.map(&top);
        assert!(map.iter().all(|r| r["depth"] != 0), "{map:?}");
        d.clean(&top);
        if fmt == "qed" {
            d.clean(base);
        }
    }
}

#[test]
fn commit_d_keeps_the_data_of_the_top() {
    let d = Dir::new();
    d.qed_image("base.qed", "4M", &[], &[(0, 2 * M, 0x10)]);
    let expected = commit_pair(&d, "base.qed", "qed", "top.qed");
    let (len, map) = (d.len("top.qed"), d.map("top.qed"));
    d.qed(&["commit", "-d", "top.qed"]);
    d.same("base.qed", &expected);
    d.same("top.qed", &expected);
    assert_eq!(d.len("top.qed"), len);
    assert_eq!(d.map("top.qed"), map);
    d.clean("top.qed");
    d.clean("base.qed");
}

#[test]
fn commit_into_a_base_that_has_its_own_backing_file() {
    let d = Dir::new();
    d.raw_image("bottom.raw", "4M", &[(0, 4 * M, 0x11)]);
    d.qed_image(
        "mid.qed",
        "4M",
        &["-b", "bottom.raw", "-F", "raw"],
        &[(M, M, 0x22)],
    );
    // Zero clusters over both layers' data, a partial cluster over the mid's data.
    let expected = commit_pair(&d, "mid.qed", "qed", "top.qed");
    d.io(
        "qed",
        "top.qed",
        &["write -z 1M 64k".into(), "write -P 0x34 1572864 100".into()],
    );
    d.img(&["convert", "-q", "-O", "raw", "top.qed", &expected]);
    d.qed(&["commit", "top.qed"]);
    d.same("mid.qed", &expected);
    d.same("top.qed", &expected);
    d.expect_reads("bottom.raw", &[(0, 4 * M, 0x11)]);
    d.clean("mid.qed");
    d.clean("top.qed");
    assert_eq!(d.len("top.qed"), HEADER_AND_L1);
}

#[test]
fn commit_grows_a_shorter_base() {
    let d = Dir::new();
    d.raw_image("short.raw", "1M", &[(0, M, 0x10)]);
    d.qed_image("short.qed", "1M", &[], &[(0, M, 0x10)]);
    for (base, fmt) in [("short.raw", "raw"), ("short.qed", "qed")] {
        let top = format!("top-{fmt}.qed");
        let expected = commit_pair(&d, base, fmt, &top);
        d.qed(&["commit", &top]);
        assert_eq!(d.info(base)["virtual-size"], 4 * M);
        d.same(base, &expected);
        d.same(&top, &expected);
        d.clean(&top);
        if fmt == "qed" {
            d.clean(base);
        }
    }
}

// ----------------------------------------------------------------------------------
// rebase

#[test]
fn rebase_safe_onto_raw_and_qed_keeps_content() {
    let d = Dir::new();
    d.raw_image("old.raw", "4M", &[(0, M, 0x11), (2 * M, 64 * K, 0x12)]);
    d.raw_image("new.raw", "4M", &[(0, 256 * K, 0x11), (3 * M, M, 0xee)]);
    d.qed_image(
        "new.qed",
        "4M",
        &[],
        &[(0, 512 * K, 0x11), (M + 4 * K, 4 * K, 0x13)],
    );
    d.qed_image(
        "img.qed",
        "4M",
        &["-b", "old.raw", "-F", "raw"],
        &[(512 * K, 64 * K, 0x5a)],
    );
    d.img(&["convert", "-q", "-O", "raw", "img.qed", "snap.raw"]);

    d.qed(&["rebase", "-b", "new.raw", "-F", "raw", "img.qed"]);
    d.same("img.qed", "snap.raw");
    d.clean("img.qed");
    let i = d.info("img.qed");
    assert_eq!(i["backing-filename"], "new.raw", "{i:#}");
    assert_eq!(i["backing-filename-format"], "raw", "{i:#}");
    // Clusters equal in both backing files stay unallocated.
    let map = d.map("img.qed");
    assert!(
        map.iter()
            .any(|r| r["start"] == 0 && r["depth"] == 1 && r["length"] == 256 * K),
        "{map:?}"
    );

    d.qed(&["rebase", "-b", "new.qed", "img.qed"]);
    d.same("img.qed", "snap.raw");
    d.clean("img.qed");
    let i = d.info("img.qed");
    assert_eq!(i["backing-filename"], "new.qed", "{i:#}");
    // Only a raw backing file has its format recorded (NO_PROBE); QEMU probes the rest.
    assert!(i.get("backing-filename-format").is_none(), "{i:#}");
    assert_eq!(le64(&d.bytes("img.qed"), 0x10) & 0x5, 0x1);
}

#[test]
fn rebase_unsafe_only_renames() {
    let d = Dir::new();
    d.raw_image("old.raw", "4M", &[(0, M, 0x11)]);
    d.raw_image("new.raw", "4M", &[(0, M, 0x22), (3 * M, 64 * K, 0x23)]);
    d.qed_image(
        "img.qed",
        "4M",
        &["-b", "old.raw", "-F", "raw"],
        &[(512 * K, 64 * K, 0x5a)],
    );
    d.copy("img.qed", "qemu.qed");
    d.qed(&["rebase", "-u", "-b", "new.raw", "-F", "raw", "img.qed"]);
    d.img(&["rebase", "-u", "-b", "new.raw", "-F", "raw", "qemu.qed"]);
    // The header is rewritten exactly as QEMU rewrites it, and nothing else changes.
    assert!(d.bytes("img.qed") == d.bytes("qemu.qed"));
    assert_eq!(d.info("img.qed")["backing-filename"], "new.raw");
    d.expect_reads(
        "img.qed",
        &[
            (0, 512 * K, 0x22),
            (512 * K, 64 * K, 0x5a),
            (576 * K, 448 * K, 0x22),
            (3 * M, 64 * K, 0x23),
        ],
    );
    d.clean("img.qed");

    // A missing backing file is fine for an unsafe rebase.
    d.qed(&["rebase", "-u", "-b", "gone.qed", "img.qed"]);
    d.img(&["rebase", "-u", "-b", "gone.qed", "-F", "qed", "qemu.qed"]);
    assert!(d.bytes("img.qed") == d.bytes("qemu.qed"));
}

#[test]
fn rebase_to_no_backing_keeps_content() {
    let d = Dir::new();
    d.raw_image("old.raw", "4M", &[(0, M, 0x11), (3 * M, 4 * K, 0x12)]);
    d.qed_image(
        "img.qed",
        "4M",
        &["-b", "old.raw", "-F", "raw"],
        &[(512 * K, 64 * K, 0x5a)],
    );
    d.img(&["convert", "-q", "-O", "raw", "img.qed", "snap.raw"]);
    d.qed(&["rebase", "-b", "", "img.qed"]);
    let i = d.info("img.qed");
    assert!(i.get("backing-filename").is_none(), "{i:#}");
    let features = le64(&d.bytes("img.qed"), 0x10);
    assert_eq!(
        features & 0x5,
        0,
        "backing feature bits left: {features:#x}"
    );
    d.same("img.qed", "snap.raw");
    d.clean("img.qed");
}

/// `"./"` repeated, then an existing file's name: a name of exactly `len` bytes that
/// names `target` (whose name has the parity of `len`).
fn long_name(len: usize, target: &str) -> String {
    assert_eq!((len - target.len()) % 2, 0);
    format!("{}{target}", "./".repeat((len - target.len()) / 2))
}

#[test]
fn rebase_name_must_fit_in_the_header() {
    let d = Dir::new();
    d.raw_image("b.raw", "1M", &[(0, 4 * K, 0x11)]);
    d.raw_image("bb.raw", "1M", &[(0, 4 * K, 0x11)]);
    // 4k clusters: the header area holds 4096 - 64 = 4032 bytes of name.
    d.qed_image(
        "img.qed",
        "1M",
        &["-o", "cluster_size=4k"],
        &[(8 * K, 4 * K, 0x5a)],
    );
    let before = d.bytes("img.qed");
    let name = long_name(4033, "b.raw");
    let err = d.qed_fails(
        &["rebase", "-u", "-b", &name, "-F", "raw", "img.qed"],
        "4032",
    );
    assert!(err.contains("4033"), "{err}");
    let err = d.qed_fails(&["rebase", "-b", &name, "-F", "raw", "img.qed"], "4032");
    assert!(err.contains("4033"), "{err}");
    assert!(
        d.bytes("img.qed") == before,
        "a refused rebase changed the file"
    );

    // The longest name that fits, which QEMU reads back.
    let name = long_name(4032, "bb.raw");
    d.qed(&["rebase", "-u", "-b", &name, "-F", "raw", "img.qed"]);
    let i = d.info("img.qed");
    assert_eq!(i["backing-filename"], name.as_str());
    d.expect_reads("img.qed", &[(0, 4 * K, 0x11), (8 * K, 4 * K, 0x5a)]);
    d.clean("img.qed");
}

// ----------------------------------------------------------------------------------
// resize

#[test]
fn resize_grows_and_qemu_reads_zeros_past_the_old_end() {
    let d = Dir::new();
    d.qed_image("img.qed", "4M", &[], &[(0, 4 * M, 0x42)]);
    let len = d.len("img.qed");
    let out = d.qed(&["resize", "img.qed", "+10M"]);
    assert!(out.contains("Image resized."), "{out}");
    assert_eq!(d.info("img.qed")["virtual-size"], 14 * M);
    d.expect_reads("img.qed", &[(0, 4 * M, 0x42), (4 * M, 10 * M, 0)]);
    assert_eq!(d.len("img.qed"), len, "growing must only touch the header");
    d.qed(&["resize", "img.qed", "1G"]);
    assert_eq!(d.info("img.qed")["virtual-size"], G);
    d.expect_reads("img.qed", &[(0, 4 * M, 0x42), (G - M, M, 0)]);
    d.clean("img.qed");
    // Both qed and QEMU can allocate past the old end.
    d.qed(&["io", "-c", "write -P 0x44 900M 64k", "img.qed"]);
    d.expect_reads("img.qed", &[(900 * M, 64 * K, 0x44)]);
    d.io("qed", "img.qed", &["write -P 0x43 512M 64k".into()]);
    d.expect_reads("img.qed", &[(512 * M, 64 * K, 0x43)]);
    d.clean("img.qed");
}

#[test]
fn resize_refuses_past_the_maximum_and_unasked_shrinks() {
    let d = Dir::new();
    d.qed_image("img.qed", "4M", &[], &[(0, 4 * M, 0x42)]);
    d.qed_image("small.qed", "4M", &["-o", "cluster_size=4k"], &[]);
    let before = d.bytes("img.qed");
    // (64k * 4 * 64k / 8)^2 * 64k = 64 TiB.
    d.qed_fails(&["resize", "img.qed", "65T"], "70368744177664");
    d.qed_fails(&["resize", "img.qed", "+64T"], "70368744177664");
    d.qed_fails(&["resize", "img.qed", "3M"], "--shrink");
    d.qed_fails(&["resize", "img.qed", "-1M"], "--shrink");
    assert!(d.bytes("img.qed") == before);
    // The exact maximum is accepted.
    d.qed(&["resize", "img.qed", "64T"]);
    assert_eq!(d.info("img.qed")["virtual-size"], 64u64 << 40);
    // (4k * 4 * 4k / 8)^2 * 4k = 16 GiB.
    let before = d.bytes("small.qed");
    d.qed_fails(&["resize", "small.qed", "17G"], "17179869184");
    assert!(d.bytes("small.qed") == before);
}

#[test]
fn resize_shrink_drops_data_and_space() {
    let d = Dir::new();
    d.qed_image("img.qed", "4M", &[], &[(0, 4 * M, 0x42)]);
    let len = d.len("img.qed");
    d.qed(&["resize", "--shrink", "img.qed", "-1M"]);
    assert_eq!(d.info("img.qed")["virtual-size"], 3 * M);
    assert_eq!(
        d.len("img.qed"),
        len - M,
        "16 data clusters must be reclaimed"
    );
    d.clean("img.qed");
    d.expect_reads("img.qed", &[(0, 3 * M, 0x42)]);
    d.qed(&["resize", "img.qed", "4M"]);
    d.expect_reads("img.qed", &[(0, 3 * M, 0x42), (3 * M, M, 0)]);
    d.clean("img.qed");

    // Into the middle of a cluster: the kept part survives, the rest reads as zeros.
    d.qed(&["resize", "--shrink", "img.qed", "1000448"]);
    assert_eq!(d.info("img.qed")["virtual-size"], 1000448);
    // 16 clusters cover 1000448 bytes; the L2 table stays.
    assert_eq!(d.len("img.qed"), HEADER_AND_L1 + 4 * CLUSTER + 16 * CLUSTER);
    d.clean("img.qed");
    d.qed(&["resize", "img.qed", "4M"]);
    d.expect_reads(
        "img.qed",
        &[(0, 1000448, 0x42), (1000448, 4 * M - 1000448, 0)],
    );
    d.clean("img.qed");
}

// ----------------------------------------------------------------------------------
// measure

/// The fully allocated size by the format's arithmetic.
fn fully_allocated(size: u64, cluster: u64, table: u64) -> u64 {
    let table_bytes = table * cluster;
    let l2_coverage = table_bytes / 8 * cluster;
    cluster
        + table_bytes
        + size.div_ceil(l2_coverage) * table_bytes
        + size.div_ceil(cluster) * cluster
}

#[test]
fn measure_new_image() {
    let d = Dir::new();
    let j: Value =
        serde_json::from_str(&d.qed(&["measure", "--size", "1G", "--output=json"])).unwrap();
    assert_eq!(j["required"], HEADER_AND_L1, "{j:#}");
    assert_eq!(j["fully-allocated"], fully_allocated(G, 64 * K, 4), "{j:#}");
    assert_eq!(j["fully-allocated"], HEADER_AND_L1 + 4 * CLUSTER + G);

    let j: Value = serde_json::from_str(&d.qed(&[
        "measure",
        "--size",
        "100M",
        "-o",
        "cluster_size=4k,table_size=2",
        "--output=json",
    ]))
    .unwrap();
    assert_eq!(j["required"], 4 * K + 8 * K, "{j:#}");
    assert_eq!(
        j["fully-allocated"],
        fully_allocated(100 * M, 4 * K, 2),
        "{j:#}"
    );

    // qemu-img creates exactly `required` bytes.
    d.img(&["create", "-q", "-f", "qed", "new.qed", "1G"]);
    assert_eq!(d.len("new.qed"), HEADER_AND_L1);
}

#[test]
fn measure_then_convert_fits() {
    let d = Dir::new();
    let top = qcow2_chain(&d, "1.1");
    d.raw_image(
        "sparse.raw",
        "64M",
        &[(10 * M, 64 * K, 0x77), (40 * M, 4 * K, 0x78)],
    );
    for src in [top.as_str(), "sparse.raw"] {
        for (tag, opts) in [
            ("64k", "cluster_size=64k"),
            ("4k", "cluster_size=4k,table_size=2"),
        ] {
            let j: Value =
                serde_json::from_str(&d.qed(&["measure", "--output=json", "-o", opts, src]))
                    .unwrap();
            let dst = format!("{src}.{tag}.qed");
            d.qed(&["convert", "-o", opts, src, &dst]);
            d.same(src, &dst);
            let required = j["required"].as_u64().unwrap();
            assert!(
                d.len(&dst) <= required,
                "{dst} is {} bytes, measure said {required}",
                d.len(&dst)
            );
            assert!(required <= j["fully-allocated"].as_u64().unwrap(), "{j:#}");
        }
    }
}

// ----------------------------------------------------------------------------------
// check -r

/// Where things are in a QED file, read from its header and tables.
struct Layout {
    cluster: u64,
    entries: u64,
    l1: u64,
}

impl Layout {
    fn of(b: &[u8]) -> Self {
        let cluster = le32(b, 4);
        Self {
            cluster,
            entries: le32(b, 8) * cluster / 8,
            l1: le64(b, 0x28),
        }
    }

    fn l1_entry(&self, guest: u64) -> u64 {
        self.l1 + guest / (self.entries * self.cluster) * 8
    }

    fn l2_entry(&self, b: &[u8], guest: u64) -> u64 {
        let table = le64(b, self.l1_entry(guest));
        assert_ne!(table, 0, "no L2 table for guest offset {guest}");
        table + (guest / self.cluster % self.entries) * 8
    }

    fn data(&self, b: &[u8], guest: u64) -> u64 {
        le64(b, self.l2_entry(b, guest))
    }
}

/// Guest clusters of the check fixture and their patterns, in the order qemu-io writes
/// them. The L2 tables cover 2 GiB each, so 0, 2G and 4G use three tables. The file
/// ends with a data cluster (the last write), unless `table_last`.
const FIXTURE: [(u64, u8); 7] = [
    (0, 0x11),
    (64 * K, 0x22),
    (128 * K, 0x33),
    (192 * K, 0x44),
    (2 * G, 0x55),
    (4 * G, 0x66),
    (256 * K, 0x77),
];

/// A 6 GiB image with 64k clusters (so QEMU's leak count is exact) holding `FIXTURE`.
/// `header2` moves the L1 table one cluster on and makes the header two clusters long,
/// so that an aligned offset can point into the header.
fn check_fixture(d: &Dir, name: &str, header2: bool, table_last: bool) -> Layout {
    d.img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=64k",
        name,
        "6G",
    ]);
    if header2 {
        let b = d.bytes(name);
        let mut n = b[..CLUSTER as usize].to_vec();
        n[0x0c..0x10].copy_from_slice(&2u32.to_le_bytes());
        set_le64(&mut n, 0x28, 2 * CLUSTER);
        n.resize(2 * CLUSTER as usize, 0);
        n.extend_from_slice(&b[CLUSTER as usize..]);
        d.put(name, &n);
    }
    let writes: Vec<(u64, u64, u8)> = FIXTURE
        .iter()
        .take(if table_last { 6 } else { 7 })
        .map(|&(g, p)| (g, CLUSTER, p))
        .collect();
    d.write_runs("qed", name, &writes);
    d.clean(name);
    let b = d.bytes(name);
    let l = Layout::of(&b);
    // The last unit of the file is what the leak tests rely on.
    let last = b.len() as u64 - CLUSTER;
    if table_last {
        assert_eq!(le64(&b, l.l1_entry(4 * G)) + 3 * CLUSTER, last);
    } else {
        assert_eq!(l.data(&b, 256 * K), last);
    }
    l
}

/// The reads that must still hold: every fixture cluster except those in `damaged`,
/// plus `also`.
fn intact(damaged: &[u64], also: &[(u64, u64, u8)], table_last: bool) -> Vec<(u64, u64, u8)> {
    FIXTURE
        .iter()
        .take(if table_last { 6 } else { 7 })
        .filter(|(g, _)| !damaged.contains(g))
        .map(|&(g, p)| (g, CLUSTER, p))
        .chain(also.iter().copied())
        .collect()
}

/// What a repair case expects.
struct Expect<'a> {
    /// qemu-img check's exit code before the repair.
    qemu_before: i32,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    /// Exit code of `qed check -r all` and of qemu-img check afterwards.
    after: i32,
    /// Leaks qemu-img still counts afterwards.
    leaks_after: u64,
    /// Guest clusters the damage touched.
    damaged: &'a [u64],
    /// What the damaged clusters read after the repair.
    reads: &'a [(u64, u64, u8)],
    /// The file's length after the repair.
    len_after: u64,
}

fn assert_repairs(d: &Dir, name: &str, table_last: bool, e: Expect<'_>) {
    let (code, j) = d.qemu_check(name);
    assert_eq!(code, e.qemu_before, "qemu-img check before repair: {j:#}");
    let (code, j) = d.qed_check(name, None);
    assert_eq!(code, e.qemu_before, "qed check before repair: {j:#}");

    let (code, j) = d.qed_check(name, Some("all"));
    assert_eq!(code, e.after, "qed check -r all: {j:#}");
    assert_eq!(count(&j, "corruptions-fixed"), e.corruptions_fixed, "{j:#}");
    assert_eq!(count(&j, "leaks-fixed"), e.leaks_fixed, "{j:#}");
    assert_eq!(count(&j, "corruptions"), 0, "{j:#}");
    assert_eq!(count(&j, "leaks"), e.leaks_after, "{j:#}");
    assert_eq!(d.len(name), e.len_after, "file length after the repair");

    let (code, j) = d.qemu_check(name);
    assert_eq!(code, e.after, "qemu-img check after repair: {j:#}");
    assert_eq!(count(&j, "corruptions"), 0, "{j:#}");
    assert_eq!(count(&j, "leaks"), e.leaks_after, "{j:#}");
    assert_eq!(count(&j, "check-errors"), 0, "{j:#}");
    d.expect_reads(name, &intact(e.damaged, e.reads, table_last));
    // The repaired image is usable by QEMU for allocating writes.
    d.io("qed", name, &["write -P 0xf0 5G 64k".into()]);
    d.expect_reads(name, &[(5 * G, CLUSTER, 0xf0)]);
    let (code, j) = d.qemu_check(name);
    assert_eq!(code, e.after, "qemu-img check after a write: {j:#}");
}

/// Applies `f` to the bytes of `name`.
fn patch(d: &Dir, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = d.bytes(name);
    f(&mut b);
    d.put(name, &b);
}

#[test]
fn check_repairs_invalid_l1_entries() {
    let d = Dir::new();
    // Misaligned; past the end of the file; inside the header area. Each loses the
    // 2G table and its data cluster: 5 leaked clusters, all moved into or cut away.
    for (case, header2) in [("misaligned", false), ("past-eof", false), ("header", true)] {
        let name = format!("l1-{case}.qed");
        let l = check_fixture(&d, &name, header2, false);
        patch(&d, &name, |b| {
            let at = l.l1_entry(2 * G);
            let v = match case {
                "misaligned" => le64(b, at) + 512,
                "past-eof" => 1 << 40,
                _ => CLUSTER,
            };
            set_le64(b, at, v);
        });
        let len = d.len(&name);
        assert_repairs(
            &d,
            &name,
            false,
            Expect {
                qemu_before: 2,
                corruptions_fixed: 1,
                leaks_fixed: 5,
                after: 0,
                leaks_after: 0,
                damaged: &[2 * G],
                reads: &[(2 * G, CLUSTER, 0)],
                len_after: len - 5 * CLUSTER,
            },
        );
    }
}

#[test]
fn check_repairs_invalid_l2_entries() {
    let d = Dir::new();
    for (case, header2) in [("misaligned", false), ("past-eof", false), ("header", true)] {
        let name = format!("l2-{case}.qed");
        let l = check_fixture(&d, &name, header2, false);
        let len = d.len(&name);
        patch(&d, &name, |b| {
            let at = l.l2_entry(b, 128 * K);
            let v = match case {
                "misaligned" => le64(b, at) + 512,
                // Exactly at the end: the first offset that is out of the file.
                "past-eof" => len,
                _ => CLUSTER,
            };
            set_le64(b, at, v);
        });
        assert_repairs(
            &d,
            &name,
            false,
            Expect {
                qemu_before: 2,
                corruptions_fixed: 1,
                leaks_fixed: 1,
                after: 0,
                leaks_after: 0,
                damaged: &[128 * K],
                reads: &[(128 * K, CLUSTER, 0)],
                len_after: len - CLUSTER,
            },
        );
    }
}

#[test]
fn check_repairs_shared_data_cluster() {
    let d = Dir::new();
    let l = check_fixture(&d, "img.qed", false, false);
    let len = d.len("img.qed");
    patch(&d, "img.qed", |b| {
        let v = l.data(b, 64 * K);
        let at = l.l2_entry(b, 128 * K);
        set_le64(b, at, v);
    });
    // Both owners keep what they read before the repair: 0x22.
    assert_repairs(
        &d,
        "img.qed",
        false,
        Expect {
            qemu_before: 2,
            corruptions_fixed: 1,
            leaks_fixed: 1,
            after: 0,
            leaks_after: 0,
            damaged: &[128 * K],
            reads: &[(128 * K, CLUSTER, 0x22)],
            len_after: len,
        },
    );
    // Each owner has its own cluster now.
    let b = d.bytes("img.qed");
    let l = Layout::of(&b);
    assert_ne!(l.data(&b, 64 * K), l.data(&b, 128 * K));
    d.io("qed", "img.qed", &["write -P 0xa1 64k 64k".into()]);
    d.expect_reads(
        "img.qed",
        &[(64 * K, CLUSTER, 0xa1), (128 * K, CLUSTER, 0x22)],
    );
}

#[test]
fn check_repairs_shared_l2_table() {
    let d = Dir::new();
    let l = check_fixture(&d, "img.qed", false, false);
    let len = d.len("img.qed");
    patch(&d, "img.qed", |b| {
        let v = le64(b, l.l1_entry(2 * G));
        set_le64(b, l.l1_entry(4 * G), v);
    });
    // The 4G table and its data leak (5 clusters). The second owner gets a copy of the
    // table, whose one entry then shares a data cluster and gets a copy too.
    assert_repairs(
        &d,
        "img.qed",
        false,
        Expect {
            qemu_before: 2,
            corruptions_fixed: 2,
            leaks_fixed: 5,
            after: 0,
            leaks_after: 0,
            damaged: &[4 * G],
            reads: &[(4 * G, CLUSTER, 0x55)],
            len_after: len,
        },
    );
    d.io("qed", "img.qed", &["write -P 0xa2 4G 64k".into()]);
    d.expect_reads("img.qed", &[(2 * G, CLUSTER, 0x55), (4 * G, CLUSTER, 0xa2)]);
}

#[test]
fn check_repairs_overlapping_l2_tables() {
    let d = Dir::new();
    let l = check_fixture(&d, "img.qed", false, false);
    let len = d.len("img.qed");
    // The 4G table starts one cluster into the 2G table, so it shares three clusters
    // with it and its last cluster is the 4G data cluster (all 0x66 bytes).
    patch(&d, "img.qed", |b| {
        let v = le64(b, l.l1_entry(2 * G)) + CLUSTER;
        set_le64(b, l.l1_entry(4 * G), v);
    });
    // One shared table, plus the 8192 entries of 0x6666666666666666 in its copy. The old
    // 4G table and the 4G data cluster leak.
    assert_repairs(
        &d,
        "img.qed",
        false,
        Expect {
            qemu_before: 2,
            corruptions_fixed: 1 + CLUSTER / 8,
            leaks_fixed: 5,
            after: 0,
            leaks_after: 0,
            damaged: &[4 * G],
            reads: &[(4 * G, CLUSTER, 0)],
            len_after: len - CLUSTER,
        },
    );
}

#[test]
fn check_repairs_data_entry_pointing_at_metadata() {
    let d = Dir::new();
    for target in ["l1", "l2"] {
        let name = format!("at-{target}.qed");
        let l = check_fixture(&d, &name, false, false);
        let len = d.len(&name);
        patch(&d, &name, |b| {
            let v = match target {
                "l1" => l.l1,
                _ => le64(b, l.l1_entry(0)),
            };
            let at = l.l2_entry(b, 192 * K);
            set_le64(b, at, v);
        });
        assert_repairs(
            &d,
            &name,
            false,
            Expect {
                qemu_before: 2,
                corruptions_fixed: 1,
                leaks_fixed: 1,
                after: 0,
                leaks_after: 0,
                damaged: &[192 * K],
                reads: &[],
                len_after: len,
            },
        );
        // The metadata it pointed at is intact: the rest reads as before (checked
        // above), and the entry no longer shares a cluster with a table.
        let b = d.bytes(&name);
        let l = Layout::of(&b);
        let data = l.data(&b, 192 * K);
        assert!(data >= l.l1 + 4 * CLUSTER && data != le64(&b, l.l1_entry(0)));
    }
}

#[test]
fn check_reclaims_leaks_at_the_end() {
    let d = Dir::new();
    check_fixture(&d, "img.qed", false, false);
    let len = d.len("img.qed");
    patch(&d, "img.qed", |b| {
        b.extend(vec![0xee; 3 * CLUSTER as usize])
    });
    let (_, j) = d.qemu_check("img.qed");
    assert_eq!(count(&j, "leaks"), 3, "{j:#}");
    assert_repairs(
        &d,
        "img.qed",
        false,
        Expect {
            qemu_before: 3,
            corruptions_fixed: 0,
            leaks_fixed: 3,
            after: 0,
            leaks_after: 0,
            damaged: &[],
            reads: &[],
            len_after: len,
        },
    );
}

#[test]
fn check_reclaims_a_leak_in_the_middle_by_moving_the_last_cluster() {
    let d = Dir::new();
    let l = check_fixture(&d, "img.qed", false, false);
    let len = d.len("img.qed");
    patch(&d, "img.qed", |b| {
        let at = l.l2_entry(b, 64 * K);
        set_le64(b, at, 0);
    });
    let (_, j) = d.qemu_check("img.qed");
    assert_eq!(count(&j, "leaks"), 1, "{j:#}");
    let (code, j) = d.qed_check("img.qed", Some("all"));
    assert_eq!(code, 0, "{j:#}");
    assert_eq!(count(&j, "leaks-fixed"), 1, "{j:#}");
    assert_eq!(d.len("img.qed"), len - CLUSTER);
    d.clean("img.qed");
    d.expect_reads(
        "img.qed",
        &intact(&[64 * K], &[(64 * K, CLUSTER, 0)], false),
    );
}

/// A one-cluster hole below a four-cluster L2 table at the end of the file cannot be
/// filled: the table does not fit in it, and moving anything else would not let the
/// file shrink. The repair punches the hole out, but the cluster stays unreferenced, so
/// both checks still count it: exit code 3 with exactly one leak.
#[test]
fn check_punches_a_leak_that_cannot_be_moved() {
    let d = Dir::new();
    let l = check_fixture(&d, "img.qed", false, true);
    let len = d.len("img.qed");
    patch(&d, "img.qed", |b| {
        let at = l.l2_entry(b, 64 * K);
        set_le64(b, at, 0);
    });
    assert_repairs(
        &d,
        "img.qed",
        true,
        Expect {
            qemu_before: 3,
            corruptions_fixed: 0,
            // Released to the file system, though still counted.
            leaks_fixed: 1,
            after: 3,
            leaks_after: 1,
            damaged: &[64 * K],
            reads: &[(64 * K, CLUSTER, 0)],
            len_after: len,
        },
    );
}

#[test]
fn check_r_leaks_leaves_corruptions() {
    let d = Dir::new();
    let l = check_fixture(&d, "img.qed", false, false);
    let len = d.len("img.qed");
    patch(&d, "img.qed", |b| {
        let at = l.l2_entry(b, 128 * K);
        set_le64(b, at, 1 << 40);
        b.extend(vec![0xee; 2 * CLUSTER as usize]);
    });
    let (code, j) = d.qed_check("img.qed", Some("leaks"));
    assert_eq!(code, 2, "{j:#}");
    assert_eq!(count(&j, "corruptions"), 1, "{j:#}");
    assert_eq!(count(&j, "corruptions-fixed"), 0, "{j:#}");
    assert_eq!(count(&j, "leaks-fixed"), 3, "{j:#}");
    // The tail is cut; the cluster the bad entry used to own cannot be moved while the
    // image is corrupt, so it stays as an (empty) leak.
    assert_eq!(d.len("img.qed"), len);
    let (code, j) = d.qemu_check("img.qed");
    assert_eq!(code, 2, "{j:#}");
    assert_eq!(count(&j, "leaks"), 1, "{j:#}");
    d.expect_reads("img.qed", &intact(&[128 * K], &[], false));
    let v = le64(
        &d.bytes("img.qed"),
        l.l2_entry(&d.bytes("img.qed"), 128 * K),
    );
    assert_eq!(v, 1 << 40, "-r leaks must not touch table entries");
}

/// Sets NEED_CHECK (features bit 0x2 at 0x10).
fn set_need_check(b: &mut [u8]) {
    let f = le64(b, 0x10);
    set_le64(b, 0x10, f | 2);
}

#[test]
fn need_check_is_repaired_on_read_write_open() {
    let d = Dir::new();
    let l = check_fixture(&d, "img.qed", false, false);
    // What a crash can leave: an entry whose cluster never reached the disk.
    patch(&d, "img.qed", |b| {
        set_need_check(b);
        let at = l.l2_entry(b, 128 * K);
        let end = b.len() as u64;
        set_le64(b, at, end + CLUSTER);
    });
    // A read-only open neither repairs nor changes anything.
    let before = d.bytes("img.qed");
    d.qed(&["io", "-r", "-c", "read -P 0x11 0 4k", "img.qed"]);
    assert!(d.bytes("img.qed") == before);

    let out = d.expect(QED, &["io", "-c", "read -P 0x11 0 4k", "img.qed"], 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NEED_CHECK")
            && stderr.contains("repaired 1 corruptions")
            && stderr.contains("reclaimed 1 leaked"),
        "{stderr}"
    );
    assert_eq!(
        le64(&d.bytes("img.qed"), 0x10) & 2,
        0,
        "NEED_CHECK still set"
    );
    d.clean("img.qed");
    d.expect_reads(
        "img.qed",
        &intact(&[128 * K], &[(128 * K, CLUSTER, 0)], false),
    );

    // A clean image says nothing.
    let out = d.expect(QED, &["io", "-c", "read -P 0x11 0 4k", "img.qed"], 0);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The other read-write commands repair at open and say so too.
    let l = check_fixture(&d, "other.qed", false, false);
    patch(&d, "other.qed", |b| {
        set_need_check(b);
        let at = l.l2_entry(b, 64 * K);
        set_le64(b, at, 1 << 40);
    });
    let out = d.expect(QED, &["resize", "other.qed", "+1M"], 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NEED_CHECK") && stderr.contains("repaired 1 corruptions"),
        "{stderr}"
    );
    assert_eq!(le64(&d.bytes("other.qed"), 0x10) & 2, 0);
    assert_eq!(d.info("other.qed")["virtual-size"], 6 * G + M);
    d.clean("other.qed");
    d.expect_reads(
        "other.qed",
        &intact(&[64 * K], &[(64 * K, CLUSTER, 0)], false),
    );
}

#[test]
fn need_check_alone_is_cleared_by_check_r() {
    let d = Dir::new();
    check_fixture(&d, "img.qed", false, false);
    patch(&d, "img.qed", |b| set_need_check(b));
    let before = d.bytes("img.qed");
    let (code, j) = d.qed_check("img.qed", None);
    assert_eq!(code, 0, "{j:#}");
    assert!(
        d.bytes("img.qed") == before,
        "a check without -r changed the file"
    );
    let (code, j) = d.qed_check("img.qed", Some("all"));
    assert_eq!(code, 0, "{j:#}");
    let after = d.bytes("img.qed");
    assert_eq!(le64(&after, 0x10) & 2, 0, "NEED_CHECK still set");
    assert!(after[..0x10] == before[..0x10] && after[0x18..] == before[0x18..]);
    d.clean("img.qed");
}

// ----------------------------------------------------------------------------------
// bad arguments

/// Runs `qed ARGS`, expecting failure with `needle` on stderr, and asserts that none of
/// `files` changed.
fn refused(d: &Dir, args: &[&str], needle: &str, files: &[&str]) {
    let before: Vec<Vec<u8>> = files.iter().map(|f| d.bytes(f)).collect();
    d.qed_fails(args, needle);
    for (f, b) in files.iter().zip(before) {
        assert!(d.bytes(f) == b, "`qed {}` changed {f}", args.join(" "));
    }
}

#[test]
fn bad_arguments_change_nothing() {
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, M, 0x11)]);
    d.qed_image("src.qed", "4M", &[], &[(0, 4 * M, 0x42)]);
    d.qed_image(
        "top.qed",
        "4M",
        &["-b", "base.raw", "-F", "raw"],
        &[(M, 64 * K, 0x43)],
    );
    d.qed_image("dst.qed", "4M", &[], &[(0, 64 * K, 0x44)]);
    d.qed_image("small.qed", "1M", &[], &[(0, 64 * K, 0x45)]);
    let all = ["base.raw", "src.qed", "top.qed", "dst.qed", "small.qed"];

    refused(
        &d,
        &["convert", "missing.qed", "dst.qed"],
        "missing.qed",
        &all,
    );
    refused(
        &d,
        &["convert", "-f", "vmdk", "src.qed", "dst.qed"],
        "vmdk",
        &all,
    );
    refused(
        &d,
        &["convert", "-O", "vmdk", "src.qed", "dst.qed"],
        "vmdk",
        &all,
    );
    refused(
        &d,
        &["convert", "-O", "qcow2", "src.qed", "dst.qed"],
        "qcow2",
        &all,
    );
    refused(
        &d,
        &["convert", "-S", "1000", "src.qed", "dst.qed"],
        "-S",
        &all,
    );
    refused(
        &d,
        &["convert", "-o", "cluster_size=3k", "src.qed", "dst.qed"],
        "cluster",
        &all,
    );
    refused(&d, &["convert", "src.qed", "src.qed"], "same file", &all);
    refused(
        &d,
        &["convert", "-n", "src.qed", "small.qed"],
        "smaller than the source",
        &all,
    );
    refused(
        &d,
        &["convert", "-B", "missing.raw", "src.qed", "dst.qed"],
        "missing.raw",
        &all,
    );
    refused(
        &d,
        &["compare", "-f", "vmdk", "src.qed", "dst.qed"],
        "vmdk",
        &all,
    );
    refused(&d, &["resize", "src.qed", "1M"], "--shrink", &all);
    refused(&d, &["resize", "src.qed", "lots"], "lots", &all);
    refused(&d, &["resize", "-f", "raw", "base.raw", "8M"], "raw", &all);
    refused(
        &d,
        &["rebase", "-b", "missing.raw", "top.qed"],
        "missing.raw",
        &all,
    );
    refused(
        &d,
        &["rebase", "-b", "base.raw", "-F", "vmdk", "top.qed"],
        "vmdk",
        &all,
    );
    refused(&d, &["commit", "src.qed"], "no backing file", &all);
    refused(&d, &["commit", "missing.qed"], "missing.qed", &all);
    refused(&d, &["measure", "-O", "raw", "--size", "1G"], "qed", &all);
    refused(&d, &["check", "-r", "all", "base.raw"], "QED", &all);

    // Names longer than the header area (64k - 64 bytes) or than 4095 bytes.
    d.raw_image("b.raw", "4M", &[]);
    let name = long_name(4097, "b.raw");
    refused(&d, &["rebase", "-u", "-b", &name, "top.qed"], "4095", &all);
    refused(&d, &["rebase", "-b", &name, "top.qed"], "4095", &all);
    // With 4k clusters the header area holds 4096 - 64 bytes of name.
    let name = long_name(4033, "b.raw");
    refused(
        &d,
        &[
            "convert",
            "-o",
            "cluster_size=4k",
            "-B",
            &name,
            "-F",
            "raw",
            "src.qed",
            "dst.qed",
        ],
        "4032",
        &all,
    );
}

#[test]
fn writing_into_the_source_chain_is_refused() {
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, M, 0x11)]);
    d.qed_image(
        "mid.qed",
        "4M",
        &["-b", "base.raw", "-F", "raw"],
        &[(M, 64 * K, 0x12)],
    );
    d.qed_image(
        "top.qed",
        "4M",
        &["-b", "mid.qed", "-F", "qed"],
        &[(2 * M, 64 * K, 0x13)],
    );
    let all = ["base.raw", "mid.qed", "top.qed"];
    // The destination is a backing file of the source, however it is spelled.
    refused(
        &d,
        &["convert", "-O", "raw", "top.qed", "base.raw"],
        "backing file of the source",
        &all,
    );
    let other_spelling = format!("{}/./base.raw", d.path("").display());
    refused(
        &d,
        &["convert", "-O", "raw", "top.qed", &other_spelling],
        "backing file of the source",
        &all,
    );
    refused(
        &d,
        &["convert", "top.qed", "mid.qed"],
        "backing file of the source",
        &all,
    );
    refused(
        &d,
        &["convert", "-n", "top.qed", "mid.qed"],
        "backing file of the source",
        &all,
    );
    // The new backing file of the destination is the destination itself.
    d.raw_image("src.raw", "4M", &[(0, 64 * K, 0x14)]);
    d.qed_image("dst.qed", "4M", &[], &[(0, 64 * K, 0x15)]);
    refused(
        &d,
        &[
            "convert", "-B", "dst.qed", "-F", "qed", "src.raw", "dst.qed",
        ],
        "own backing chain",
        &["src.raw", "dst.qed"],
    );
    // A rebase that would make an image its own backing file, directly or through
    // another image of the chain.
    for mode in [&[][..], &["-u"][..]] {
        let mut args = vec!["rebase"];
        args.extend_from_slice(mode);
        args.extend_from_slice(&["-b", "top.qed", "-F", "qed", "top.qed"]);
        refused(&d, &args, "backing file of itself", &all);
    }
    refused(
        &d,
        &["rebase", "-b", "top.qed", "-F", "qed", "mid.qed"],
        "backing file of itself",
        &all,
    );
    // The chain still reads as it was.
    d.expect_reads(
        "top.qed",
        &[(0, M, 0x11), (M, 64 * K, 0x12), (2 * M, 64 * K, 0x13)],
    );
}

#[test]
fn refusals_leave_an_image_with_need_check_untouched() {
    // A read-write open of such an image repairs it; a refused command must not get
    // that far.
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, M, 0x11)]);
    d.qed_image(
        "top.qed",
        "4M",
        &["-b", "base.raw", "-F", "raw"],
        &[(M, 64 * K, 0x43)],
    );
    d.qed_image("alone.qed", "4M", &[], &[(0, 64 * K, 0x44)]);
    d.qed_image("src.qed", "8M", &[], &[(0, 64 * K, 0x45)]);
    patch(&d, "top.qed", |b| set_need_check(b));
    patch(&d, "alone.qed", |b| set_need_check(b));
    let all = ["base.raw", "top.qed", "alone.qed", "src.qed"];
    let name = long_name(4098, "base.raw");
    refused(&d, &["rebase", "-u", "-b", &name, "top.qed"], "4095", &all);
    refused(
        &d,
        &["rebase", "-b", "missing.raw", "top.qed"],
        "missing.raw",
        &all,
    );
    refused(&d, &["resize", "top.qed", "1M"], "--shrink", &all);
    refused(&d, &["resize", "top.qed", "1P"], "maximum", &all);
    refused(&d, &["commit", "alone.qed"], "no backing file", &all);
    refused(
        &d,
        &["convert", "-n", "src.qed", "alone.qed"],
        "smaller than the source",
        &all,
    );
    refused(
        &d,
        &[
            "convert",
            "-n",
            "-o",
            "cluster_size=4k",
            "src.qed",
            "alone.qed",
        ],
        "-o has no effect",
        &all,
    );
}

/// Errors about a file name it exactly once, and a file that is not QED says so.
#[test]
fn errors_name_the_file_once() {
    let d = Dir::new();
    std::fs::write(d.path("notes.txt"), "hello\n").unwrap();
    let stderr_of = |args: &[&str]| {
        let out = d.run(QED, args);
        assert_ne!(
            out.status.code(),
            Some(0),
            "{}",
            d.describe(QED, args, &out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let once = |text: &str, name: &str| {
        assert_eq!(
            text.matches(name).count(),
            1,
            "{name} named once in: {text}"
        );
    };

    // Probed, a text file is a raw image, to us as to qemu-img.
    let out = d.qed(&["info", "notes.txt"]);
    assert!(out.contains("file format: raw"), "{out}");
    for args in [
        &["check", "notes.txt"][..],
        &["info", "-f", "qed", "notes.txt"],
    ] {
        let e = stderr_of(args);
        assert!(
            e.contains("notes.txt is not a QED image (no QED magic"),
            "{args:?}: {e}"
        );
        once(&e, "notes.txt");
    }
    for args in [
        &["info", "missing.qed"][..],
        &["compare", "missing.qed", "notes.txt"],
        &["convert", "missing.qed", "out.qed"],
        &["resize", "missing.qed", "2M"],
        &["create", "-b", "missing.qed", "-F", "qed", "top.qed"],
    ] {
        let e = stderr_of(args);
        assert!(e.contains("missing.qed: No such file"), "{args:?}: {e}");
        once(&e, "missing.qed");
    }

    // A backing file that went away is named once, by the image that needs it.
    d.qed(&["create", "base.qed", "1M"]);
    d.qed(&["create", "-b", "base.qed", "-F", "qed", "top.qed"]);
    std::fs::remove_file(d.path("base.qed")).unwrap();
    let e = stderr_of(&["io", "-c", "read 0 512", "top.qed"]);
    assert!(e.contains("backing file base.qed: No such file"), "{e}");
    once(&e, "base.qed");
}

// ----------------------------------------------------------------------------------
// discard, compact, defrag

/// Discards `(offset, len)` runs through `qed io`, and zeroes them in `reference`
/// through qemu-io (a whole-cluster discard reads as zeros afterwards).
fn discard_runs(d: &Dir, file: &str, reference: &str, runs: &[(u64, u64)]) {
    let mut args = vec![];
    let cmds: Vec<String> = runs
        .iter()
        .map(|(off, len)| format!("discard {off} {len}"))
        .collect();
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    let mut all = vec!["io"];
    all.extend(args);
    all.push(file);
    d.qed(&all);
    let zeros: Vec<String> = runs
        .iter()
        .map(|(off, len)| format!("write -z {off} {len}"))
        .collect();
    d.io("raw", reference, &zeros);
}

#[test]
fn discard_frees_clusters_and_compact_gives_the_space_back() {
    let d = Dir::new();
    // qemu-io writes 32 MiB in 64 runs of 512 KiB, each with its own pattern.
    let writes: Vec<(u64, u64, u8)> = (0..64u64)
        .map(|i| (i * 512 * K, 512 * K, 0x10 + i as u8))
        .collect();
    d.qed_image("img.qed", "64M", &[], &writes);
    d.raw_image("ref.raw", "64M", &writes);
    // Every third cluster, and one long run: scattered free space below the end.
    let mut runs: Vec<(u64, u64)> = (0..512u64)
        .filter(|c| c % 3 == 0)
        .map(|c| (c * CLUSTER, CLUSTER))
        .collect();
    runs.push((20 * M, 4 * M));
    discard_runs(&d, "img.qed", "ref.raw", &runs);
    d.same("img.qed", "ref.raw");
    // The close parked the freed clusters back under the entries that dropped them, as
    // holes: nothing leaks, and the discarded clusters take no disk space any more.
    let (code, j) = d.qemu_check("img.qed");
    assert_eq!(count(&j, "corruptions"), 0, "{j:#}");
    assert_eq!((code, count(&j, "leaks")), (0, 0), "{j:#}");
    let freed: std::collections::BTreeSet<u64> = runs
        .iter()
        .flat_map(|&(off, len)| off / CLUSTER..(off + len) / CLUSTER)
        .collect();
    let discarded = freed.len() as u64 * CLUSTER;
    assert!(
        d.disk_usage("img.qed") <= d.len("img.qed") - discarded,
        "{} bytes on disk for a {}-byte file that had {discarded} bytes discarded",
        d.disk_usage("img.qed"),
        d.len("img.qed")
    );
    let before = d.len("img.qed");

    d.qed(&["compact", "img.qed"]);
    d.clean("img.qed");
    d.same("img.qed", "ref.raw");
    // Header, L1, one L2 table and the clusters that hold data: nothing more.
    let (_, j) = d.qemu_check("img.qed");
    let data = count(&j, "allocated-clusters") * CLUSTER;
    assert_eq!(d.len("img.qed"), HEADER_AND_L1 + 4 * CLUSTER + data);
    assert!(d.len("img.qed") < before - 10 * M, "{before}");
    // QEMU writes into the compacted image, and we read what it wrote.
    d.io(
        "qed",
        "img.qed",
        &[format!("write -P 0xee {} {}", 3 * M, 128 * K)],
    );
    d.io(
        "raw",
        "ref.raw",
        &[format!("write -P 0xee {} {}", 3 * M, 128 * K)],
    );
    d.clean("img.qed");
    d.same("img.qed", "ref.raw");
}

#[test]
fn defrag_puts_guest_order_into_file_order() {
    let d = Dir::new();
    // Clusters written last to first: the file holds them in reverse guest order.
    let writes: Vec<(u64, u64, u8)> = (0..128u64)
        .rev()
        .map(|c| (c * CLUSTER, CLUSTER, 0x20 + (c % 200) as u8))
        .collect();
    d.qed_image("img.qed", "16M", &[], &writes);
    d.raw_image("ref.raw", "16M", &writes);
    let runs = |d: &Dir| {
        d.map("img.qed")
            .iter()
            .filter(|r| r["data"] == true)
            .count()
    };
    assert!(
        runs(&d) > 64,
        "qemu-img wrote the clusters in order after all"
    );

    d.qed(&["defrag", "-p", "img.qed"]);
    d.clean("img.qed");
    d.same("img.qed", "ref.raw");
    let map = d.map("img.qed");
    let data: Vec<&Value> = map.iter().filter(|r| r["data"] == true).collect();
    assert_eq!(data.len(), 1, "one run of data, in order: {map:#?}");
    // Right after the header, L1 and the L2 table.
    assert_eq!(data[0]["offset"], HEADER_AND_L1 + 4 * CLUSTER);
    assert_eq!(
        d.len("img.qed"),
        HEADER_AND_L1 + 4 * CLUSTER + 128 * CLUSTER
    );
}

#[test]
fn compact_and_defrag_refuse_what_they_cannot_do() {
    let d = Dir::new();
    d.raw_image("disk.raw", "1M", &[(0, 4 * K, 0x11)]);
    d.qed_fails(&["compact", "-f", "raw", "disk.raw"], "qed");
    d.qed_image("img.qed", "1M", &[], &[(0, 4 * K, 0x11)]);
    // A pointer to a table past the end of the file: corrupt.
    let mut b = d.bytes("img.qed");
    let l1 = le64(&b, 40);
    set_le64(&mut b, l1, 1 << 40);
    d.put("bad.qed", &b);
    let err = d.qed_fails(&["defrag", "bad.qed"], "check -r all");
    assert!(err.contains("bad.qed"), "{err}");
}

// ----------------------------------------------------------------------------------
// The options qemu-img users pass: -o keys, repeated options, qcow2 backing files,
// info --backing-chain, commit -b, compare's messages.

/// Guest contents as a list of `(offset, len, byte)` writes applied in order to zeros.
fn model(size: u64, writes: &[(u64, u64, u8)]) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    for &(off, len, b) in writes {
        m[off as usize..(off + len) as usize].fill(b);
    }
    m
}

impl Dir {
    /// The guest contents of `file` as qemu-img reads them.
    fn contents(&self, file: &str) -> Vec<u8> {
        let raw = format!("{file}.contents.raw");
        let _ = std::fs::remove_file(self.path(&raw));
        self.img(&["convert", "-q", "-O", "raw", file, &raw]);
        self.bytes(&raw)
    }

    /// Asserts that qemu-img reads `file` as `expected`, naming the first difference.
    fn reads_as(&self, file: &str, expected: &[u8]) {
        let got = self.contents(file);
        assert_eq!(got.len(), expected.len(), "{file}: size");
        if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
            panic!(
                "{file}: byte {i} reads {:#x}, the model says {:#x}",
                got[i], expected[i]
            );
        }
    }
}

/// QED header features (offset 0x10).
fn features(b: &[u8]) -> u64 {
    le64(b, 0x10)
}
const BACKING_FILE: u64 = 1;
const NO_PROBE: u64 = 4;

#[test]
fn convert_o_backing_file_acts_as_dash_b() {
    let d = Dir::new();
    d.raw_image(
        "back.raw",
        "4M",
        &[(0, M, 0x11), (2 * M, 64 * K, 0x99), (3 * M, 64 * K, 0x11)],
    );
    d.img(&[
        "convert", "-q", "-f", "raw", "-O", "raw", "back.raw", "src.raw",
    ]);
    d.io(
        "raw",
        "src.raw",
        &["write -P 0xab 1536k 8k".into(), "write -z 2M 64k".into()],
    );
    d.img(&[
        "convert", "-q", "-f", "raw", "-O", "qed", "back.raw", "back.qed",
    ]);
    let cases: [(&str, &[&str], Option<&str>); 3] = [
        (
            "one.qed",
            &["-o", "backing_file=back.qed,backing_fmt=qed"],
            None,
        ),
        (
            "two.qed",
            &[
                "-o",
                "backing_file=back.raw",
                "-o",
                "backing_fmt=raw,cluster_size=64k",
            ],
            Some("raw"),
        ),
        // -B wins over -o backing_file, as -b does in qemu-img create.
        (
            "three.qed",
            &["-B", "back.qed", "-F", "qed", "-o", "backing_file=back.raw"],
            None,
        ),
    ];
    for (dst, opts, fmt) in cases {
        let mut args = vec!["convert", "-f", "raw"];
        args.extend(opts);
        args.extend(["src.raw", dst]);
        d.qed(&args);
        d.same("src.raw", dst);
        d.clean(dst);
        let info = d.info(dst);
        let back = if dst == "two.qed" {
            "back.raw"
        } else {
            "back.qed"
        };
        assert_eq!(info["backing-filename"], back, "{dst}: {info:#}");
        assert_eq!(
            info.get("backing-filename-format").and_then(Value::as_str),
            fmt,
            "{dst}: {info:#}"
        );
        let map = d.map(dst);
        let own: Vec<(u64, u64)> = map
            .iter()
            .filter(|r| r["depth"] == 0 && r["present"] == true)
            .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
            .collect();
        // Only what differs from the backing file is the image's own.
        assert_eq!(own, [(1536 * K, 64 * K), (2 * M, 64 * K)], "{dst}: {map:?}");
        assert_eq!(data_bytes(&map, 0), 64 * K, "{dst}: {map:?}");
    }
}

#[test]
fn o_keys_take_effect_or_are_refused_by_name() {
    let d = Dir::new();
    d.qed_image("base.qed", "3M", &[], &[(0, 64 * K, 0x21)]);
    // What ours creates with -o is byte for byte what qemu-img creates with it.
    let lists: [&[&str]; 4] = [
        &["-o", "size=2M"],
        &["-o", "size=5M,cluster_size=16k,table_size=2"],
        &["-o", "backing_file=base.qed,backing_fmt=raw"],
        &[
            "-o",
            "backing_file=base.qed",
            "-o",
            "backing_fmt=qed,size=1M",
        ],
    ];
    for (i, opts) in lists.iter().enumerate() {
        let (ours, theirs) = (format!("o{i}.qed"), format!("q{i}.qed"));
        let mut a = vec!["create", "-q", "-f", "qed"];
        a.extend(*opts);
        d.qed(&[a.as_slice(), &[ours.as_str()]].concat());
        d.img(&[a.as_slice(), &[theirs.as_str()]].concat());
        assert_eq!(d.bytes(&ours), d.bytes(&theirs), "{opts:?}");
        d.clean(&ours);
    }
    assert_eq!(d.info("o0.qed")["virtual-size"], 2 * M);
    assert_eq!(d.info("o2.qed")["backing-filename-format"], "raw");

    // Given twice, the size is refused, as qemu-img refuses it.
    d.qed_fails(&["create", "-o", "size=1M", "twice.qed", "1M"], "only once");
    d.expect(
        QEMU_IMG,
        &["create", "-f", "qed", "-o", "size=1M", "twice.qed", "1M"],
        1,
    );
    // Keys a command does not take are refused by name, and nothing is created.
    let refusals: [&[&str]; 5] = [
        &["create", "-o", "foo=1", "x.qed", "1M"],
        &["convert", "-o", "size=1M", "base.qed", "x.qed"],
        &["convert", "-o", "preallocation=full", "base.qed", "x.qed"],
        &["measure", "--size", "1M", "-o", "backing_file=base.qed"],
        &["measure", "--size", "1M", "-o", "size=2M"],
    ];
    for args in refusals {
        let key = args
            .iter()
            .find_map(|a| a.split_once('=').map(|(k, _)| k))
            .unwrap();
        let err = d.qed_fails(args, &format!("'{key}'"));
        assert!(err.contains("takes"), "{err}");
        assert!(!d.path("x.qed").exists(), "{args:?} created x.qed");
    }
    // A backing format without a backing file has nothing to apply to.
    d.qed_fails(
        &["convert", "-o", "backing_fmt=qed", "base.qed", "x.qed"],
        "needs a backing file",
    );
    // measure applies its geometry keys.
    let out = d.qed(&[
        "measure",
        "--output=json",
        "--size",
        "1G",
        "-o",
        "cluster_size=4k,table_size=1",
    ]);
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["fully-allocated"], fully_allocated(G, 4 * K, 1), "{j}");
}

#[test]
fn repeated_options_take_their_last_value() {
    let d = Dir::new();
    d.qed_image("base.qed", "2M", &[], &[(0, 64 * K, 0x21)]);
    // qemu-img takes the last -F: raw, which sets the no-probe bit.
    for (tool, name) in [(QED, "ours.qed"), (QEMU_IMG, "theirs.qed")] {
        d.ok(
            tool,
            &[
                "create", "-q", "-f", "qed", "-F", "qed", "-F", "raw", "-b", "base.qed", name,
            ],
        );
    }
    assert_eq!(d.bytes("ours.qed"), d.bytes("theirs.qed"));
    assert_ne!(features(&d.bytes("ours.qed")) & NO_PROBE, 0);
    d.qed(&[
        "create",
        "-q",
        "-F",
        "qed",
        "-F",
        "qed",
        "-b",
        "base.qed",
        "plain.qed",
    ]);
    assert_eq!(features(&d.bytes("plain.qed")) & NO_PROBE, 0);
    // Repeated -o lists merge, a later key winning.
    d.qed(&[
        "create",
        "-q",
        "-o",
        "cluster_size=4k",
        "-o",
        "cluster_size=16k",
        "c.qed",
        "1M",
    ]);
    assert_eq!(d.info("c.qed")["cluster-size"], 16 * K);
    // Repeated flags and single values elsewhere.
    let out = d.qed(&[
        "info",
        "--output=human",
        "--output=json",
        "-f",
        "qed",
        "base.qed",
    ]);
    let j: Value = serde_json::from_str(&out).expect("the last --output is json");
    assert_eq!(j["format"], "qed");
    d.qed(&[
        "compare", "-f", "raw", "-f", "qed", "-p", "-p", "base.qed", "base.qed",
    ]);
    // -c of io still collects every command, in order.
    let out = d.qed(&[
        "io",
        "-c",
        "write -P 0x5c 0 4k",
        "-c",
        "read -P 0x5c 0 4k",
        "-c",
        "write -P 0x5d 4k 4k",
        "c.qed",
    ]);
    assert_eq!(out.matches("wrote 4096/4096").count(), 2, "{out}");
    assert_eq!(out.matches("read 4096/4096").count(), 1, "{out}");
    d.expect_reads("c.qed", &[(0, 4 * K, 0x5c), (4 * K, 4 * K, 0x5d)]);
}

#[test]
fn qcow2_backing_file_with_create_and_rebase() {
    let d = Dir::new();
    let base_writes = [(0, M, 0x11), (3 * M, 64 * K, 0x12)];
    d.raw_image("base.raw", "4M", &base_writes);
    d.img(&["convert", "-q", "-O", "qcow2", "base.raw", "base.qcow2"]);

    // create: the name is stored without the no-probe bit, byte for byte as qemu-img.
    d.qed(&["create", "-q", "-b", "base.qcow2", "-F", "qcow2", "top.qed"]);
    d.img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ref.qed",
    ]);
    assert_eq!(d.bytes("top.qed"), d.bytes("ref.qed"));
    let f = features(&d.bytes("top.qed"));
    assert_eq!(f & (BACKING_FILE | NO_PROBE), BACKING_FILE, "{f:#x}");
    // Probed as qcow2 when -F is left out.
    d.qed(&["create", "-q", "-b", "base.qcow2", "probed.qed"]);
    assert_eq!(d.bytes("probed.qed"), d.bytes("ref.qed"));

    // Written by us over the qcow2 base, read by both through it.
    let top_writes = [(512 * K, 64 * K, 0x33), (3 * M + 4 * K, 4 * K, 0x34)];
    for (off, len, b) in top_writes {
        d.qed(&[
            "io",
            "-c",
            &format!("write -P {b:#x} {off} {len}"),
            "top.qed",
        ]);
    }
    let expected = model(4 * M, &[&base_writes[..], &top_writes[..]].concat());
    d.put("expected.raw", &expected);
    d.same("top.qed", "expected.raw");
    d.reads_as("top.qed", &expected);
    d.qed(&["compare", "top.qed", "expected.raw"]);
    d.expect_reads("top.qed", &[(0, 4 * K, 0x11), (512 * K, 4 * K, 0x33)]);
    d.clean("top.qed");
    assert_eq!(d.info("top.qed")["backing-filename"], "base.qcow2");

    // rebase, safe: from a raw base to the qcow2 copy of other contents.
    d.raw_image("other.raw", "4M", &[(0, 2 * M, 0x41)]);
    d.qed_image(
        "moved.qed",
        "4M",
        &["-b", "other.raw", "-F", "raw"],
        &[(M, 64 * K, 0x42)],
    );
    let before = d.contents("moved.qed");
    d.qed(&["rebase", "-b", "base.qcow2", "-F", "qcow2", "moved.qed"]);
    let b = d.bytes("moved.qed");
    assert_eq!(features(&b) & (BACKING_FILE | NO_PROBE), BACKING_FILE);
    assert_eq!(d.info("moved.qed")["backing-filename"], "base.qcow2");
    d.reads_as("moved.qed", &before);
    d.clean("moved.qed");
    // rebase, unsafe: only the name, as qemu-img rebase -u writes it.
    d.qed_image("u.qed", "4M", &["-b", "other.raw", "-F", "raw"], &[]);
    d.copy("u.qed", "u-ref.qed");
    d.qed(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "u.qed"]);
    d.img(&[
        "rebase",
        "-u",
        "-f",
        "qed",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "u-ref.qed",
    ]);
    assert_eq!(d.bytes("u.qed"), d.bytes("u-ref.qed"));
    d.same("u.qed", "base.raw");
    d.qed(&["compare", "u.qed", "base.raw"]);
}

/// `info --backing-chain` of ours and of qemu-img, JSON and text, run in `d`'s directory
/// `from` (a subdirectory changes the relative paths both print).
fn assert_chain_info_matches(d: &Dir, from: &str, top: &str, layers: usize) {
    let cwd = d.path(from);
    let run = |prog: &str, args: &[&str]| {
        let out = Command::new(prog)
            .args(args)
            .current_dir(&cwd)
            .output()
            .expect("run");
        assert!(out.status.success(), "{prog} {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let mut ours: Value = serde_json::from_str(&run(
        QED,
        &["info", "--backing-chain", "--output=json", top],
    ))
    .unwrap();
    let theirs: Value = serde_json::from_str(&run(
        QEMU_IMG,
        &["info", "--backing-chain", "--output=json", top],
    ))
    .unwrap();
    let list = ours.as_array_mut().expect("an array, top first");
    assert_eq!(list.len(), layers, "{theirs:#}");
    // Ours adds a QED image's table and header sizes; everything else is qemu-img's.
    for info in list.iter_mut() {
        let o = info.as_object_mut().unwrap();
        if o["format"] == "qed" {
            assert!(o.remove("table-size").is_some());
            assert!(o.remove("header-size").is_some());
        }
    }
    assert_eq!(
        ours, theirs,
        "info --backing-chain {top} from {from}: ours, qemu-img"
    );
    let text = |s: String| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with("table_size:"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        text(run(QED, &["info", "--backing-chain", top])),
        text(run(QEMU_IMG, &["info", "--backing-chain", top])),
        "info --backing-chain {top} from {from}: ours, qemu-img"
    );
    // Without --backing-chain: the top's object alone.
    let one: Value = serde_json::from_str(&run(QED, &["info", "--output=json", top])).unwrap();
    assert_eq!(one["filename"], theirs[0]["filename"]);
    assert!(one.is_object());
}

#[test]
fn info_backing_chain_matches_qemu_img() {
    let d = Dir::new();
    std::fs::create_dir(d.path("sub")).unwrap();
    d.raw_image("sub/base.raw", "4M", &[(0, 64 * K, 0x11)]);
    d.img(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        "sub/base.raw",
        "sub/base.qcow2",
    ]);
    // qcow2 v2 <- qcow2 v3 (recording its backing format) <- qed <- qed
    d.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "sub/mid.qcow2",
    ]);
    d.qed(&[
        "create",
        "-q",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "sub/low.qed",
    ]);
    d.qed(&["create", "-q", "-b", "low.qed", "-F", "qed", "sub/top.qed"]);
    d.qed(&["io", "-c", "write -P 0x22 64k 64k", "sub/top.qed"]);
    // raw <- qed, the raw file not a whole number of sectors long.
    std::fs::write(d.path("sub/odd.raw"), vec![7u8; 1000]).unwrap();
    d.qed(&[
        "create",
        "-q",
        "-b",
        "odd.raw",
        "-F",
        "raw",
        "sub/over.qed",
        "1M",
    ]);
    // A qcow2 image over them all: the top need not be QED.
    d.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "top.qed",
        "-F",
        "qed",
        "sub/q.qcow2",
    ]);
    for (from, prefix) in [("", "sub/"), ("sub", "")] {
        assert_chain_info_matches(&d, from, &format!("{prefix}top.qed"), 4);
        assert_chain_info_matches(&d, from, &format!("{prefix}over.qed"), 2);
        assert_chain_info_matches(&d, from, &format!("{prefix}q.qcow2"), 5);
        assert_chain_info_matches(&d, from, &format!("{prefix}base.raw"), 1);
    }
    // The relative name and where it leads, as qemu-img prints them.
    let out = d.qed(&["info", "sub/top.qed"]);
    assert!(
        out.contains("backing file: low.qed (actual path: sub/low.qed)"),
        "{out}"
    );
}

/// A 3-layer QED chain: base <- mid <- top, with data, zero clusters and partial
/// clusters at every level; returns the writes, in order, that make the top's contents.
fn three_layers(d: &Dir, dir: &str) -> Vec<(u64, u64, u8)> {
    std::fs::create_dir_all(d.path(dir)).unwrap();
    let p = |n: &str| format!("{dir}/{n}");
    let base = vec![(0, 2 * M, 0x10), (3 * M, 512 * K, 0x11)];
    d.qed_image(&p("base.qed"), "4M", &[], &base);
    d.qed_image(
        &p("mid.qed"),
        "4M",
        &["-b", "base.qed", "-F", "qed"],
        &[(512 * K, 256 * K, 0x20), (3 * M + 4 * K, 100, 0x21)],
    );
    d.io("qed", &p("mid.qed"), &["write -z 1M 64k".into()]);
    d.qed_image(&p("top.qed"), "4M", &["-b", "mid.qed", "-F", "qed"], &[]);
    let top = vec![(640 * K, 64 * K, 0x30), (1536 * K, 4 * K, 0x31)];
    d.write_runs("qed", &p("top.qed"), &top);
    d.io("qed", &p("top.qed"), &["write -z 0 64k".into()]);
    let mut all = base;
    all.extend([
        (512 * K, 256 * K, 0x20),
        (3 * M + 4 * K, 100, 0x21),
        (M, 64 * K, 0),
    ]);
    all.extend(top);
    all.push((0, 64 * K, 0));
    all
}

#[test]
fn commit_b_into_a_deeper_base() {
    let d = Dir::new();
    let writes = three_layers(&d, "ours");
    three_layers(&d, "qemu");
    let expected = model(4 * M, &writes);
    d.reads_as("ours/top.qed", &expected);
    let (top_bytes, mid_bytes) = (d.bytes("ours/top.qed"), d.bytes("ours/mid.qed"));

    // BASE is relative to the directory of the image above it, not to ours.
    let out = d.qed(&["commit", "-b", "base.qed", "ours/top.qed"]);
    assert!(out.contains("Image committed."), "{out}");
    d.img(&["commit", "-q", "-b", "base.qed", "qemu/top.qed"]);

    // The base now reads as the top did; qemu-img's commit agrees.
    d.reads_as("ours/base.qed", &expected);
    d.same("ours/base.qed", "qemu/base.qed");
    d.clean("ours/base.qed");
    // -b implies -d: the top keeps its data and its backing file, and reads the same.
    assert_eq!(d.bytes("ours/top.qed"), top_bytes);
    assert_eq!(d.bytes("ours/mid.qed"), mid_bytes);
    d.reads_as("ours/top.qed", &expected);
    d.same("ours/top.qed", "qemu/top.qed");
    d.same("ours/mid.qed", "qemu/mid.qed");

    // With -d as well, the same; into the immediate backing file with -b, the top is
    // not emptied either.
    let writes = three_layers(&d, "d");
    d.qed(&["commit", "-d", "-q", "-b", "mid.qed", "d/top.qed"]);
    let expected = model(4 * M, &writes);
    d.reads_as("d/mid.qed", &expected);
    d.reads_as("d/top.qed", &expected);
    assert!(d.len("d/top.qed") > HEADER_AND_L1);
    d.clean("d/mid.qed");

    // Names outside the chain are refused, naming them; nothing changes.
    let before = d.bytes("d/base.qed");
    d.qed_fails(&["commit", "-b", "nosuch.qed", "d/top.qed"], "'nosuch.qed'");
    d.qed_fails(&["commit", "-b", "top.qed", "d/top.qed"], "'top.qed'");
    assert_eq!(d.bytes("d/base.qed"), before);
}

#[test]
fn commit_b_through_a_shorter_middle_layer() {
    let d = Dir::new();
    for dir in ["ours", "qemu"] {
        std::fs::create_dir(d.path(dir)).unwrap();
        let p = |n: &str| format!("{dir}/{n}");
        d.qed_image(&p("base.qed"), "4M", &[], &[(0, 4 * M, 0x10)]);
        // The middle layer ends at 2M: the top reads zeros past it, whatever the base holds.
        d.qed_image(&p("mid.qed"), "2M", &["-b", "base.qed", "-F", "qed"], &[]);
        d.qed_image(
            &p("top.qed"),
            "4M",
            &["-b", "mid.qed", "-F", "qed"],
            &[(M, 64 * K, 0x30)],
        );
    }
    let expected = model(4 * M, &[(0, 2 * M, 0x10), (M, 64 * K, 0x30)]);
    d.reads_as("ours/top.qed", &expected);
    d.qed(&["commit", "-b", "base.qed", "ours/top.qed"]);
    d.img(&["commit", "-q", "-b", "base.qed", "qemu/top.qed"]);
    d.reads_as("ours/base.qed", &expected);
    d.same("ours/base.qed", "qemu/base.qed");
    d.clean("ours/base.qed");
}

#[test]
fn compare_prints_what_qemu_img_prints() {
    let d = Dir::new();
    d.qed_image("a.qed", "1M", &[], &[]);
    d.qed_image("b.qed", "2M", &[], &[]);
    d.qed_image("c.qed", "2M", &[], &[(1536 * K, 4 * K, 0x05)]);
    d.qed_image("e.qed", "1M", &[], &[(0, 4 * K, 0x05)]);
    let pairs: [&[&str]; 8] = [
        &["a.qed", "b.qed"],
        &["-s", "a.qed", "b.qed"],
        &["a.qed", "c.qed"],
        &["c.qed", "a.qed"],
        // A difference in the common part is reported without the size warning.
        &["e.qed", "c.qed"],
        &["-s", "e.qed", "c.qed"],
        &["-q", "a.qed", "c.qed"],
        &["-s", "a.qed", "a.qed"],
    ];
    for args in pairs {
        let ours = d.run(QED, &[&["compare"], args].concat());
        let theirs = d.run(QEMU_IMG, &[&["compare"], args].concat());
        assert_eq!(
            (String::from_utf8_lossy(&ours.stdout), ours.status.code()),
            (
                String::from_utf8_lossy(&theirs.stdout),
                theirs.status.code()
            ),
            "compare {args:?}: ours, qemu-img"
        );
    }
}

#[test]
fn quiet_commands_print_nothing() {
    let d = Dir::new();
    d.qed_image("img.qed", "4M", &[], &[(0, 64 * K, 0x11)]);
    d.copy("img.qed", "leaky.qed");
    // A cluster past everything the tables name: a leak.
    let len = d.len("leaky.qed");
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("leaky.qed"))
        .unwrap()
        .set_len(len + CLUSTER)
        .unwrap();
    for (file, code) in [("img.qed", 0), ("leaky.qed", 3)] {
        for output in ["--output=human", "--output=json"] {
            let args = ["check", "-q", output, file];
            let ours = d.expect(QED, &args, code);
            let theirs = d.expect(QEMU_IMG, &args, code);
            assert!(ours.stdout.is_empty(), "{}", d.describe(QED, &args, &ours));
            assert!(theirs.stdout.is_empty());
        }
    }
    assert_eq!(d.qed(&["resize", "-q", "img.qed", "+1M"]), "");
    assert_eq!(d.info("img.qed")["virtual-size"], 5 * M);
    d.qed_image(
        "top.qed",
        "5M",
        &["-b", "img.qed", "-F", "qed"],
        &[(M, 64 * K, 0x22)],
    );
    assert_eq!(d.qed(&["commit", "-q", "-p", "top.qed"]), "");
    d.expect_reads("img.qed", &[(0, 64 * K, 0x11), (M, 64 * K, 0x22)]);
}

#[test]
fn convert_target_is_zero_skips_zeros_as_qemu_img_does() {
    let d = Dir::new();
    d.raw_image("src.raw", "4M", &[(0, 64 * K, 0x11), (2 * M, 64 * K, 0x12)]);
    for (tool, dst) in [(QED, "ours.qed"), (QEMU_IMG, "theirs.qed")] {
        // The destination is promised to read as zeros, and does not at 1M: the promise
        // is taken at its word, so the 0x77 stays, with qemu-img as with us.
        d.qed_image(dst, "4M", &[], &[(M, 64 * K, 0x77)]);
        d.ok(
            tool,
            &[
                "convert",
                "-q",
                "-n",
                "--target-is-zero",
                "-f",
                "raw",
                "-O",
                "qed",
                "src.raw",
                dst,
            ],
        );
        d.clean(dst);
    }
    d.same("ours.qed", "theirs.qed");
    d.expect_reads(
        "ours.qed",
        &[(0, 64 * K, 0x11), (M, 64 * K, 0x77), (2 * M, 64 * K, 0x12)],
    );
    // Without it, the zeros are written.
    d.qed(&[
        "convert", "-n", "-f", "raw", "-O", "qed", "src.raw", "ours.qed",
    ]);
    d.same("ours.qed", "src.raw");

    d.qed_fails(
        &["convert", "--target-is-zero", "src.raw", "new.qed"],
        "needs -n",
    );
    d.qed_image("over.qed", "4M", &["-b", "src.raw", "-F", "raw"], &[]);
    d.qed_fails(
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "qed",
            "src.raw",
            "over.qed",
        ],
        "backing file",
    );
}

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    let d = Dir::new();
    d.ok(QED, &["create", "-q", "img.qed", "4M"]);
    // A hex dump of 1 MiB: far more than a pipe holds.
    let mut child = Command::new(QED)
        .args(["io", "-r", "-c", "read -v 0 1M", "img.qed"])
        .current_dir(d.tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run qed");
    let mut first = [0u8; 64];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked"),
        "qed panicked on a closed stdout:\n{err}"
    );
    assert_eq!(out.status.code(), Some(141), "{err}");
}
