//! Commands refused for their arguments, or for writing into their own source chain,
//! change no file; errors name their file once.

mod common;

use common::dir::{long_name, patch, set_need_check, Dir, K, M};
use common::QED;

/// Runs `qed ARGS`, expecting failure with `needle` on stderr, and asserts that none of
/// `files` changed.
fn refused(d: &Dir, args: &[&str], needle: &str, files: &[&str]) {
    let before: Vec<Vec<u8>> = files.iter().map(|f| d.bytes(f)).collect();
    d.qed_fails(args, needle);
    for (f, b) in files.iter().zip(before) {
        assert!(d.bytes(f) == b, "`qed {}` changed {f}", args.join(" "));
    }
}

#[test]
fn bad_arguments_change_nothing() {
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, M, 0x11)]);
    d.qed_image("src.qed", "4M", &[], &[(0, 4 * M, 0x42)]);
    d.qed_image(
        "top.qed",
        "4M",
        &["-b", "base.raw", "-F", "raw"],
        &[(M, 64 * K, 0x43)],
    );
    d.qed_image("dst.qed", "4M", &[], &[(0, 64 * K, 0x44)]);
    d.qed_image("small.qed", "1M", &[], &[(0, 64 * K, 0x45)]);
    let all = ["base.raw", "src.qed", "top.qed", "dst.qed", "small.qed"];

    refused(
        &d,
        &["convert", "missing.qed", "dst.qed"],
        "missing.qed",
        &all,
    );
    refused(
        &d,
        &["convert", "-f", "vmdk", "src.qed", "dst.qed"],
        "vmdk",
        &all,
    );
    refused(
        &d,
        &["convert", "-O", "vmdk", "src.qed", "dst.qed"],
        "vmdk",
        &all,
    );
    refused(
        &d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4M",
            "src.qed",
            "dst.qed",
        ],
        "cluster_size",
        &all,
    );
    refused(
        &d,
        &["convert", "-S", "1000", "src.qed", "dst.qed"],
        "-S",
        &all,
    );
    refused(
        &d,
        &["convert", "-o", "cluster_size=3k", "src.qed", "dst.qed"],
        "cluster",
        &all,
    );
    refused(&d, &["convert", "src.qed", "src.qed"], "same file", &all);
    refused(
        &d,
        &["convert", "-n", "src.qed", "small.qed"],
        "smaller than the source",
        &all,
    );
    refused(
        &d,
        &["convert", "-B", "missing.raw", "src.qed", "dst.qed"],
        "missing.raw",
        &all,
    );
    refused(
        &d,
        &["compare", "-f", "vmdk", "src.qed", "dst.qed"],
        "vmdk",
        &all,
    );
    refused(&d, &["resize", "src.qed", "1M"], "--shrink", &all);
    refused(&d, &["resize", "src.qed", "lots"], "lots", &all);
    refused(&d, &["resize", "-f", "raw", "base.raw", "8M"], "raw", &all);
    refused(
        &d,
        &["rebase", "-b", "missing.raw", "top.qed"],
        "missing.raw",
        &all,
    );
    refused(
        &d,
        &["rebase", "-b", "base.raw", "-F", "vmdk", "top.qed"],
        "vmdk",
        &all,
    );
    refused(&d, &["commit", "src.qed"], "no backing file", &all);
    refused(&d, &["commit", "missing.qed"], "missing.qed", &all);
    refused(&d, &["measure", "-O", "raw", "--size", "1G"], "qed", &all);
    refused(&d, &["check", "-r", "all", "base.raw"], "QED", &all);

    // Names longer than the header area (64k - 64 bytes) or than 4095 bytes.
    d.raw_image("b.raw", "4M", &[]);
    let name = long_name(4097, "b.raw");
    refused(&d, &["rebase", "-u", "-b", &name, "top.qed"], "4095", &all);
    refused(&d, &["rebase", "-b", &name, "top.qed"], "4095", &all);
    // With 4k clusters the header area holds 4096 - 64 bytes of name.
    let name = long_name(4033, "b.raw");
    refused(
        &d,
        &[
            "convert",
            "-o",
            "cluster_size=4k",
            "-B",
            &name,
            "-F",
            "raw",
            "src.qed",
            "dst.qed",
        ],
        "4032",
        &all,
    );
}

/// qcow2 images open read-write only for `convert -n`: io, serve and mount refuse to
/// write one, and say how to go on.
#[test]
fn qcow2_is_written_only_by_convert() {
    let d = Dir::new();
    d.img(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    d.io("qcow2", "a.qcow2", &["write -P 0x21 0 64k".to_string()]);
    let all = ["a.qcow2"];
    refused(
        &d,
        &["io", "-c", "write -P 0x22 0 4k", "a.qcow2"],
        "--in-place",
        &all,
    );
    refused(
        &d,
        &["serve", "--socket", "x.sock", "a.qcow2"],
        "read-only",
        &all,
    );
}

#[test]
fn writing_into_the_source_chain_is_refused() {
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, M, 0x11)]);
    d.qed_image(
        "mid.qed",
        "4M",
        &["-b", "base.raw", "-F", "raw"],
        &[(M, 64 * K, 0x12)],
    );
    d.qed_image(
        "top.qed",
        "4M",
        &["-b", "mid.qed", "-F", "qed"],
        &[(2 * M, 64 * K, 0x13)],
    );
    let all = ["base.raw", "mid.qed", "top.qed"];
    // The destination is a backing file of the source, however it is spelled.
    refused(
        &d,
        &["convert", "-O", "raw", "top.qed", "base.raw"],
        "backing file of the source",
        &all,
    );
    let other_spelling = format!("{}/./base.raw", d.path("").display());
    refused(
        &d,
        &["convert", "-O", "raw", "top.qed", &other_spelling],
        "backing file of the source",
        &all,
    );
    refused(
        &d,
        &["convert", "top.qed", "mid.qed"],
        "backing file of the source",
        &all,
    );
    refused(
        &d,
        &["convert", "-n", "top.qed", "mid.qed"],
        "backing file of the source",
        &all,
    );
    // The new backing file of the destination is the destination itself.
    d.raw_image("src.raw", "4M", &[(0, 64 * K, 0x14)]);
    d.qed_image("dst.qed", "4M", &[], &[(0, 64 * K, 0x15)]);
    refused(
        &d,
        &[
            "convert", "-B", "dst.qed", "-F", "qed", "src.raw", "dst.qed",
        ],
        "own backing chain",
        &["src.raw", "dst.qed"],
    );
    // A rebase that would make an image its own backing file, directly or through
    // another image of the chain.
    for mode in [&[][..], &["-u"][..]] {
        let mut args = vec!["rebase"];
        args.extend_from_slice(mode);
        args.extend_from_slice(&["-b", "top.qed", "-F", "qed", "top.qed"]);
        refused(&d, &args, "backing file of itself", &all);
    }
    refused(
        &d,
        &["rebase", "-b", "top.qed", "-F", "qed", "mid.qed"],
        "backing file of itself",
        &all,
    );
    // The chain still reads as it was.
    d.expect_reads(
        "top.qed",
        &[(0, M, 0x11), (M, 64 * K, 0x12), (2 * M, 64 * K, 0x13)],
    );
}

#[test]
fn refusals_leave_an_image_with_need_check_untouched() {
    // A read-write open of such an image repairs it; a refused command must not get
    // that far.
    let d = Dir::new();
    d.raw_image("base.raw", "4M", &[(0, M, 0x11)]);
    d.qed_image(
        "top.qed",
        "4M",
        &["-b", "base.raw", "-F", "raw"],
        &[(M, 64 * K, 0x43)],
    );
    d.qed_image("alone.qed", "4M", &[], &[(0, 64 * K, 0x44)]);
    d.qed_image("src.qed", "8M", &[], &[(0, 64 * K, 0x45)]);
    patch(&d, "top.qed", |b| set_need_check(b));
    patch(&d, "alone.qed", |b| set_need_check(b));
    let all = ["base.raw", "top.qed", "alone.qed", "src.qed"];
    let name = long_name(4098, "base.raw");
    refused(&d, &["rebase", "-u", "-b", &name, "top.qed"], "4095", &all);
    refused(
        &d,
        &["rebase", "-b", "missing.raw", "top.qed"],
        "missing.raw",
        &all,
    );
    refused(&d, &["resize", "top.qed", "1M"], "--shrink", &all);
    refused(&d, &["resize", "top.qed", "1P"], "maximum", &all);
    refused(&d, &["commit", "alone.qed"], "no backing file", &all);
    refused(
        &d,
        &["convert", "-n", "src.qed", "alone.qed"],
        "smaller than the source",
        &all,
    );
    refused(
        &d,
        &[
            "convert",
            "-n",
            "-o",
            "cluster_size=4k",
            "src.qed",
            "alone.qed",
        ],
        "-o has no effect",
        &all,
    );
}

/// Errors about a file name it exactly once, and a file that is not QED says so.
#[test]
fn errors_name_the_file_once() {
    let d = Dir::new();
    std::fs::write(d.path("notes.txt"), "hello\n").unwrap();
    let stderr_of = |args: &[&str]| {
        let out = d.run(QED, args);
        assert_ne!(
            out.status.code(),
            Some(0),
            "{}",
            d.describe(QED, args, &out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let once = |text: &str, name: &str| {
        assert_eq!(
            text.matches(name).count(),
            1,
            "{name} named once in: {text}"
        );
    };

    // Probed, a text file is a raw image, to us as to qemu-img.
    let out = d.qed(&["info", "notes.txt"]);
    assert!(out.contains("file format: raw"), "{out}");
    for args in [
        &["check", "notes.txt"][..],
        &["info", "-f", "qed", "notes.txt"],
    ] {
        let e = stderr_of(args);
        assert!(
            e.contains("notes.txt is not a QED image (no QED magic"),
            "{args:?}: {e}"
        );
        once(&e, "notes.txt");
    }
    for args in [
        &["info", "missing.qed"][..],
        &["compare", "missing.qed", "notes.txt"],
        &["convert", "missing.qed", "out.qed"],
        &["resize", "missing.qed", "2M"],
        &["create", "-b", "missing.qed", "-F", "qed", "top.qed"],
    ] {
        let e = stderr_of(args);
        assert!(e.contains("missing.qed: No such file"), "{args:?}: {e}");
        once(&e, "missing.qed");
    }

    // A backing file that went away is named once, by the image that needs it.
    d.qed(&["create", "base.qed", "1M"]);
    d.qed(&["create", "-b", "base.qed", "-F", "qed", "top.qed"]);
    std::fs::remove_file(d.path("base.qed")).unwrap();
    let e = stderr_of(&["io", "-c", "read 0 512", "top.qed"]);
    assert!(e.contains("backing file base.qed: No such file"), "{e}");
    once(&e, "base.qed");
}

/// A usage error ends with status 1, as qemu-img's do: `check` keeps 2 and 3 for
/// corruptions and leaks, and `compare` keeps 2 for an error comparing; help still ends
/// with 0.
#[test]
fn usage_errors_end_with_status_one() {
    let d = Dir::new();
    d.expect(QED, &["create", "-q", "a.qed", "1M"], 0);
    for args in [
        &["check", "-f", "vmdk", "a.qed"][..],
        &["check", "--bogus", "a.qed"],
        &["check"],
        &["compare", "-f", "vmdk", "a.qed", "a.qed"],
        &["create", "b.qed", "1Z"],
        &["info", "--output=xml", "a.qed"],
    ] {
        let out = d.expect(QED, args, 1);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("error:"), "`qed {}`: {e}", args.join(" "));
    }
    let help = d.expect(QED, &["check", "--help"], 0);
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: qed check"));
}

/// The vhost-user-blk export refuses what it cannot serve before it listens, and a
/// file in the way of its socket is left alone.
#[test]
fn vhost_user_blk_options_are_checked_first() {
    let d = Dir::new();
    d.qed_image("disk.qed", "4M", &[], &[(0, 64 * K, 0x46)]);
    d.raw_image("in-the-way", "4K", &[(0, 4 * K, 0x47)]);
    let all = ["disk.qed", "in-the-way"];
    refused(
        &d,
        &["serve", "--num-queues", "2", "disk.qed"],
        "--vhost-user-blk",
        &all,
    );
    refused(
        &d,
        &[
            "serve",
            "--vhost-user-blk",
            "v.sock",
            "-k",
            "n.sock",
            "disk.qed",
        ],
        "cannot be used with",
        &all,
    );
    refused(
        &d,
        &[
            "serve",
            "--vhost-user-blk",
            "v.sock",
            "--num-queues",
            "0",
            "disk.qed",
        ],
        "0",
        &all,
    );
    refused(
        &d,
        &[
            "serve",
            "--vhost-user-blk",
            "v.sock",
            "--logical-block-size",
            "1024",
            "disk.qed",
        ],
        "1024",
        &all,
    );
    refused(
        &d,
        &["serve", "--vhost-user-blk", "in-the-way", "disk.qed"],
        "in-the-way exists and is not a socket",
        &all,
    );
}
