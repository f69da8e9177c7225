//! Resizing and discarding never bring back data the guest did not write: a range that
//! grows back over a backing file, and a discarded cluster over one, read as zeros, in
//! our reads and in QEMU's, and stay zeros through a stream and a commit. And a cluster a
//! discard freed is reused after the flush that makes the drop durable.

mod common;

use common::{create_qed, new_dir, ok, QED, QEMU_IMG, QEMU_IO};
use std::path::Path;

const MIB: usize = 1 << 20;
const K: usize = 1024;

/// A base of 8 MiB filled with 0xbb, in `format`; returns its name.
fn base(dir: &Path, format: &str) -> String {
    let name = format!("base.{format}");
    ok(dir, QEMU_IMG, &["create", "-q", "-f", format, &name, "8M"]);
    ok(
        dir,
        QEMU_IO,
        &["-f", format, "-c", "write -P 0xbb 0 8M", &name],
    );
    name
}

/// The guest's bytes as `qed` reads them and as QEMU reads them, both checked against
/// `model`, and both checkers clean.
fn verify(dir: &Path, image: &str, model: &[u8], what: &str) {
    let ours = dir.join("ours.raw");
    let theirs = dir.join("theirs.raw");
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    ok(dir, QED, &["convert", "-O", "raw", image, "ours.raw"]);
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "qed", "-O", "raw", image, "theirs.raw"],
    );
    for (who, path) in [("qed", &ours), ("qemu-img", &theirs)] {
        let got = std::fs::read(path).unwrap();
        assert_eq!(
            got.len(),
            model.len(),
            "{what}: {who} reads a disk of another size"
        );
        if let Some(at) = (0..model.len()).find(|&i| got[i] != model[i]) {
            panic!(
                "{what}: {who} reads {:#04x} at {at}, the guest wrote {:#04x}",
                got[at], model[at]
            );
        }
    }
    ok(dir, QED, &["check", image]);
    ok(dir, QEMU_IMG, &["check", "-f", "qed", image]);
}

/// The disk a guest sees after a sequence of writes and resizes.
struct Model(Vec<u8>);

impl Model {
    fn filled(len: usize, byte: u8) -> Model {
        Model(vec![byte; len])
    }
    fn write(&mut self, at: usize, len: usize, byte: u8) {
        self.0[at..at + len].fill(byte);
    }
    /// A resize as the guest sees it: cut off, or grown with zeros.
    fn resize(&mut self, len: usize) {
        self.0.resize(len, 0);
    }
}

fn each_backing_format(mut f: impl FnMut(&Path, &str, &str)) {
    for format in ["raw", "qed", "qcow2"] {
        let d = new_dir();
        let base = base(d.path(), format);
        f(d.path(), format, &base);
    }
}

#[test]
fn shrink_then_grow_reads_zeros_over_the_backing_file() {
    each_backing_format(|dir, format, base| {
        ok(
            dir,
            QED,
            &["create", "-q", "-b", base, "-F", format, "ov.qed"],
        );
        ok(dir, QED, &["io", "-c", "write -P 0x11 1M 64k", "ov.qed"]);
        let mut model = Model::filled(8 * MIB, 0xbb);
        model.write(MIB, 64 * K, 0x11);
        // Not on a cluster boundary: the cluster it cuts keeps its head.
        ok(dir, QED, &["resize", "--shrink", "ov.qed", "2100k"]);
        model.resize(2100 * K);
        ok(dir, QED, &["resize", "ov.qed", "8M"]);
        model.resize(8 * MIB);
        verify(
            dir,
            "ov.qed",
            &model.0,
            &format!("shrink, grow over {format}"),
        );
        // Shrinking through the written cluster, then growing past the base.
        ok(dir, QED, &["resize", "--shrink", "ov.qed", "1056k"]);
        model.resize(1056 * K);
        ok(dir, QED, &["resize", "ov.qed", "12M"]);
        model.resize(12 * MIB);
        verify(
            dir,
            "ov.qed",
            &model.0,
            &format!("second shrink, grow over {format}"),
        );
        // A stream copies the backing data in and keeps the zeros.
        ok(dir, QED, &["stream", "ov.qed"]);
        let info = ok(dir, QED, &["info", "ov.qed"]);
        assert!(!info.contains("backing file"), "{info}");
        verify(dir, "ov.qed", &model.0, &format!("streamed over {format}"));
    });
}

#[test]
fn an_image_created_smaller_than_its_base_grows_with_zeros() {
    each_backing_format(|dir, format, base| {
        let size = 3 * MIB + 512;
        ok(
            dir,
            QED,
            &[
                "create",
                "-q",
                "-b",
                base,
                "-F",
                format,
                "ov.qed",
                &size.to_string(),
            ],
        );
        let mut model = Model::filled(size, 0xbb);
        // A write into the last cluster fills the rest of it from the backing file,
        // past the end of the disk too.
        ok(dir, QED, &["io", "-c", "write -P 0x22 3072k 512", "ov.qed"]);
        model.write(3 * MIB, 512, 0x22);
        ok(dir, QED, &["resize", "ov.qed", "+513k"]);
        model.resize(size + 513 * K);
        verify(
            dir,
            "ov.qed",
            &model.0,
            &format!("created small over {format}"),
        );
        ok(dir, QED, &["resize", "ov.qed", "9M"]);
        model.resize(9 * MIB);
        verify(
            dir,
            "ov.qed",
            &model.0,
            &format!("grown past the base {format}"),
        );
        if format != "qcow2" {
            // Commit carries the zeros into the base (grown to the overlay's size),
            // which then reads as the overlay did.
            ok(dir, QED, &["commit", "ov.qed"]);
            ok(
                dir,
                QEMU_IMG,
                &["convert", "-f", format, "-O", "raw", base, "base.out"],
            );
            let base_bytes = std::fs::read(dir.join("base.out")).unwrap();
            assert!(
                base_bytes == model.0,
                "the committed base over {format} differs from what the overlay read"
            );
            verify(
                dir,
                "ov.qed",
                &model.0,
                &format!("emptied by commit into {format}"),
            );
        }
    });
}

#[test]
fn discarded_clusters_read_zeros_even_where_never_written() {
    each_backing_format(|dir, format, base| {
        ok(
            dir,
            QED,
            &["create", "-q", "-b", base, "-F", format, "ov.qed"],
        );
        let mut model = Model::filled(8 * MIB, 0xbb);
        ok(dir, QED, &["io", "-c", "write -P 0x33 2M 128k", "ov.qed"]);
        model.write(2 * MIB, 128 * K, 0x33);
        // Whole clusters never written and clusters written read as zeros; a range
        // with no whole cluster in it (5000k..5100k) changes nothing.
        ok(
            dir,
            QED,
            &[
                "io",
                "-c",
                "discard 1M 2M",
                "-c",
                "discard 5000k 100k",
                "ov.qed",
            ],
        );
        model.write(MIB, 2 * MIB, 0);
        verify(dir, "ov.qed", &model.0, &format!("discard over {format}"));
        ok(dir, QED, &["io", "-c", "discard 4096k 1024k", "ov.qed"]);
        model.write(4 * MIB, MIB, 0);
        verify(
            dir,
            "ov.qed",
            &model.0,
            &format!("discard of a whole MiB over {format}"),
        );
        ok(dir, QED, &["stream", "ov.qed"]);
        verify(
            dir,
            "ov.qed",
            &model.0,
            &format!("streamed after discard over {format}"),
        );
    });
}

#[test]
fn a_discarded_cluster_is_reused_after_one_flush() {
    let d = new_dir();
    let dir = d.path();
    create_qed(dir, "disk.qed", "256M");
    ok(dir, QED, &["io", "-c", "write -P 0x44 0 64M", "disk.qed"]);
    let before = std::fs::metadata(dir.join("disk.qed")).unwrap().len();
    ok(
        dir,
        QED,
        &[
            "io",
            "-c",
            "discard 0 32M",
            "-c",
            "flush",
            "-c",
            "write -P 0x55 128M 32M",
            "-c",
            "flush",
            "-c",
            "map",
            "disk.qed",
        ],
    );
    let after = std::fs::metadata(dir.join("disk.qed")).unwrap().len();
    assert!(
        after <= before,
        "32 MiB written after 32 MiB were discarded and flushed grew the file from \
         {before} to {after} bytes"
    );
    ok(
        dir,
        QED,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0 0 32M",
            "-c",
            "read -P 0x44 32M 32M",
            "-c",
            "read -P 0x55 128M 32M",
            "disk.qed",
        ],
    );
    ok(dir, QEMU_IMG, &["check", "-f", "qed", "disk.qed"]);
    common::qemu::qemu_io(
        dir,
        "qed",
        "disk.qed",
        true,
        &["read -P 0x55 128M 32M", "read -P 0 0 32M"],
    );
}
