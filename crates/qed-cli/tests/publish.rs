//! Publishing: `qed convert SRC s3://BUCKET/KEY` against real S3 servers started here
//! on loopback ports (s3s-fs, and moto's server). Every source `qed convert` reads goes
//! up as QED and as raw; the object is read back by `qed` on its URL and by qemu-img
//! from a download, and its layout is checked (header, L1, every L2, then the data in
//! guest order). Interrupts and a dead server leave nothing under the key and no upload
//! behind; an object already at the key stays readable until the new one is complete.
//!
//! Where a server lacks a feature, the test says so and checks what it has:
//! - s3s-fs has no ListMultipartUploads: its uploads in progress are read from its
//!   directory (see `S3Server::uploads_in_progress`).
//! - s3s-fs takes an upload into a bucket that does not exist (and creates it): the
//!   missing bucket is tested on moto only.

mod common;

use common::nginx::Nginx;
use common::qemu::{assert_identical, qemu_img_check, qemu_written_base};
use common::s3::{Kind, S3Server};
use common::{exited_within, new_dir, ok, signal, wait_for, Killed, QEMU_IMG};
use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const BUCKET: &str = "published";

/// `base.qed` (qemu-made and -written, 64M), and the same guest as `base.raw` and
/// `base.qcow2`, in `dir`.
fn sources(dir: &Path) {
    qemu_written_base(dir);
    for (fmt, name) in [("raw", "base.raw"), ("qcow2", "base.qcow2")] {
        ok(dir, QEMU_IMG, &["convert", "-O", fmt, "base.qed", name]);
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()))
}

/// What a QED file's tables say, checked for the streaming layout: the L1 right after
/// the header, the L2 tables right after it in L1 order, then the data clusters packed
/// in guest order to the end of the file. Returns the data clusters' guest offsets, and
/// the guest offsets of zero clusters.
fn streaming_layout(file: &[u8]) -> (Vec<u64>, Vec<u64>) {
    assert_eq!(&file[..4], b"QED\0");
    let cluster = u32_at(file, 4);
    let table_bytes = u32_at(file, 8) * cluster;
    let header_size = u32_at(file, 12);
    let l1 = u64_at(file, 0x28);
    assert_eq!(l1, header_size * cluster, "the L1 table follows the header");
    let entries = table_bytes / 8;
    let mut next_table = l1 + table_bytes;
    let mut tables_end = next_table;
    let mut data = Vec::new();
    let mut zeros = Vec::new();
    let mut next_data = None;
    for i in 0..entries {
        let l2 = u64_at(file, (l1 + i * 8) as usize);
        if l2 == 0 {
            continue;
        }
        assert_eq!(l2, next_table, "L2 table {i} follows the one before it");
        next_table += table_bytes;
        tables_end = next_table;
        for j in 0..entries {
            let e = u64_at(file, (l2 + j * 8) as usize);
            let guest = (i * entries + j) * cluster;
            match e {
                0 => {}
                1 => zeros.push(guest),
                off => {
                    data.push((guest, off));
                    if let Some(n) = next_data {
                        assert_eq!(off, n, "data at guest {guest} follows the data before it");
                    }
                    next_data = Some(off + cluster);
                }
            }
        }
    }
    if let Some(&(_, first)) = data.first() {
        assert_eq!(first, tables_end, "the data follows the last table");
    }
    let end = next_data.unwrap_or(tables_end);
    assert_eq!(
        file.len() as u64,
        end,
        "the file ends with the last data cluster"
    );
    (data.into_iter().map(|(g, _)| g).collect(), zeros)
}

/// The object at `key`, downloaded into `dir` as `name`.
/// The composite CRC32 S3 keeps for an object uploaded in parts of `part` bytes: the
/// CRC32 of the parts' CRC32s, big-endian, in base64.
fn composite_crc32(bytes: &[u8], part: usize) -> String {
    use base64::Engine as _;
    let crcs: Vec<u8> = bytes
        .chunks(part)
        .flat_map(|p| crc32fast::hash(p).to_be_bytes())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(crc32fast::hash(&crcs).to_be_bytes())
}

fn download(server: &S3Server, key: &str, dir: &Path, name: &str) -> Vec<u8> {
    let bytes = server.get(BUCKET, key);
    std::fs::write(dir.join(name), &bytes).unwrap();
    bytes
}

/// Raw, QED, qcow2 and http sources, each published as QED and as raw, read back on
/// their URLs by `qed`, and downloaded and judged by qemu-img.
fn every_source_publishes_as_qed_and_raw(kind: Kind) {
    let server = S3Server::start(kind);
    server.create_bucket(BUCKET);
    let local = new_dir();
    let l = local.path();
    sources(l);
    let nginx = Nginx::start();
    std::fs::copy(l.join("base.qed"), nginx.root().join("base.qed")).unwrap();
    let http = nginx.url("base.qed");
    let base = l.join("base.qed");
    let base = base.to_str().unwrap();
    for (name, src) in [
        ("qed", base.to_string()),
        ("raw", l.join("base.raw").to_str().unwrap().to_string()),
        ("qcow2", l.join("base.qcow2").to_str().unwrap().to_string()),
        ("http", http.clone()),
    ] {
        for fmt in ["qed", "raw"] {
            let key = format!("from-{name}.{fmt}");
            let url = format!("s3://{BUCKET}/{key}");
            // Parts of 5 MiB: the raw object takes several, two in flight.
            server.qed_ok(
                l,
                &[
                    "convert",
                    "-p",
                    "-O",
                    fmt,
                    &src,
                    &url,
                    "--part-size",
                    "5M",
                    "--remote-connections",
                    "2",
                ],
            );
            let info: Value =
                serde_json::from_str(&server.qed_ok(l, &["info", "--output", "json", &url]))
                    .unwrap();
            assert_eq!(info["format"], fmt, "{kind:?} {key}");
            assert_eq!(info["virtual-size"], 64 << 20, "{kind:?} {key}");
            let out = server.qed_ok(l, &["compare", base, &url]);
            assert!(
                out.contains("Images are identical"),
                "{kind:?} {key}: {out}"
            );
            let map: Value =
                serde_json::from_str(&server.qed_ok(l, &["map", "--output", "json", &url]))
                    .unwrap();
            assert!(!map.as_array().unwrap().is_empty(), "{kind:?} {key}");
            let file = format!("{key}.download");
            let bytes = download(&server, &key, l, &file);
            // Every part went up with its CRC32 (which S3 checks on arrival): the
            // object's checksum is made of theirs. moto keeps it; s3s-fs keeps none.
            let kept = server.checksum_crc32(BUCKET, &key);
            assert!(kept.is_some() || kind == Kind::S3sFs, "{kind:?} {key}");
            if let Some(kept) = kept {
                let parts = format!("-{}", bytes.len().div_ceil(5 << 20));
                assert_eq!(
                    kept.trim_end_matches(&parts),
                    composite_crc32(&bytes, 5 << 20),
                    "{kind:?} {key}"
                );
            }
            if fmt == "qed" {
                let out = server.qed_ok(l, &["check", &url]);
                assert!(out.contains("No errors"), "{kind:?} {key}: {out}");
                qemu_img_check(l, &file);
                // The source's data is 0xab over 1M-4M, 0x11 at 40M, 0x5c over 63M-64M:
                // those clusters, in guest order, and nothing else.
                let (data, zeros) = streaming_layout(&bytes);
                let want: Vec<u64> = (16..64)
                    .chain([640])
                    .chain(1008..1024)
                    .map(|c| c * 65536)
                    .collect();
                assert_eq!(data, want, "{kind:?} {key}");
                assert!(zeros.is_empty(), "{kind:?} {key}");
            } else {
                assert_eq!(bytes.len(), 64 << 20, "{kind:?} {key}");
            }
            assert_identical(l, (fmt, &file), ("qed", "base.qed"));
        }
    }
    assert_eq!(server.uploads_in_progress(BUCKET), Vec::<String>::new());
}

/// With a backing file (-B), only what differs from it goes up: a changed cluster as
/// data, a cluster zeroed over the base's data as a zero cluster; the object reads its
/// base from the bucket, by the name given.
fn only_the_difference_goes_up_over_a_backing_file(kind: Kind) {
    let server = S3Server::start(kind);
    server.create_bucket(BUCKET);
    let local = new_dir();
    let l = local.path();
    qemu_written_base(l);
    server.qed_ok(
        l,
        &["convert", "base.qed", &format!("s3://{BUCKET}/base.qed")],
    );
    ok(
        l,
        QEMU_IMG,
        &[
            "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", "top.qed",
        ],
    );
    ok(
        l,
        common::QEMU_IO,
        &[
            "-c",
            "write -P 0x77 2M 64k",
            "-c",
            "write -z 40M 64k",
            "-c",
            "write -P 0xab 3M 64k",
            "top.qed",
        ],
    );
    let url = format!("s3://{BUCKET}/top.qed");
    server.qed_ok(
        l,
        &["convert", "-B", "base.qed", "-F", "qed", "top.qed", &url],
    );
    let info: Value =
        serde_json::from_str(&server.qed_ok(l, &["info", "--output", "json", &url])).unwrap();
    assert_eq!(info["backing-filename"], "base.qed", "{kind:?}: {info}");
    let out = server.qed_ok(l, &["compare", "top.qed", &url]);
    assert!(out.contains("Images are identical"), "{kind:?}: {out}");
    let out = server.qed_ok(l, &["check", &url]);
    assert!(out.contains("No errors"), "{kind:?}: {out}");
    let bytes = download(&server, "top.qed", l, "top.download");
    // 0xab at 3M is what the base holds there: not data of the overlay's own.
    let (data, zeros) = streaming_layout(&bytes);
    assert_eq!(data, [2 << 20], "{kind:?}");
    assert_eq!(zeros, [40 << 20], "{kind:?}");
    qemu_img_check(l, "top.download");
    assert_identical(l, ("qed", "top.download"), ("qed", "top.qed"));
}

/// A source large enough that its upload is seen in progress: 320 MiB of data, sent in
/// parts of 5 MiB one at a time.
fn big_source(dir: &Path) {
    ok(
        dir,
        QEMU_IMG,
        &["create", "-q", "-f", "raw", "big.raw", "384M"],
    );
    ok(
        dir,
        common::QEMU_IO,
        &["-f", "raw", "-c", "write -P 0x5a 0 320M", "big.raw"],
    );
}

/// `qed convert big.raw URL`, slowly, running.
fn start_upload(server: &S3Server, dir: &Path, url: &str, extra: &[&str]) -> Killed {
    let mut args = vec![
        "convert",
        "big.raw",
        url,
        "--part-size",
        "5M",
        "--remote-connections",
        "1",
    ];
    args.extend(extra);
    let child = server
        .qed_command(dir, &args, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Killed(child)
}

fn wait_for_upload(server: &S3Server) -> String {
    let mut ids = Vec::new();
    wait_for(Duration::from_secs(60), "an upload in progress", || {
        ids = server.uploads_in_progress(BUCKET);
        !ids.is_empty()
    });
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids.remove(0)
}

fn finished(child: Killed) -> (std::process::ExitStatus, String) {
    let mut child = child;
    let st = exited_within(&mut child.0, Duration::from_secs(120)).expect("qed to exit");
    let mut err = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    (st, err)
}

/// SIGINT and SIGTERM during the upload: the exit code says which signal, the upload
/// is aborted (no parts left), and the object already at the key is untouched; until
/// then the old object reads as it was.
fn an_interrupt_aborts_the_upload(kind: Kind) {
    let server = S3Server::start(kind);
    server.create_bucket(BUCKET);
    let local = new_dir();
    let l = local.path();
    big_source(l);
    let key = "big.qed";
    let url = format!("s3://{BUCKET}/{key}");
    let old = b"the object that was there before".to_vec();
    server.put(BUCKET, key, &old);
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let child = start_upload(&server, l, &url, &[]);
        wait_for_upload(&server);
        assert_eq!(server.get(BUCKET, key), old, "{kind:?}: during the upload");
        signal(child.0.id(), sig);
        let (st, err) = finished(child);
        assert_eq!(st.code(), Some(code), "{kind:?} SIG{sig}: {st:?} {err}");
        assert!(
            err.contains(&url) && err.contains(&format!("SIG{sig}")) && err.contains("aborted"),
            "{kind:?}: {err}"
        );
        assert_eq!(server.get(BUCKET, key), old, "{kind:?}: after SIG{sig}");
        assert_eq!(
            server.uploads_in_progress(BUCKET),
            Vec::<String>::new(),
            "{kind:?}: after SIG{sig}"
        );
    }
    // Without an object there before, none appears.
    let child = start_upload(&server, l, &format!("s3://{BUCKET}/new.qed"), &[]);
    wait_for_upload(&server);
    signal(child.0.id(), "INT");
    let (st, err) = finished(child);
    assert_eq!(st.code(), Some(130), "{kind:?}: {err}");
    assert_eq!(server.get_status(BUCKET, "new.qed"), 404, "{kind:?}");
    assert_eq!(server.uploads_in_progress(BUCKET), Vec::<String>::new());
}

/// The object at the key is replaced only when the upload completes: until then it
/// reads as it was, after it the new image is there.
fn the_old_object_stays_until_the_new_one_is_complete(kind: Kind) {
    let server = S3Server::start(kind);
    server.create_bucket(BUCKET);
    let local = new_dir();
    let l = local.path();
    big_source(l);
    let key = "big.qed";
    let url = format!("s3://{BUCKET}/{key}");
    qemu_written_base(l);
    server.qed_ok(l, &["convert", "base.qed", &url]);
    let child = start_upload(&server, l, &url, &[]);
    wait_for_upload(&server);
    // The old image, whole, while the new one goes up.
    let out = server.qed_ok(l, &["compare", "base.qed", &url]);
    assert!(out.contains("Images are identical"), "{kind:?}: {out}");
    let (st, err) = finished(child);
    assert!(st.success(), "{kind:?}: {st:?} {err}");
    let out = server.qed_ok(l, &["compare", "big.raw", &url]);
    assert!(out.contains("Images are identical"), "{kind:?}: {out}");
    assert_eq!(server.uploads_in_progress(BUCKET), Vec::<String>::new());
}

/// A server that dies mid-upload: the error names the URL, and, as the upload could
/// not be aborted, its id, so that it can be removed by hand.
fn a_dead_server_is_named_with_the_upload_left(kind: Kind) {
    let mut server = S3Server::start(kind);
    server.create_bucket(BUCKET);
    let local = new_dir();
    let l = local.path();
    big_source(l);
    let url = format!("s3://{BUCKET}/big.qed");
    let child = start_upload(
        &server,
        l,
        &url,
        &["--remote-deadline", "2", "--remote-timeout", "2"],
    );
    let id = wait_for_upload(&server);
    server.kill();
    let (st, err) = finished(child);
    assert!(
        !st.success() && st.signal().is_none(),
        "{kind:?}: {st:?} {err}"
    );
    assert!(
        err.contains(&url) && err.contains("could not be aborted") && err.contains(&id),
        "{kind:?}: {err}"
    );
}

/// What cannot work is refused before anything is sent, naming the URL; a bucket that
/// is not there is named as such.
fn bad_destinations_are_refused_naming_the_url(kind: Kind) {
    let server = S3Server::start(kind);
    server.create_bucket(BUCKET);
    let local = new_dir();
    let l = local.path();
    qemu_written_base(l);
    let e = server.qed_fails(l, &["convert", "base.qed", "s3://published"], &[]);
    assert!(e.contains("s3://published") && e.contains("no key"), "{e}");
    let url = format!("s3://{BUCKET}/x.qed");
    let e = server.qed_fails(
        l,
        &["convert", "base.qed", &url],
        &[("AWS_ACCESS_KEY_ID", None), ("AWS_SECRET_ACCESS_KEY", None)],
    );
    assert!(
        e.contains(&url) && e.contains("AWS_ACCESS_KEY_ID") && e.contains("credentials"),
        "{e}"
    );
    let e = server.qed_fails(l, &["convert", "-O", "qcow2", "base.qed", &url], &[]);
    assert!(e.contains(&url) && e.contains("qed or raw"), "{e}");
    let e = server.qed_fails(l, &["convert", "-n", "base.qed", &url], &[]);
    assert!(e.contains(&url) && e.contains("-n"), "{e}");
    // s3s-fs takes an upload into a bucket that is not there, and makes the bucket.
    if kind == Kind::Moto {
        let missing = "s3://no-such-bucket/x.qed";
        let e = server.qed_fails(l, &["convert", "base.qed", missing], &[]);
        assert!(
            e.contains(missing)
                && e.contains("the bucket 'no-such-bucket' does not exist")
                && e.contains("starting the upload"),
            "{kind:?}: {e}"
        );
    }
    assert_eq!(server.get_status(BUCKET, "x.qed"), 404);
    assert_eq!(server.uploads_in_progress(BUCKET), Vec::<String>::new());
}

#[test]
fn s3s_fs_every_source_publishes_as_qed_and_raw() {
    every_source_publishes_as_qed_and_raw(Kind::S3sFs);
}

#[test]
fn moto_every_source_publishes_as_qed_and_raw() {
    every_source_publishes_as_qed_and_raw(Kind::Moto);
}

#[test]
fn s3s_fs_only_the_difference_goes_up_over_a_backing_file() {
    only_the_difference_goes_up_over_a_backing_file(Kind::S3sFs);
}

#[test]
fn moto_only_the_difference_goes_up_over_a_backing_file() {
    only_the_difference_goes_up_over_a_backing_file(Kind::Moto);
}

#[test]
fn s3s_fs_an_interrupt_aborts_the_upload() {
    an_interrupt_aborts_the_upload(Kind::S3sFs);
}

#[test]
fn moto_an_interrupt_aborts_the_upload() {
    an_interrupt_aborts_the_upload(Kind::Moto);
}

#[test]
fn s3s_fs_the_old_object_stays_until_the_new_one_is_complete() {
    the_old_object_stays_until_the_new_one_is_complete(Kind::S3sFs);
}

#[test]
fn moto_the_old_object_stays_until_the_new_one_is_complete() {
    the_old_object_stays_until_the_new_one_is_complete(Kind::Moto);
}

#[test]
fn s3s_fs_a_dead_server_is_named_with_the_upload_left() {
    a_dead_server_is_named_with_the_upload_left(Kind::S3sFs);
}

#[test]
fn moto_a_dead_server_is_named_with_the_upload_left() {
    a_dead_server_is_named_with_the_upload_left(Kind::Moto);
}

#[test]
fn s3s_fs_bad_destinations_are_refused_naming_the_url() {
    bad_destinations_are_refused_naming_the_url(Kind::S3sFs);
}

#[test]
fn moto_bad_destinations_are_refused_naming_the_url() {
    bad_destinations_are_refused_naming_the_url(Kind::Moto);
}
