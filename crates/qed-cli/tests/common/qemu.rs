//! qemu-img and qemu-io as the tests' oracle: what QEMU reads, finds and reports on an
//! image.

use super::{ok, QEMU_IMG, QEMU_IO};
use serde_json::Value;
use std::path::Path;

/// qemu-io on `target` (`fmt` is raw for NBD URIs and mounted files). qemu-io exits
/// non-zero when a command fails, but a pattern mismatch is also looked for in the
/// output, so that a verification failure can never pass silently.
pub fn qemu_io(dir: &Path, fmt: &str, target: &str, read_only: bool, cmds: &[&str]) -> String {
    let mut args = vec!["-f", fmt];
    if read_only {
        args.push("-r");
    }
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    let out = ok(dir, QEMU_IO, &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {args:?} reported a failure:\n{out}"
    );
    out
}

/// Asserts that `qemu-img check` finds nothing wrong with the QED image `image`.
pub fn qemu_img_check(dir: &Path, image: &str) {
    let out = ok(dir, QEMU_IMG, &["check", "-f", "qed", image]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// `qemu-img info`'s JSON for the QED image `image`.
pub fn qemu_img_info(dir: &Path, image: &str) -> Value {
    let out = ok(
        dir,
        QEMU_IMG,
        &["info", "-f", "qed", "--output=json", image],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info JSON ({e}):\n{out}"))
}

/// Asserts that qemu-img compare finds the guest contents of `a` and `b`, each a
/// `(format, image)`, identical.
pub fn assert_identical(dir: &Path, a: (&str, &str), b: (&str, &str)) {
    let out = ok(dir, QEMU_IMG, &["compare", "-f", a.0, "-F", b.0, a.1, b.1]);
    assert!(out.contains("Images are identical"), "{out}");
}

/// The `(start, length, data)` runs of a `map --output=json` report (qemu-img's or qed's).
pub fn data_runs(map: &Value) -> Vec<(u64, u64, bool)> {
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The leaks `qemu-img check` reports on a clean QED file of `len` bytes: its
/// bytes-to-clusters rounding divides by `cluster - 1` where it means `cluster`, so it
/// counts clusters past the end of a file of `cluster - 1` clusters or more (16 MiB with
/// 4 KiB clusters) as leaked.
pub fn phantom_leaks(len: u64, cluster: u64) -> u64 {
    let len = len.div_ceil(cluster) * cluster;
    len / (cluster - 1) - len / cluster
}

/// `base.qed` in `dir`, 64M, made by qemu-img and written by qemu-io: 0xab over 1M-4M,
/// 0x11 over 64k at 40M, 0x5c over the last 1M; the rest unallocated.
pub fn qemu_written_base(dir: &Path) {
    ok(
        dir,
        QEMU_IMG,
        &["create", "-q", "-f", "qed", "base.qed", "64M"],
    );
    ok(
        dir,
        QEMU_IO,
        &[
            "-c",
            "write -P 0xab 1M 3M",
            "-c",
            "write -P 0x11 40M 64k",
            "-c",
            "write -P 0x5c 63M 1M",
            "base.qed",
        ],
    );
}
