//! Interoperability with QEMU (qemu-img and qemu-io from qemu-utils).
//!
//! Both directions: images QEMU writes must read back identically through this library
//! and give the same `map`, `info` and `check` output from `qed`; images `qed` writes must
//! pass `qemu-img check`, compare equal to the expected data with `qemu-img compare`,
//! map identically and read back through `qemu-io`. Each scenario also runs against an
//! in-memory model of the expected guest contents, so neither tool is its own oracle.
//!
//! A missing qemu-img or qemu-io fails these tests instead of skipping them: skipping
//! would let a machine without QEMU report the interop suite as passing.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use tempfile::TempDir;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
const G: u64 = 1 << 30;

mod common;

use common::qemu::assert_identical;
use common::{describe, exits, ok, run, QED, QEMU_IMG, QEMU_IO};

fn json(what: &str, text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what} printed invalid JSON ({e}):\n{text}"))
}

// ---------------------------------------------------------------------------------------
// Guest operations and the model of what the guest should read afterwards.

#[derive(Clone, Copy, Debug)]
enum Op {
    /// `write -P pattern offset len`
    Write(u8, u64, u64),
    /// `write -z offset len`
    Zero(u64, u64),
    /// `discard offset len`: only `qed io` gives it an effect on QED images.
    Discard(u64, u64),
}

impl Op {
    fn command(self) -> String {
        match self {
            Op::Write(p, off, len) => format!("write -P {p:#04x} {off} {len}"),
            Op::Zero(off, len) => format!("write -z {off} {len}"),
            Op::Discard(off, len) => format!("discard {off} {len}"),
        }
    }

    fn range(self) -> (u64, u64) {
        match self {
            Op::Write(_, off, len) | Op::Zero(off, len) | Op::Discard(off, len) => (off, len),
        }
    }
}

/// Guest contents of one layer, cluster by cluster; clusters it does not hold read from
/// the layer below, or as zeros past the end of it.
struct Model {
    size: u64,
    cs: u64,
    /// The clusters this layer holds: data clusters, and zero clusters (all zeros).
    clusters: BTreeMap<u64, Vec<u8>>,
    /// Which held clusters are zero clusters (L2 entry 1) rather than data.
    zero: BTreeSet<u64>,
    base: Option<Box<Model>>,
}

/// Granularity of the model's scans: small enough that a sparse 1 GiB disk is cheap.
const STEP: u64 = 64 * K;

impl Model {
    fn new(size: u64, cs: u64, base: Option<Model>) -> Self {
        Model {
            size,
            cs,
            clusters: BTreeMap::new(),
            zero: BTreeSet::new(),
            base: base.map(Box::new),
        }
    }

    fn read(&self, pos: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let p = pos + done as u64;
            let within = (p % self.cs) as usize;
            let n = (self.cs as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.clusters.get(&(p / self.cs)) {
                Some(c) => out.copy_from_slice(&c[within..within + n]),
                None => self.read_below(p, out),
            }
            done += n;
        }
    }

    fn read_below(&self, pos: u64, out: &mut [u8]) {
        match &self.base {
            Some(b) if pos < b.size => {
                let m = (out.len() as u64).min(b.size - pos) as usize;
                b.read(pos, &mut out[..m]);
                out[m..].fill(0);
            }
            _ => out.fill(0),
        }
    }

    fn below_size(&self) -> u64 {
        self.base.as_ref().map_or(0, |b| b.size)
    }

    /// Whether no layer holds any byte of the range, so that it reads as zeros.
    fn untouched(&self, pos: u64, len: u64) -> bool {
        let (first, last) = (pos / self.cs, (pos + len - 1) / self.cs);
        if self.clusters.range(first..=last).next().is_some() {
            return false;
        }
        match &self.base {
            Some(b) if pos < b.size => b.untouched(pos, len.min(b.size - pos)),
            _ => true,
        }
    }

    /// A newly allocated data cluster, filled from the layers below.
    fn allocate(&mut self, idx: u64) -> &mut Vec<u8> {
        let mut c = vec![0u8; self.cs as usize];
        let start = idx * self.cs;
        let valid = self.cs.min(self.size - start) as usize;
        self.read_below(start, &mut c[..valid]);
        self.zero.remove(&idx);
        self.clusters.insert(idx, c);
        self.clusters.get_mut(&idx).unwrap()
    }

    /// Applies `op` as `writer` carries it out. The tools differ where QEMU's choices are
    /// visible in the guest data:
    /// - QEMU's block layer widens requests to whole 512-byte sectors, filling the
    ///   padding from what the guest read before (the QED driver is sector based);
    /// - a write that covers part of a zero cluster: QEMU fills the rest of the new data
    ///   cluster from the backing file, as for an unallocated cluster, so backing data
    ///   reappears; ours keeps the rest zero, as the zero cluster read;
    /// - discard: QEMU ignores it on QED (and is never given one here).
    fn apply(&mut self, op: Op, writer: Tool) {
        let (off, len) = op.range();
        assert!(
            off + len <= self.size,
            "{op:?} is outside a {} byte disk",
            self.size
        );
        const SECTOR: u64 = 512;
        let end = off + len;
        match (op, writer) {
            (Op::Discard(..), Tool::Ours) => {
                // Data clusters wholly inside the range read as zeros afterwards.
                for idx in off.div_ceil(self.cs)..end / self.cs {
                    if !self.zero.contains(&idx) {
                        if let Some(c) = self.clusters.get_mut(&idx) {
                            c.fill(0);
                        }
                    }
                }
            }
            (Op::Discard(..), Tool::Qemu) => panic!("qemu-io does nothing for discards on QED"),
            (Op::Write(p, ..), Tool::Ours) => self.write_data(off, &vec![p; len as usize], writer),
            (Op::Zero(..), Tool::Ours) => self.write_zeroes(off, len, writer),
            (Op::Write(p, ..), Tool::Qemu) => self.write_padded(off, len, p),
            (Op::Zero(..), Tool::Qemu) => {
                let (head_end, tail_start) = (off.next_multiple_of(SECTOR), end / SECTOR * SECTOR);
                if head_end >= tail_start {
                    self.write_padded(off, len, 0);
                } else {
                    if off < head_end {
                        self.write_padded(off, head_end - off, 0);
                    }
                    self.write_zeroes(head_end, tail_start - head_end, writer);
                    if end > tail_start {
                        self.write_padded(tail_start, end - tail_start, 0);
                    }
                }
            }
        }
    }

    /// A QEMU write of `value`, widened to whole sectors.
    fn write_padded(&mut self, off: u64, len: u64, value: u8) {
        let start = off / 512 * 512;
        let end = (off + len).next_multiple_of(512);
        let mut buf = vec![0u8; (end - start) as usize];
        self.read(start, &mut buf);
        buf[(off - start) as usize..(off - start + len) as usize].fill(value);
        self.write_data(start, &buf, Tool::Qemu);
    }

    fn write_data(&mut self, off: u64, data: &[u8], writer: Tool) {
        let cs = self.cs;
        let mut done = 0;
        while done < data.len() {
            let p = off + done as u64;
            let idx = p / cs;
            let within = (p % cs) as usize;
            let n = (cs as usize - within).min(data.len() - done);
            let held = self.clusters.contains_key(&idx);
            let zero_cluster = self.zero.contains(&idx);
            let c = if !held || (zero_cluster && writer == Tool::Qemu) {
                self.allocate(idx)
            } else {
                self.zero.remove(&idx);
                self.clusters.get_mut(&idx).unwrap()
            };
            c[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Zeroing without sector padding: whole clusters by table entry, the rest by writes.
    fn write_zeroes(&mut self, off: u64, len: u64, writer: Tool) {
        let cs = self.cs;
        let mut p = off;
        while p < off + len {
            let idx = p / cs;
            let n = (cs - p % cs).min(off + len - p);
            let held = self.clusters.contains_key(&idx);
            let zero_cluster = self.zero.contains(&idx);
            // Ours leaves alone what reads as zeros for want of backing data beneath.
            let ours_nothing_below = writer == Tool::Ours && p >= self.below_size();
            if n == cs {
                if zero_cluster {
                } else if held {
                    self.clusters.get_mut(&idx).unwrap().fill(0);
                } else if !ours_nothing_below {
                    self.clusters.insert(idx, vec![0; cs as usize]);
                    self.zero.insert(idx);
                }
            } else if !(writer == Tool::Ours && (zero_cluster || (!held && ours_nothing_below))) {
                self.write_data(p, &vec![0; n as usize], writer);
            }
            p += n;
        }
    }

    /// Calls `f` for each step of the disk with its bytes, or `None` when untouched.
    fn for_each_step(&self, mut f: impl FnMut(u64, Option<&[u8]>)) {
        let mut buf = vec![0u8; STEP as usize];
        let mut pos = 0;
        while pos < self.size {
            let n = STEP.min(self.size - pos);
            if self.untouched(pos, n) {
                f(pos, None);
            } else {
                self.read(pos, &mut buf[..n as usize]);
                f(pos, Some(&buf[..n as usize]));
            }
            pos += n;
        }
    }

    /// The disk as maximal runs of one byte value: (offset, length, value).
    fn runs(&self) -> Vec<(u64, u64, u8)> {
        let mut runs: Vec<(u64, u64, u8)> = Vec::new();
        let mut push = |pos: u64, len: u64, v: u8| match runs.last_mut() {
            Some((o, l, pv)) if *pv == v && *o + *l == pos => *l += len,
            _ => runs.push((pos, len, v)),
        };
        let size = self.size;
        self.for_each_step(|pos, bytes| match bytes {
            None => push(pos, STEP.min(size - pos), 0),
            Some(b) => {
                let mut start = 0;
                for i in 1..=b.len() {
                    if i == b.len() || b[i] != b[start] {
                        push(pos + start as u64, (i - start) as u64, b[start]);
                        start = i;
                    }
                }
            }
        });
        runs
    }

    /// `read -P` commands that together cover the whole disk, in pieces qemu-io can
    /// allocate a buffer for.
    fn pattern_reads(&self) -> Vec<String> {
        const PIECE: u64 = 64 * M;
        let mut reads = Vec::new();
        for (off, len, v) in self.runs() {
            let mut p = off;
            while p < off + len {
                let n = PIECE.min(off + len - p);
                reads.push(format!("read -P {v:#04x} {p} {n}"));
                p += n;
            }
        }
        reads
    }

    /// Writes the disk as a sparse raw file.
    fn write_raw(&self, path: &Path) {
        let f = File::create(path).unwrap();
        f.set_len(self.size).unwrap();
        self.for_each_step(|pos, bytes| {
            if let Some(b) = bytes {
                f.write_all_at(b, pos).unwrap();
            }
        });
    }
}

/// `qed io` with `-c CMD` arguments.
fn qed_io(read_only: bool, file: &str, commands: &[&str]) -> Vec<String> {
    let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
    let mut args = vec!["io".to_string()];
    args.extend(io_args(read_only, "qed", file, &commands));
    args
}

/// `-c CMD` arguments for qemu-io or `qed io`.
fn io_args(read_only: bool, format: &str, file: &str, commands: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    if read_only {
        args.push("-r".to_string());
    }
    args.extend(["-f".to_string(), format.to_string()]);
    for c in commands {
        args.extend(["-c".to_string(), c.clone()]);
    }
    args.push(file.to_string());
    args
}

// ---------------------------------------------------------------------------------------
// Building images with either tool.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Qemu,
    Ours,
}

impl Tool {
    fn img(self) -> &'static str {
        match self {
            Tool::Qemu => QEMU_IMG,
            Tool::Ours => QED,
        }
    }

    fn io(self) -> (&'static str, Vec<String>) {
        match self {
            Tool::Qemu => (QEMU_IO, vec![]),
            Tool::Ours => (QED, vec!["io".to_string()]),
        }
    }

    fn run_io(self, dir: &Path, format: &str, file: &str, ops: &[Op]) {
        if ops.is_empty() {
            return;
        }
        let commands: Vec<String> = ops.iter().map(|o| o.command()).collect();
        let (prog, mut args) = self.io();
        args.extend(io_args(false, format, file, &commands));
        let out = ok(dir, prog, &args);
        assert!(!out.contains("failed"), "{prog} reported a failure:\n{out}");
    }
}

/// The guest span one L2 table maps.
fn l2_span(cs: u64, ts: u64) -> u64 {
    ts * cs / 8 * cs
}

/// Whether QEMU opens images of this geometry: not with table_size=1, and not when its
/// maximum-size computation overflows (e.g. 2 MiB clusters with table_size=16).
fn qemu_opens(cs: u64, ts: u64) -> bool {
    ts > 1 && 3 * cs.ilog2() + 2 * ts.ilog2() - 6 < 64
}

/// Writes around cluster boundaries, into zero clusters, across every L2 table
/// boundary inside the disk, and up to the last byte.
fn top_script(cs: u64, ts: u64, size: u64, discards: bool) -> Vec<Op> {
    use Op::*;
    assert!(size >= 13 * cs, "disk too small for the script");
    let mut ops = vec![
        Write(0xa1, 0, cs),
        Write(0xa2, cs + 123, 2 * cs),
        Zero(cs + 1000, 700),
        Zero(4 * cs, 2 * cs),
        Write(0xa3, 5 * cs - 17, 34),
        Zero(6 * cs + 512, cs),
        Write(0xa4, 8 * cs + 1, cs * 9 / 2),
    ];
    if discards {
        // Whole clusters 1 and 2, parts of 0 and 3; then a write into a discarded one.
        ops.extend([Discard(cs / 2, 3 * cs), Write(0xa5, 2 * cs + 77, 99)]);
    }
    let span = l2_span(cs, ts);
    let mut b = span;
    while b + 3 * cs <= size {
        ops.extend([
            Write(0xb1, b - 777, 1554),
            Zero(b + cs, 2 * cs),
            Write(0xb2, b + cs + cs / 2 + 5, cs),
            Zero(b - 2 * cs - 100, 200),
        ]);
        if discards {
            ops.extend([
                Discard(b - 2 * cs + 300, 3 * cs + 500),
                Write(0xb3, b - 100, 50),
            ]);
        }
        b += span;
    }
    ops.extend([Write(0xc1, size - 1000, 1000), Zero(size - 3000, 1500)]);
    ops
}

/// Data for a backing file, leaving holes.
fn base_script(size: u64, cs: u64) -> Vec<Op> {
    use Op::*;
    vec![
        Write(0x5a, cs / 3, size / 2),
        Write(0x6b, size * 3 / 4 - 999, size / 8),
        Zero(size / 4 + 7, cs + 100),
    ]
}

/// Data for the middle of a chain: partly over the base, and zero clusters hiding it.
fn mid_script(size: u64, cs: u64) -> Vec<Op> {
    use Op::*;
    vec![
        Write(0x7c, size / 3 + 5, size / 4),
        Zero((size / 8).next_multiple_of(cs), 2 * cs),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Back {
    None,
    Raw,
    Qed,
    /// top.qed -> mid.qed -> base.raw
    Chain,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    cs: u64,
    ts: u64,
    size: u64,
    back: Back,
}

const fn case(cs: u64, ts: u64, size: u64, back: Back) -> Case {
    Case { cs, ts, size, back }
}

/// A QED layer of a built case: its file name and geometry.
struct QedLayer {
    name: &'static str,
    cs: u64,
    ts: u64,
}

fn create_raw(dir: &Path, tool: Tool, name: &str, size: u64) {
    match tool {
        Tool::Qemu => {
            ok(
                dir,
                QEMU_IMG,
                &["create", "-q", "-f", "raw", name, &size.to_string()],
            );
        }
        Tool::Ours => File::create(dir.join(name))
            .and_then(|f| f.set_len(size))
            .unwrap(),
    }
}

fn create_qed(
    dir: &Path,
    tool: Tool,
    name: &str,
    (cs, ts, size): (u64, u64, u64),
    backing: Option<(&str, &str)>,
) {
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qed".into(),
        "-o".into(),
        format!("cluster_size={cs},table_size={ts}"),
    ];
    if let Some((b, f)) = backing {
        args.extend(["-b".into(), b.into(), "-F".into(), f.into()]);
    }
    args.extend([name.to_string(), size.to_string()]);
    ok(dir, tool.img(), &args);
}

/// Geometry for a QED backing layer: deliberately unlike the top's.
fn other_geometry(cs: u64) -> (u64, u64) {
    if cs == 4 * K {
        (64 * K, 4)
    } else {
        (4 * K, 2)
    }
}

/// Builds `top.qed` (and its backing files) with `tool`; returns the expected contents
/// and the QED layers, top first.
fn build(dir: &Path, tool: Tool, c: Case) -> (Model, Vec<QedLayer>) {
    let mut layers = Vec::new();
    let base_size = (c.size * 2 / 3) / 512 * 512;
    let raw_base = |size: u64| {
        create_raw(dir, tool, "base.raw", size);
        let ops = base_script(size, 64 * K);
        tool.run_io(dir, "raw", "base.raw", &ops);
        let mut m = Model::new(size, 64 * K, None);
        ops.into_iter().for_each(|o| m.apply(o, tool));
        m
    };
    let (backing, below) = match c.back {
        Back::None => (None, None),
        Back::Raw => (Some(("base.raw", "raw")), Some(raw_base(base_size))),
        Back::Qed | Back::Chain => {
            let (mcs, mts) = other_geometry(c.cs);
            let (msize, under, name) = if c.back == Back::Qed {
                (base_size, None, "base.qed")
            } else {
                (c.size, Some(raw_base(c.size / 2 / 512 * 512)), "mid.qed")
            };
            let under_name = under.as_ref().map(|_| ("base.raw", "raw"));
            create_qed(dir, tool, name, (mcs, mts, msize), under_name);
            let ops = if c.back == Back::Qed {
                base_script(msize, mcs)
            } else {
                mid_script(msize, mcs)
            };
            tool.run_io(dir, "qed", name, &ops);
            let mut m = Model::new(msize, mcs, under);
            ops.into_iter().for_each(|o| m.apply(o, tool));
            layers.push(QedLayer {
                name,
                cs: mcs,
                ts: mts,
            });
            (Some((name, "qed")), Some(m))
        }
    };
    create_qed(dir, tool, "top.qed", (c.cs, c.ts, c.size), backing);
    let ops = top_script(c.cs, c.ts, c.size, tool == Tool::Ours);
    tool.run_io(dir, "qed", "top.qed", &ops);
    let mut model = Model::new(c.size, c.cs, below);
    ops.into_iter().for_each(|o| model.apply(o, tool));
    layers.insert(
        0,
        QedLayer {
            name: "top.qed",
            cs: c.cs,
            ts: c.ts,
        },
    );
    (model, layers)
}

// ---------------------------------------------------------------------------------------
// Verifications.

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Reads the whole virtual disk through the library and compares it with the model and,
/// when given, with a raw file holding what QEMU reads.
fn assert_reads_back(dir: &Path, img: &str, model: &Model, qemu_raw: Option<&str>) {
    const CHUNK: u64 = 4 * M;
    let dev = qed::open_device(&dir.join(img), None, &qed::OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("opening {img}: {e}"));
    assert_eq!(dev.size(), model.size, "{img}: virtual size");
    let raw = qemu_raw.map(|r| {
        let f = File::open(dir.join(r)).unwrap();
        assert_eq!(f.metadata().unwrap().len(), model.size, "{r}: size");
        f
    });
    let mut ours = vec![0u8; CHUNK as usize];
    let mut want = vec![0u8; CHUNK as usize];
    let mut theirs = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < model.size {
        let n = CHUNK.min(model.size - pos) as usize;
        dev.read_at(&mut ours[..n], pos)
            .unwrap_or_else(|e| panic!("{img}: reading {n} bytes at {pos}: {e}"));
        model.read(pos, &mut want[..n]);
        if let Some(f) = &raw {
            f.read_exact_at(&mut theirs[..n], pos).unwrap();
            if let Some(i) = first_difference(&ours[..n], &theirs[..n]) {
                panic!(
                    "{img}: at guest offset {} the library reads {:#04x}, QEMU {:#04x}",
                    pos + i as u64,
                    ours[i],
                    theirs[i]
                );
            }
        }
        if let Some(i) = first_difference(&ours[..n], &want[..n]) {
            panic!(
                "{img}: at guest offset {} the library reads {:#04x}, the model expects {:#04x}",
                pos + i as u64,
                ours[i],
                want[i]
            );
        }
        pos += n as u64;
    }
}

/// `qemu-io -r` or `qed io -r` reads the whole disk with `read -P` commands.
fn assert_pattern_reads(dir: &Path, tool: Tool, img: &str, model: &Model) {
    let reads = model.pattern_reads();
    let (prog, mut args) = tool.io();
    args.extend(io_args(true, "qed", img, &reads));
    let out = ok(dir, prog, &args);
    assert!(
        !out.contains("verification failed"),
        "{prog} read unexpected data from {img}:\n{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("read ")).count(),
        reads.len(),
        "{prog} did not run every read on {img}:\n{out}"
    );
}

fn assert_map_matches(dir: &Path, img: &str) {
    let ours = ok(dir, QED, &["map", "--output=json", "-f", "qed", img]);
    let theirs = ok(dir, QEMU_IMG, &["map", "--output=json", "-f", "qed", img]);
    assert_eq!(
        ours, theirs,
        "{img}: `qed map --output=json` (left) differs from qemu-img's (right)"
    );
}

fn assert_info_matches(dir: &Path, layer: &QedLayer) {
    let img = layer.name;
    let mut ours = json(
        "qed info",
        &ok(dir, QED, &["info", "--output=json", "-f", "qed", img]),
    );
    let theirs = json(
        "qemu-img info",
        &ok(dir, QEMU_IMG, &["info", "--output=json", "-f", "qed", img]),
    );
    let ours_obj = ours.as_object_mut().expect("qed info prints an object");
    assert_eq!(ours_obj.remove("table-size"), Some(layer.ts.into()));
    assert_eq!(ours_obj.remove("header-size"), Some(1.into()));
    assert!(theirs.is_object(), "qemu-img info prints an object");
    assert_eq!(
        ours, theirs,
        "{img}: `qed info --output=json` (left) differs from qemu-img's (right)"
    );
}

/// Our check must find the image clean; qemu-img must agree. QEMU's cluster rounding
/// divides by cluster_size - 1, which makes it report leaks that are not there once a
/// file has cluster_size - 1 clusters (16 MiB with 4 KiB clusters): the leak count is
/// compared exactly only where that cannot happen.
fn assert_check_matches(dir: &Path, layer: &QedLayer) {
    let img = layer.name;
    let (ours, _) = exits(dir, QED, &["check", "--output=json", img], 0);
    let ours = json("qed check", &ours);
    for key in ["leaks", "corruptions"] {
        assert!(
            ours.get(key).is_none(),
            "{img}: qed check reports {key}: {ours}"
        );
    }
    assert_eq!(ours["check-errors"], 0, "{img}: {ours}");
    let args = ["check", "--output=json", "-f", "qed", img];
    let out = run(dir, QEMU_IMG, &args);
    let mut theirs = json("qemu-img check", &String::from_utf8_lossy(&out.stdout));
    let file_clusters = std::fs::metadata(dir.join(img)).unwrap().len() / layer.cs;
    if file_clusters < layer.cs - 1 {
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            describe(QEMU_IMG, &args, &out)
        );
    } else {
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{}",
            describe(QEMU_IMG, &args, &out)
        );
        theirs.as_object_mut().unwrap().remove("leaks");
    }
    assert_eq!(
        ours, theirs,
        "{img}: `qed check --output=json` (left) differs from qemu-img's (right)"
    );
}

/// QEMU wrote the image: the library, `qed io` and the model must all agree with what
/// QEMU reads, and `qed map/info/check` with what qemu-img prints.
fn verify_qemu_image(dir: &Path, model: &Model, layers: &[QedLayer]) {
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "qed", "-O", "raw", "top.qed", "qemu.raw"],
    );
    assert_reads_back(dir, "top.qed", model, Some("qemu.raw"));
    assert_pattern_reads(dir, Tool::Qemu, "top.qed", model);
    assert_pattern_reads(dir, Tool::Ours, "top.qed", model);
    for layer in layers {
        assert_map_matches(dir, layer.name);
        assert_info_matches(dir, layer);
        assert_check_matches(dir, layer);
    }
}

/// We wrote the image: it must read back as the model through the library and, where
/// QEMU can open it, pass qemu-img check, compare equal to the model's raw image, map
/// the same and read back through qemu-io.
fn verify_our_image(dir: &Path, model: &Model, layers: &[QedLayer]) {
    assert_reads_back(dir, "top.qed", model, None);
    assert_pattern_reads(dir, Tool::Ours, "top.qed", model);
    if !layers.iter().all(|l| qemu_opens(l.cs, l.ts)) {
        for layer in layers {
            let (out, _) = exits(dir, QED, &["check", "--output=json", layer.name], 0);
            let report = json("qed check", &out);
            assert_eq!(report["check-errors"], 0, "{}: {report}", layer.name);
        }
        return;
    }
    for layer in layers {
        assert_check_matches(dir, layer);
        assert_map_matches(dir, layer.name);
        assert_info_matches(dir, layer);
    }
    model.write_raw(&dir.join("expected.raw"));
    assert_identical(dir, ("qed", "top.qed"), ("raw", "expected.raw"));
    assert_pattern_reads(dir, Tool::Qemu, "top.qed", model);
}

// ---------------------------------------------------------------------------------------
// The matrix.

/// Geometries and backing files both tools can use. Disks are sized to cross at least
/// one L2 table boundary where the span allows (4 KiB clusters: 4, 8 and 32 MiB per
/// table; 64 KiB clusters with table_size=2: 1 GiB).
const SHARED: [Case; 15] = [
    case(4 * K, 2, 8 * M + 52 * K + 1536, Back::None),
    case(4 * K, 4, 8 * M + 100 * K + 512, Back::None),
    case(4 * K, 16, 32 * M + 64 * K + 512, Back::None),
    case(64 * K, 2, G + 2 * M + 512, Back::None),
    case(64 * K, 4, 5 * M + 1536, Back::None),
    case(64 * K, 16, 5 * M, Back::None),
    // QEMU's maximum-size computation overflows for 2 MiB clusters with table_size=16.
    case(2 * M, 2, 27 * M + 512, Back::None),
    case(2 * M, 4, 26 * M, Back::None),
    case(2 * M, 8, 27 * M + 3584, Back::None),
    case(64 * K, 4, 6 * M + 512, Back::Raw),
    case(2 * M, 4, 28 * M, Back::Raw),
    case(4 * K, 2, 9 * M, Back::Qed),
    case(64 * K, 16, 7 * M, Back::Qed),
    case(64 * K, 4, 6 * M, Back::Chain),
    case(4 * K, 4, 9 * M + 512, Back::Chain),
];

/// Geometries QEMU cannot open: only our own read-back and check apply.
const OURS_ONLY: [Case; 4] = [
    case(4 * K, 1, 4 * M + 60 * K, Back::None),
    case(64 * K, 1, 5 * M + 512, Back::Raw),
    case(4 * K, 1, 5 * M, Back::Qed),
    case(2 * M, 16, 27 * M, Back::None),
];

fn run_case(tool: Tool, c: Case) {
    let dir = TempDir::new().unwrap();
    let (model, layers) = build(dir.path(), tool, c);
    match tool {
        Tool::Qemu => verify_qemu_image(dir.path(), &model, &layers),
        Tool::Ours => verify_our_image(dir.path(), &model, &layers),
    }
}

/// Runs the cases on threads; reports every failing case, not only the first.
fn run_matrix(tool: Tool, cases: &[Case]) {
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|&c| (c, s.spawn(move || run_case(tool, c))))
            .collect();
        handles
            .into_iter()
            .filter_map(|(c, h)| {
                h.join().err().map(|e| {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("{c:?}:\n{msg}")
                })
            })
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn qemu_written_images_read_back_through_qed() {
    run_matrix(Tool::Qemu, &SHARED);
}

#[test]
fn qed_written_images_pass_qemu() {
    run_matrix(Tool::Ours, &SHARED);
}

#[test]
fn qed_written_images_qemu_cannot_open_read_back() {
    run_matrix(Tool::Ours, &OURS_ONLY);
}

/// Both tools writing to the same image in turn: each appends at the other's frontier
/// and updates the other's tables.
#[test]
fn alternating_writers() {
    use Op::*;
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let c = case(4 * K, 2, 9 * M, Back::Raw);
    let (mut model, layers) = build(d, Tool::Ours, c);
    let rounds: [(Tool, Vec<Op>); 3] = [
        (
            Tool::Qemu,
            vec![
                Write(0xd1, 4 * M - 5000, 10000),
                Zero(12 * K, 8 * K),
                Write(0xd2, 3 * K, 2 * K),
            ],
        ),
        (
            Tool::Ours,
            vec![
                Write(0xd3, 4 * M + 2000, 9000),
                Zero(8 * M - 4 * K, 8 * K),
                Discard(4 * M - 8 * K, 16 * K),
            ],
        ),
        (
            Tool::Qemu,
            vec![Write(0xd4, 4 * M - 6 * K, 3 * K), Write(0xd5, 8 * M + 3, 5)],
        ),
    ];
    for (tool, ops) in rounds {
        tool.run_io(d, "qed", "top.qed", &ops);
        ops.into_iter().for_each(|o| model.apply(o, tool));
        verify_our_image(d, &model, &layers);
    }
}

/// A 4 KiB-cluster image past 16 MiB, where qemu-img check reports leaks that do not
/// exist: the file holds exactly the header, L1, L2 tables and data clusters, so there
/// are none, and our check must say so.
#[test]
fn no_false_leaks_with_small_clusters() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let (cs, ts) = (4 * K, 4);
    create_qed(d, Tool::Qemu, "top.qed", (cs, ts, 40 * M), None);
    let ops: Vec<Op> = (0..5)
        .map(|i| Op::Write(0x11 + i as u8, i * 4 * M, 4 * M))
        .collect();
    Tool::Qemu.run_io(d, "qed", "top.qed", &ops);
    let (out, _) = exits(d, QED, &["check", "--output=json", "top.qed"], 0);
    let ours = json("qed check", &out);
    assert!(ours.get("leaks").is_none(), "{ours}");
    assert!(ours.get("corruptions").is_none(), "{ours}");
    let data = ours["allocated-clusters"].as_u64().unwrap();
    assert_eq!(data, 20 * M / cs);
    let l2_tables = (20 * M).div_ceil(l2_span(cs, ts));
    let len = std::fs::metadata(d.join("top.qed")).unwrap().len();
    assert_eq!(
        len,
        cs * (1 + ts + l2_tables * ts + data),
        "file is not compact"
    );
    assert!(
        len / cs >= cs - 1,
        "the image is too small to exercise QEMU's rounding"
    );
    assert_check_matches(
        d,
        &QedLayer {
            name: "top.qed",
            cs,
            ts,
        },
    );
}

/// Relative and absolute image paths name backing files the same way in both tools.
#[test]
fn paths_from_another_directory() {
    let dir = TempDir::new().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    build(&sub, Tool::Ours, case(64 * K, 4, 6 * M, Back::Chain));
    let abs = sub.join("top.qed").to_str().unwrap().to_string();
    for (d, img) in [(dir.path(), "sub/top.qed"), (dir.path(), abs.as_str())] {
        for cmd in ["info", "check", "map"] {
            let mut ours = json(cmd, &ok(d, QED, &[cmd, "--output=json", img]));
            let theirs = json(
                cmd,
                &ok(d, QEMU_IMG, &[cmd, "--output=json", "-f", "qed", img]),
            );
            if cmd == "info" {
                ours.as_object_mut().unwrap().remove("table-size");
                ours.as_object_mut().unwrap().remove("header-size");
            }
            assert_eq!(ours, theirs, "`{cmd} {img}`: ours (left), qemu-img (right)");
        }
    }
}

// ---------------------------------------------------------------------------------------
// `qed create` writes the same bytes as `qemu-img create`.

#[test]
fn create_is_byte_identical_to_qemu_img() {
    let option_sets: &[&[&str]] = &[
        &["img.qed", "10M"],
        &["-o", "cluster_size=4k,table_size=2", "img.qed", "10M"],
        &["-o", "table_size=4", "img.qed", "10M"],
        &["-o", "cluster_size=2M,table_size=8", "img.qed", "3G"],
        &["-o", "cluster_size=4096", "img.qed", "12345"],
        &["img.qed", "1000"],
        &["img.qed", "12345"],
        &["-b", "base.raw", "-F", "raw", "img.qed"],
        &["-b", "base.raw", "-F", "raw", "img.qed", "5M"],
        &["-b", "base.qed", "-F", "qed", "img.qed"],
        &["-b", "sub/base.qed", "-F", "qed", "img.qed", "2M"],
        &[
            "-o",
            "backing_file=base.raw,backing_fmt=raw",
            "img.qed",
            "1M",
        ],
        &["img.qed", "0"],
        &["img.qed", "1T"],
        &["-o", "cluster_size=4k,table_size=1", "img.qed", "1G"],
    ];
    let (q, o) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    for dir in [q.path(), o.path()] {
        std::fs::create_dir(dir.join("sub")).unwrap();
        create_raw(dir, Tool::Qemu, "base.raw", 3 * M + 512);
        for base in ["base.qed", "sub/base.qed"] {
            create_qed(dir, Tool::Qemu, base, (64 * K, 4, 7 * M), None);
        }
    }
    for opts in option_sets {
        let mut args = vec!["create", "-f", "qed"];
        args.extend_from_slice(opts);
        let theirs = ok(q.path(), QEMU_IMG, &args);
        let ours = ok(o.path(), QED, &args);
        let (a, b) = (
            std::fs::read(q.path().join("img.qed")).unwrap(),
            std::fs::read(o.path().join("img.qed")).unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{opts:?}: file length (qemu-img, qed)");
        if let Some(i) = first_difference(&a, &b) {
            panic!(
                "{opts:?}: byte {i} is {:#04x} from qemu-img, {:#04x} from qed create",
                a[i], b[i]
            );
        }
        assert_eq!(ours, theirs, "{opts:?}: create message (qed, qemu-img)");
    }
}

// ---------------------------------------------------------------------------------------
// `qed io` semantics.

#[test]
fn io_pattern_mismatch_names_first_differing_offset() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    create_qed(d, Tool::Ours, "a.qed", (4 * K, 4, 4 * M), None);
    Tool::Ours.run_io(d, "qed", "a.qed", &[Op::Write(0x11, 1000, 5000)]);
    // The request starts on matching bytes; the first mismatch is at 6000.
    let (out, err) = exits(
        d,
        QED,
        &qed_io(true, "a.qed", &["read -P 0x11 2000 8000"]),
        1,
    );
    let all = out + &err;
    assert!(
        all.contains("failed at offset 6000"),
        "the first differing offset is 6000:\n{all}"
    );
    // Commands after a failing one still run; the exit code reports the failure.
    let cmds = ["read -P 0x12 1000 10", "read -P 0x11 1000 5000"];
    let (out, err) = exits(d, QED, &qed_io(true, "a.qed", &cmds), 1);
    assert!(err.contains("failed at offset 1000"), "{err}");
    assert!(out.contains("read 5000/5000 bytes at offset 1000"), "{out}");
    let cmds = [
        "read -P 0 0 1000",
        "read -P 0x11 1000 5000",
        "read -P 0 6000 4096",
    ];
    exits(d, QED, &qed_io(true, "a.qed", &cmds), 0);
}

#[test]
fn io_read_only_refuses_writes() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    create_qed(d, Tool::Ours, "a.qed", (64 * K, 4, 4 * M), None);
    Tool::Ours.run_io(d, "qed", "a.qed", &[Op::Write(0x11, 0, 100)]);
    let before = std::fs::read(d.join("a.qed")).unwrap();
    for cmd in [
        "write -P 0x22 0 100",
        "write -z 0 64k",
        "write -P 0x22 1M 100",
        "discard 0 64k",
    ] {
        let (_, err) = exits(d, QED, &qed_io(true, "a.qed", &[cmd]), 1);
        assert!(err.contains("read-only"), "`{cmd}` with -r: {err}");
    }
    assert_eq!(
        std::fs::read(d.join("a.qed")).unwrap(),
        before,
        "-r changed the image"
    );
    exits(d, QED, &qed_io(true, "a.qed", &["read -P 0x11 0 100"]), 0);
}

// ---------------------------------------------------------------------------------------
// `qed check` exit codes, next to qemu-img's on the same files.

fn u64_at(bytes: &[u8], off: u64) -> u64 {
    u64::from_le_bytes(bytes[off as usize..off as usize + 8].try_into().unwrap())
}

/// A 64 KiB-cluster image with one data cluster at guest offset 0, written by QEMU.
fn one_cluster_image(d: &Path) -> Vec<u8> {
    create_qed(d, Tool::Qemu, "a.qed", (64 * K, 4, 10 * M), None);
    Tool::Qemu.run_io(d, "qed", "a.qed", &[Op::Write(0x33, 0, 64 * K)]);
    std::fs::read(d.join("a.qed")).unwrap()
}

fn both_checks(d: &Path, img: &str, code: i32) -> (Value, Value) {
    let (ours, _) = exits(d, QED, &["check", "--output=json", img], code);
    let (theirs, _) = exits(
        d,
        QEMU_IMG,
        &["check", "--output=json", "-f", "qed", img],
        code,
    );
    (json("qed check", &ours), json("qemu-img check", &theirs))
}

#[test]
fn check_exit_code_clean() {
    let dir = TempDir::new().unwrap();
    one_cluster_image(dir.path());
    let (ours, theirs) = both_checks(dir.path(), "a.qed", 0);
    assert_eq!(ours, theirs);
    assert_eq!(ours["allocated-clusters"], 1);
}

#[test]
fn check_exit_code_corrupt_l2_entry() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let bytes = one_cluster_image(d);
    let l1 = u64_at(&bytes, 0x28);
    let l2 = u64_at(&bytes, l1);
    assert_ne!(l2, 0, "the write did not allocate an L2 table");
    assert_ne!(
        u64_at(&bytes, l2),
        0,
        "the write did not allocate a data cluster"
    );
    // A data cluster offset past the end of the file.
    let bogus = (bytes.len() as u64).next_multiple_of(64 * K) + 16 * 64 * K;
    File::options()
        .write(true)
        .open(d.join("a.qed"))
        .unwrap()
        .write_all_at(&bogus.to_le_bytes(), l2)
        .unwrap();
    let (ours, theirs) = both_checks(d, "a.qed", 2);
    assert_eq!(ours, theirs);
    assert_eq!(ours["corruptions"], 1);
    // The check is read-only: the corruption is still there.
    both_checks(d, "a.qed", 2);
}

#[test]
fn check_exit_code_leak_only() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let bytes = one_cluster_image(d);
    let f = File::options().write(true).open(d.join("a.qed")).unwrap();
    f.write_all_at(&[0xee; 64 * K as usize], bytes.len() as u64)
        .unwrap();
    let (ours, theirs) = both_checks(d, "a.qed", 3);
    assert_eq!(ours, theirs);
    assert_eq!(ours["leaks"], 1);
}

#[test]
fn check_exit_code_not_qed() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    std::fs::write(d.join("junk.img"), vec![0x5au8; 128 * K as usize]).unwrap();
    let (out, err) = exits(d, QED, &["check", "junk.img"], 1);
    assert!(
        !err.is_empty(),
        "no error message on stderr; stdout:\n{out}"
    );
    exits(d, QEMU_IMG, &["check", "-f", "qed", "junk.img"], 1);
    // Too short to hold a header at all.
    std::fs::write(d.join("tiny.img"), b"QED\0").unwrap();
    exits(d, QED, &["check", "tiny.img"], 1);
}
