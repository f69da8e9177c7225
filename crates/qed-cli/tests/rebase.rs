//! `qed rebase`, safe and unsafe, onto raw, QED and qcow2 backing files and onto none,
//! judged by qemu-img and qemu-io.

mod common;

use common::dir::{features, le64, long_name, model, Dir, BACKING_FILE, K, M, NO_PROBE};

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
