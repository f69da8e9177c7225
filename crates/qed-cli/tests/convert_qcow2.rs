//! `qed convert -O qcow2`: new qcow2 images from raw, QED, qcow2 and http sources, in
//! several cluster sizes, over backing files, and writes into existing qcow2 images,
//! judged by qemu-img (check with no leaks, compare, map, info).

mod common;

use common::dir::{count, data_bytes, qcow2_chain, Dir, K, M};
use common::nginx::Nginx;
use serde_json::Value;

/// Converts `src` to qcow2 in clusters of `cs` and checks what qemu-img thinks of it:
/// version 3, the cluster size asked for, no corruption and no leak (exit 0), the
/// source's contents.
fn to_qcow2(d: &Dir, src: &str, cs: &str, extra: &[&str]) -> String {
    let dst = format!("{src}.{cs}.qcow2");
    let o = format!("cluster_size={cs}");
    let mut args = vec!["convert", "-O", "qcow2", "-o", &o];
    args.extend(extra);
    args.extend([src, &dst]);
    d.qed(&args);
    d.clean(&dst);
    d.same(src, &dst);
    // qed reads it back the same too.
    d.qed(&["compare", src, &dst]);
    let info = d.info(&dst);
    assert_eq!(info["format"], "qcow2", "{info:#}");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{info:#}");
    let bytes = size_of(cs);
    assert_eq!(info["cluster-size"], bytes, "{info:#}");
    dst
}

/// "4k", "2M", "512" in bytes.
fn size_of(s: &str) -> u64 {
    let (n, unit) = match s.strip_suffix('k') {
        Some(n) => (n, K),
        None => match s.strip_suffix('M') {
            Some(n) => (n, M),
            None => (s, 1),
        },
    };
    n.parse::<u64>().unwrap() * unit
}

/// The runs of `map` the image itself holds (depth 0, present), as (start, length).
fn own_runs(map: &[Value]) -> Vec<(u64, u64)> {
    map.iter()
        .filter(|r| r["depth"] == 0 && r["present"] == true)
        .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn raw_sources_in_three_cluster_sizes() {
    let d = Dir::new();
    // Whole clusters, a run inside one cluster, a run across a 2 MiB step, the last
    // sector.
    d.raw_image(
        "src.raw",
        "9M",
        &[
            (0, M, 0x31),
            (3 * M + 4 * K, 4 * K, 0x32),
            (6 * M - 100 * K, 300 * K, 0x33),
            (9 * M - 512, 512, 0x34),
        ],
    );
    for cs in ["4k", "64k", "2M"] {
        let dst = to_qcow2(&d, "src.raw", cs, &["-f", "raw"]);
        // Zeros are not data: only clusters holding the writes are allocated.
        let map = d.map(&dst);
        let cluster = size_of(cs);
        let data = data_bytes(&map, 0);
        assert!(data <= M + 400 * K + 4 * cluster, "{cs}: {map:?}");
        assert!(data >= M + 300 * K, "{cs}: {map:?}");
    }
}

#[test]
fn qcow2_v2_and_v3_chains_with_zero_and_compressed_clusters() {
    let d = Dir::new();
    for compat in ["0.10", "1.1"] {
        let top = qcow2_chain(&d, compat);
        for cs in ["4k", "64k", "2M"] {
            to_qcow2(&d, &top, cs, &[]);
        }
    }
}

#[test]
fn qed_sources_with_a_backing_file() {
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, M, 0x11), (3 * M, 100 * K, 0x12)]);
    d.qed_image(
        "over.qed",
        "4M",
        &["-b", "base.raw", "-F", "raw"],
        &[(100 * K, 200 * K, 0x55), (3 * M + 10, 10, 0x67)],
    );
    d.io("qed", "over.qed", &["write -z 512k 128k".into()]);
    for cs in ["4k", "64k", "2M"] {
        to_qcow2(&d, "over.qed", cs, &["-f", "qed"]);
    }
}

#[test]
fn http_sources() {
    let d = Dir::new();
    let nginx = Nginx::start();
    d.raw_image("src.raw", "4M", &[(M, 256 * K, 0x71)]);
    std::fs::copy(d.path("src.raw"), nginx.root().join("src.raw")).unwrap();
    let url = nginx.url("src.raw");
    d.qed(&["convert", "-f", "raw", "-O", "qcow2", &url, "web.qcow2"]);
    d.clean("web.qcow2");
    d.same("src.raw", "web.qcow2");
    assert_eq!(data_bytes(&d.map("web.qcow2"), 0), 256 * K);
}

#[test]
fn s0_writes_every_byte() {
    let d = Dir::new();
    d.raw_image("sparse.raw", "16M", &[(10 * M, 64 * K, 0x77)]);
    d.qed(&[
        "convert",
        "-S",
        "0",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "sparse.raw",
        "full.qcow2",
    ]);
    d.clean("full.qcow2");
    d.same("sparse.raw", "full.qcow2");
    let map = d.map("full.qcow2");
    assert_eq!(data_bytes(&map, 0), 16 * M, "{map:?}");
    d.qed(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "sparse.raw",
        "sparse.qcow2",
    ]);
    assert_eq!(data_bytes(&d.map("sparse.qcow2"), 0), 64 * K);
    assert!(d.len("sparse.qcow2") < M);
}

#[test]
fn a_backing_file_leaves_what_it_holds_unwritten() {
    let d = Dir::new();
    d.raw_image(
        "back.raw",
        "4M",
        &[(0, M, 0x11), (2 * M, 64 * K, 0x99), (3 * M, 64 * K, 0x11)],
    );
    d.img(&[
        "convert", "-q", "-f", "raw", "-O", "raw", "back.raw", "src.raw",
    ]);
    // Differs from the backing file in part of one cluster, and one cluster goes back
    // to zeros.
    d.io(
        "raw",
        "src.raw",
        &["write -P 0xab 1540k 8k".into(), "write -z 2M 64k".into()],
    );
    d.img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "back.raw",
        "back.qcow2",
    ]);
    let ways: [(&str, Vec<String>); 3] = [
        (
            "raw",
            ["-B", "back.raw", "-F", "raw"].map(String::from).to_vec(),
        ),
        (
            "qcow2",
            ["-B", "back.qcow2", "-F", "qcow2"]
                .map(String::from)
                .to_vec(),
        ),
        (
            "raw",
            ["-o", "backing_file=back.raw,backing_fmt=raw"]
                .map(String::from)
                .to_vec(),
        ),
    ];
    for (i, (fmt, how)) in ways.iter().enumerate() {
        let dst = format!("diff{i}.qcow2");
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend(how.iter().map(String::as_str));
        args.extend(["src.raw", &dst]);
        d.qed(&args);
        d.clean(&dst);
        d.same("src.raw", &dst);
        let info = d.info(&dst);
        let back = format!("back.{fmt}");
        assert_eq!(info["backing-filename"], back.as_str(), "{info:#}");
        assert_eq!(info["backing-filename-format"], *fmt, "{info:#}");
        let map = d.map(&dst);
        // Only the cluster holding the 8k write (the rest of it copied from the backing
        // file) and the zeroed cluster (a zero cluster) are the image's own.
        assert_eq!(
            own_runs(&map),
            [(1536 * K, 64 * K), (2 * M, 64 * K)],
            "{map:?}"
        );
        assert_eq!(data_bytes(&map, 0), 64 * K, "{map:?}");
    }
}

#[test]
fn n_writes_into_an_existing_qcow2_image() {
    let d = Dir::new();
    d.raw_image(
        "src.raw",
        "4M",
        &[(0, 64 * K, 0x21), (3 * M + 4 * K, 4 * K, 0x22)],
    );
    // Full of other data, so every zero run of the source must be written too.
    for compat in ["0.10", "1.1"] {
        let dst = format!("dst-{compat}.qcow2");
        let o = format!("compat={compat}");
        d.img(&["create", "-q", "-f", "qcow2", "-o", &o, &dst, "4M"]);
        d.write_runs("qcow2", &dst, &[(0, 4 * M, 0xcd)]);
        d.qed(&["convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", &dst]);
        d.same("src.raw", &dst);
        d.clean(&dst);
    }
    // Into one that qed made, in every cache mode.
    for cache in ["unsafe", "writeback", "none"] {
        let dst = format!("{cache}.qcow2");
        d.qed(&[
            "convert", "-t", cache, "-f", "raw", "-O", "qcow2", "src.raw", &dst,
        ]);
        d.clean(&dst);
        d.same("src.raw", &dst);
        d.write_runs("qcow2", &dst, &[(M, 2 * M, 0xee)]);
        d.qed(&[
            "convert", "-n", "-t", cache, "-p", "-f", "raw", "-O", "qcow2", "src.raw", &dst,
        ]);
        d.clean(&dst);
        d.same("src.raw", &dst);
    }
}

#[test]
fn bad_cluster_sizes_are_refused_and_nothing_is_created() {
    let d = Dir::new();
    d.raw_image("src.raw", "4M", &[(0, M, 0x11)]);
    for cs in ["256", "3k", "4M", "0"] {
        let o = format!("cluster_size={cs}");
        let err = d.qed_fails(
            &["convert", "-O", "qcow2", "-o", &o, "src.raw", "bad.qcow2"],
            "cluster_size",
        );
        assert!(err.contains("bad.qcow2"), "{err}");
        assert!(
            !d.path("bad.qcow2").exists(),
            "{cs}: a refused convert creates nothing"
        );
    }
    d.qed_fails(
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "table_size=2",
            "src.raw",
            "bad.qcow2",
        ],
        "table_size",
    );
    let err = d.qed_fails(
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "missing.raw",
            "src.raw",
            "bad.qcow2",
        ],
        "missing.raw",
    );
    assert!(!err.is_empty());
    assert!(!d.path("bad.qcow2").exists());
    // The smallest and the largest cluster sizes qcow2 has.
    for cs in ["512", "2M"] {
        to_qcow2(&d, "src.raw", cs, &[]);
    }
    let (code, j) = d.qemu_check("src.raw.512.qcow2");
    assert_eq!((code, count(&j, "leaks")), (0, 0), "{j:#}");
}

#[test]
fn zero_runs_off_the_block_grid_keep_their_edges() {
    let d = Dir::new();
    // 4k clusters: the runs the source reports as zeros start and end on 4k, which
    // blocks of 1536 or 3k bytes (-S) straddle, and are long enough (64k and more) to
    // be filled instead of read. Data everywhere first (more than the copy's 40 MiB of
    // buffers), so that its buffers hold stale bytes when they come.
    d.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "odd.qcow2",
        "64M",
    ]);
    let mut runs = vec![(0, 48 * M, 0x5a)];
    let mut at = 48 * M + 4 * K;
    for (i, gap) in [(1u64, 68 * K), (2, 132 * K), (3, 200 * K)] {
        runs.push((at, 4 * K * i, 0x60 + i as u8));
        at += 4 * K * i + gap;
    }
    runs.push((64 * M - 8 * K, 4 * K, 0x6f));
    d.write_runs("qcow2", "odd.qcow2", &runs);
    for s in ["1536", "3k", "4k", "64k", "0"] {
        for fmt in ["qcow2", "qed", "raw"] {
            let dst = format!("odd-{s}.{fmt}");
            d.qed(&["convert", "-S", s, "-O", fmt, "odd.qcow2", &dst]);
            d.same("odd.qcow2", &dst);
        }
    }
}
