//! The options qemu-img users pass: `-o` keys, repeated options, `-q`, and `qed info
//! --backing-chain`; and the output of a command whose reader stops early.

mod common;

use common::dir::{features, fully_allocated, Dir, CLUSTER, G, K, M, NO_PROBE};
use common::{QED, QEMU_IMG};
use serde_json::Value;
use std::process::Command;

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
