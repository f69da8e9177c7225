//! `qed resize` and `qed measure`, judged by qemu-img and qemu-io and by the format's
//! arithmetic.

mod common;

use common::dir::{fully_allocated, qcow2_chain, Dir, CLUSTER, G, HEADER_AND_L1, K, M};
use serde_json::Value;

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
