//! A scratch directory where qed, qemu-img and qemu-io run on the same images, and what
//! the tests of whole-image commands read out of them.
//!
//! QEMU is the oracle of every result judged here, so a missing qemu-img or qemu-io fails
//! these tests instead of skipping them: skipping would report an unjudged suite as
//! passing.

use super::{QED, QEMU_IMG, QEMU_IO};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use tempfile::TempDir;

pub const K: u64 = 1 << 10;

pub const M: u64 = 1 << 20;

pub const G: u64 = 1 << 30;

/// Default QED geometry, as qemu-img creates it.
pub const CLUSTER: u64 = 64 * K;

pub const HEADER_AND_L1: u64 = CLUSTER + 4 * CLUSTER;

/// A scratch directory. Every command runs inside it, so file names stay relative and
/// relative backing names resolve the way QEMU resolves them.
pub struct Dir {
    pub tmp: TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().expect("create a temporary directory"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn run(&self, prog: &str, args: &[&str]) -> Output {
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

    pub fn describe(&self, prog: &str, args: &[&str], out: &Output) -> String {
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
    pub fn expect(&self, prog: &str, args: &[&str], code: i32) -> Output {
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
    pub fn ok(&self, prog: &str, args: &[&str]) -> String {
        let out = self.expect(prog, args, 0);
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    pub fn qed(&self, args: &[&str]) -> String {
        self.ok(QED, args)
    }

    pub fn img(&self, args: &[&str]) -> String {
        self.ok(QEMU_IMG, args)
    }

    /// Runs qemu-io commands on `file` (of format `fmt`); each must succeed. qemu-io
    /// reports a pattern mismatch on stdout, so that is checked besides the exit code.
    pub fn io(&self, fmt: &str, file: &str, cmds: &[String]) {
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
    pub fn expect_reads(&self, file: &str, reads: &[(u64, u64, u8)]) {
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
    pub fn qed_fails(&self, args: &[&str], needle: &str) -> String {
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
    pub fn same(&self, a: &str, b: &str) {
        let out = self.expect(QEMU_IMG, &["compare", a, b], 0);
        assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical."));
    }

    /// Asserts that `qemu-img check` finds nothing wrong.
    pub fn clean(&self, file: &str) {
        let (code, j) = self.qemu_check(file);
        assert_eq!(code, 0, "qemu-img check {file}: {j:#}");
        assert_eq!(count(&j, "corruptions"), 0, "{j:#}");
        assert_eq!(count(&j, "leaks"), 0, "{j:#}");
    }

    /// `qemu-img check --output=json`: exit code and report.
    pub fn qemu_check(&self, file: &str) -> (i32, Value) {
        let args = ["check", "--output=json", file];
        let out = self.run(QEMU_IMG, &args);
        let j = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", self.describe(QEMU_IMG, &args, &out)));
        (out.status.code().unwrap_or(-1), j)
    }

    /// `qed check --output=json [-r MODE]`: exit code and report.
    pub fn qed_check(&self, file: &str, repair: Option<&str>) -> (i32, Value) {
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

    pub fn info(&self, file: &str) -> Value {
        serde_json::from_str(&self.img(&["info", "--output=json", file])).expect("info JSON")
    }

    pub fn map(&self, file: &str) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&self.img(&["map", "--output=json", file])).expect("map JSON");
        v.as_array().expect("map is an array").clone()
    }

    pub fn bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    pub fn put(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }

    /// Bytes the file takes on disk.
    pub fn disk_usage(&self, name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path(name))
            .unwrap_or_else(|e| panic!("stat {name}: {e}"))
            .blocks()
            * 512
    }

    pub fn len(&self, name: &str) -> u64 {
        std::fs::metadata(self.path(name))
            .unwrap_or_else(|e| panic!("stat {name}: {e}"))
            .len()
    }

    pub fn copy(&self, from: &str, to: &str) {
        std::fs::copy(self.path(from), self.path(to))
            .unwrap_or_else(|e| panic!("copy {from} to {to}: {e}"));
    }

    /// A fresh QED image of `size` holding `(offset, len, byte)` runs, written by qemu-io.
    pub fn qed_image(&self, name: &str, size: &str, extra: &[&str], writes: &[(u64, u64, u8)]) {
        let mut args = vec!["create", "-q", "-f", "qed"];
        args.extend(extra);
        args.extend([name, size]);
        self.img(&args);
        self.write_runs("qed", name, writes);
    }

    pub fn raw_image(&self, name: &str, size: &str, writes: &[(u64, u64, u8)]) {
        self.img(&["create", "-q", "-f", "raw", name, size]);
        self.write_runs("raw", name, writes);
    }

    pub fn write_runs(&self, fmt: &str, name: &str, writes: &[(u64, u64, u8)]) {
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
pub fn count(j: &Value, key: &str) -> u64 {
    j.get(key).map_or(0, |v| v.as_u64().expect("a count"))
}

pub fn le64(b: &[u8], at: u64) -> u64 {
    u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

pub fn le32(b: &[u8], at: u64) -> u64 {
    u32::from_le_bytes(b[at as usize..at as usize + 4].try_into().unwrap()).into()
}

pub fn set_le64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Bytes of guest data in a `qemu-img map` that the image at `depth` itself stores.
pub fn data_bytes(map: &[Value], depth: u64) -> u64 {
    map.iter()
        .filter(|r| r["data"] == true && r["depth"] == depth)
        .map(|r| r["length"].as_u64().unwrap())
        .sum()
}

/// raw base <- qcow2 mid <- qcow2 top. The top holds a zero cluster over backing data,
/// a compressed cluster and a partial cluster. Returns the top's name.
pub fn qcow2_chain(d: &Dir, compat: &str) -> String {
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

/// `"./"` repeated, then an existing file's name: a name of exactly `len` bytes that
/// names `target` (whose name has the parity of `len`).
pub fn long_name(len: usize, target: &str) -> String {
    assert_eq!((len - target.len()) % 2, 0);
    format!("{}{target}", "./".repeat((len - target.len()) / 2))
}

/// The fully allocated size by the format's arithmetic.
pub fn fully_allocated(size: u64, cluster: u64, table: u64) -> u64 {
    let table_bytes = table * cluster;
    let l2_coverage = table_bytes / 8 * cluster;
    cluster
        + table_bytes
        + size.div_ceil(l2_coverage) * table_bytes
        + size.div_ceil(cluster) * cluster
}

/// Applies `f` to the bytes of `name`.
pub fn patch(d: &Dir, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = d.bytes(name);
    f(&mut b);
    d.put(name, &b);
}

/// Sets NEED_CHECK (features bit 0x2 at 0x10).
pub fn set_need_check(b: &mut [u8]) {
    let f = le64(b, 0x10);
    set_le64(b, 0x10, f | 2);
}

/// Guest contents as a list of `(offset, len, byte)` writes applied in order to zeros.
pub fn model(size: u64, writes: &[(u64, u64, u8)]) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    for &(off, len, b) in writes {
        m[off as usize..(off + len) as usize].fill(b);
    }
    m
}

impl Dir {
    /// The guest contents of `file` as qemu-img reads them.
    pub fn contents(&self, file: &str) -> Vec<u8> {
        let raw = format!("{file}.contents.raw");
        let _ = std::fs::remove_file(self.path(&raw));
        self.img(&["convert", "-q", "-O", "raw", file, &raw]);
        self.bytes(&raw)
    }

    /// Asserts that qemu-img reads `file` as `expected`, naming the first difference.
    pub fn reads_as(&self, file: &str, expected: &[u8]) {
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
pub fn features(b: &[u8]) -> u64 {
    le64(b, 0x10)
}

pub const BACKING_FILE: u64 = 1;

pub const NO_PROBE: u64 = 4;
