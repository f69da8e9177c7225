//! Discards through `qed io`, `qed compact` and `qed defrag`, judged by qemu-img and
//! qemu-io.

mod common;

use common::dir::{count, le64, set_le64, Dir, CLUSTER, HEADER_AND_L1, K, M};
use serde_json::Value;

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
