//! `qed check` with repairs (`-r leaks`, `-r all`) and the repair at a read-write open,
//! on images damaged by hand, judged by qemu-img check and qemu-io.

mod common;

use common::dir::{count, le32, le64, patch, set_le64, set_need_check, Dir, CLUSTER, G, K, M};
use common::QED;

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
