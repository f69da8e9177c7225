//! `qed commit`, into raw and QED bases, with `-d` and with `-b` into a deeper base,
//! judged by qemu-img and qemu-io.

mod common;

use common::dir::{model, Dir, HEADER_AND_L1, K, M};

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
