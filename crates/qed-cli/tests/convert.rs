//! `qed convert` and `qed compare` on images that qemu-img and qemu-io made (qcow2
//! chains, QED and raw sources, existing destinations, `-o backing_file`,
//! `--target-is-zero`), judged by qemu-img and qemu-io.

mod common;

use common::dir::{data_bytes, qcow2_chain, Dir, CLUSTER, HEADER_AND_L1, K, M};
use common::{QED, QEMU_IMG};
use serde_json::Value;

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
