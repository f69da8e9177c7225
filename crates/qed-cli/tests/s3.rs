//! S3 bases: the `qed` tool reading `s3://BUCKET/KEY` images from real S3 servers
//! started here on loopback ports (s3s-fs, and moto's server), judged by qemu-img
//! against the same images read locally; objects replaced under their overlays refused
//! by every later open until accepted; wrong endpoints named.
//!
//! Both servers are required (tests/run installs them): a missing one fails these tests
//! rather than skipping them. Objects are uploaded through each server's S3 API with
//! signed PUTs, as any client would.
//!
//! Where a server lacks a feature, the test says so and checks what it has:
//! - s3s-fs answers an unknown bucket with NoSuchKey, not NoSuchBucket, and ignores
//!   If-Match on GET (a replaced object is then caught by its new ETag instead of a 412).
//! - moto's server checks no signatures by default, and with its authentication turned
//!   on it reads only Authorization headers, not the presigned URLs sent here: bad
//!   credentials are tested on s3s-fs only.

mod common;

use common::qemu::{assert_identical, data_runs, qemu_written_base};
use common::s3::{Kind, S3Server};
use common::{describe, new_dir, ok, QED, QEMU_IMG, QEMU_IO};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A QED base that qemu-img made and qemu-io wrote, and its raw contents, in `dir`.
fn qemu_base(dir: &Path) {
    qemu_written_base(dir);
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-O", "raw", "base.qed", "base.raw"],
    );
}

/// The base images, uploaded to `bucket` as `images/base.qed` and `images/base.raw`.
fn upload_bases(server: &S3Server, bucket: &str, local: &Path) {
    server.create_bucket(bucket);
    for name in ["base.qed", "base.raw"] {
        let bytes = std::fs::read(local.join(name)).unwrap();
        server.put(bucket, &format!("images/{name}"), &bytes);
    }
}

fn qemu_compare(dir: &Path, a: &str, b: &Path) {
    assert_identical(dir, ("raw", a), ("raw", b.to_str().unwrap()));
}

/// Overlays on raw and QED bases in S3 read them byte for byte, write locally, and
/// leave the objects as they were; the tool takes s3:// names everywhere URLs work.
fn overlays_read_s3_bases_and_write_locally(kind: Kind) {
    let server = S3Server::start(kind);
    let local_dir = new_dir();
    let local = local_dir.path();
    qemu_base(local);
    upload_bases(&server, "qed-bases", local);
    let base_raw = local.join("base.raw");
    let work = new_dir();
    let w = work.path();
    let qed_url = "s3://qed-bases/images/base.qed";
    let raw_url = "s3://qed-bases/images/base.raw";

    // info, straight from the object.
    let info: Value =
        serde_json::from_str(&server.qed_ok(w, &["info", "--output", "json", qed_url])).unwrap();
    assert_eq!(info["filename"], qed_url);
    assert_eq!(info["format"], "qed");
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["cluster-size"], 65536);
    assert!(info.get("actual-size").is_none());
    let human = server.qed_ok(w, &["info", qed_url]);
    assert!(human.contains(&format!("image: {qed_url}")), "{human}");

    // An overlay on the QED base: no size given, it is the base's, found in S3.
    let out = server.qed_ok(w, &["create", "-b", qed_url, "-F", "qed", "top.qed"]);
    assert!(out.contains(&format!("backing_file={qed_url}")), "{out}");
    let info: Value =
        serde_json::from_str(&server.qed_ok(w, &["info", "--output", "json", "top.qed"])).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["backing-filename"], qed_url);
    assert_eq!(info["full-backing-filename"], qed_url);
    // QED records a backing format only for raw bases (its no-probe feature bit).
    assert!(info.get("backing-filename-format").is_none());
    server.qed_ok(w, &["convert", "-O", "raw", "top.qed", "top.raw"]);
    qemu_compare(w, "top.raw", &base_raw);
    server.qed_ok(
        w,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0xab 1M 3M",
            "-c",
            "read -P 0x11 40M 64k",
            "-c",
            "read -P 0x5c 63M 1M",
            "-c",
            "read -P 0 8M 1M",
            "top.qed",
        ],
    );

    // Writes land in the overlay; the base object is untouched.
    server.qed_ok(
        w,
        &[
            "io",
            "-c",
            "write -P 0x77 2M 64k",
            "-c",
            "write -P 0x78 50M 4k",
            "top.qed",
        ],
    );
    server.qed_ok(
        w,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0x77 2M 64k",
            "-c",
            "read -P 0xab 3M 64k",
            "-c",
            "read -P 0x78 50M 4k",
            "-c",
            "read -P 0 52432896 60k",
            "top.qed",
        ],
    );
    // QEMU finds the overlay consistent (read without its base: QEMU has no s3 driver).
    let no_base =
        r#"json:{"driver":"qed","file":{"driver":"file","filename":"top.qed"},"backing":null}"#;
    ok(w, QEMU_IMG, &["check", no_base]);
    ok(
        w,
        QEMU_IO,
        &[
            "-r",
            "-c",
            "read -P 0x77 2M 64k",
            "-c",
            "read -P 0x78 50M 4k",
            no_base,
        ],
    );
    assert_eq!(
        server.get("qed-bases", "images/base.qed"),
        std::fs::read(local.join("base.qed")).unwrap(),
        "the base object changed"
    );
    let e = server.qed_fails(w, &["commit", "top.qed"], &[]);
    assert!(e.contains(qed_url) && e.contains("read-only"), "{e}");
    let e = server.qed_fails(w, &["io", "-c", "write 0 512", qed_url], &[]);
    assert!(e.contains(qed_url) && e.contains("read-only"), "{e}");

    // A raw base, format probed.
    let out = server.qed(w, &["create", "-b", raw_url, "top2.qed"], &[]);
    assert!(out.status.success(), "{}", describe(QED, &["create"], &out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("detected raw"));
    let info: Value =
        serde_json::from_str(&server.qed_ok(w, &["info", "--output", "json", "top2.qed"])).unwrap();
    assert_eq!(info["backing-filename"], raw_url);
    assert_eq!(info["backing-filename-format"], "raw");
    server.qed_ok(w, &["convert", "-O", "raw", "top2.qed", "top2.raw"]);
    qemu_compare(w, "top2.raw", &base_raw);

    // Plain sources: convert, compare, map, io -r.
    server.qed_ok(w, &["convert", "-O", "raw", qed_url, "direct.raw"]);
    qemu_compare(w, "direct.raw", &base_raw);
    server.qed_ok(w, &["convert", "-O", "qed", raw_url, "copy.qed"]);
    assert_identical(w, ("qed", "copy.qed"), ("raw", base_raw.to_str().unwrap()));
    let same = server.qed_ok(w, &["compare", qed_url, base_raw.to_str().unwrap()]);
    assert!(same.contains("identical"), "{same}");
    let same = server.qed_ok(w, &["compare", qed_url, raw_url]);
    assert!(same.contains("identical"), "{same}");
    let map: Value =
        serde_json::from_str(&server.qed_ok(w, &["map", "--output", "json", qed_url])).unwrap();
    let theirs: Value = serde_json::from_str(&ok(
        local,
        QEMU_IMG,
        &["map", "--output", "json", "base.qed"],
    ))
    .unwrap();
    assert_eq!(data_runs(&map), data_runs(&theirs));
    server.qed_ok(
        w,
        &[
            "io",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x5c 63M 1M",
            raw_url,
        ],
    );

    // Streamed in, the overlay needs the bucket no more.
    server.qed_ok(
        w,
        &["create", "-q", "-b", qed_url, "-F", "qed", "streamed.qed"],
    );
    server.qed_ok(w, &["io", "-c", "write -P 0x66 2M 4k", "streamed.qed"]);
    server.qed_ok(w, &["stream", "streamed.qed"]);
    let info: Value = serde_json::from_str(&ok(
        w,
        QEMU_IMG,
        &["info", "--output", "json", "streamed.qed"],
    ))
    .unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    ok(w, QEMU_IMG, &["check", "streamed.qed"]);
    ok(
        w,
        QEMU_IO,
        &[
            "-c",
            "read -P 0xab 1M 1M",
            "-c",
            "read -P 0x66 2M 4k",
            "-c",
            "read -P 0xab 2052k 1020k",
            "-c",
            "read -P 0x11 40M 64k",
            "-c",
            "read -P 0x5c 63M 1M",
            "-c",
            "read -P 0 0 1M",
            "streamed.qed",
        ],
    );
}

/// Wrong names and wrong credentials fail at once with the URL and what to check; a
/// base replaced under its overlay is refused, naming it.
fn s3_errors_name_the_url_and_say_what_to_do(kind: Kind) {
    let server = S3Server::start(kind);
    let work = new_dir();
    let w = work.path();
    server.create_bucket("errors");
    let size = 4 << 20;
    let old: Vec<u8> = (0..size).map(|i| (i / 4096) as u8).collect();
    server.put("errors", "base.raw", &old);

    // A missing key.
    let url = "s3://errors/nosuch.qed";
    let e = server.qed_fails(w, &["info", url], &[]);
    assert!(
        e.contains(url) && e.contains("NoSuchKey") && e.contains("check the key"),
        "{e}"
    );
    let e = server.qed_fails(w, &["create", "-b", url, "-F", "qed", "top.qed"], &[]);
    assert!(e.contains(url) && e.contains("NoSuchKey"), "{e}");
    assert!(!w.join("top.qed").exists());

    // An unknown bucket.
    let url = "s3://no-such-bucket/base.raw";
    let e = server.qed_fails(w, &["info", url], &[]);
    match kind {
        Kind::Moto => assert!(
            e.contains(url)
                && e.contains("NoSuchBucket")
                && e.contains("the bucket 'no-such-bucket' does not exist"),
            "{e}"
        ),
        // s3s-fs says NoSuchKey for a key in a bucket it does not have.
        Kind::S3sFs => assert!(
            e.contains(url) && e.contains("404") && e.contains("'no-such-bucket'"),
            "{e}"
        ),
    }

    let url = "s3://errors/base.raw";
    let read = ["io", "-r", "-f", "raw", "-c", "read 0 4k", url];
    server.qed_ok(w, &read);
    // No credentials: the objects are private.
    let e = server.qed_fails(
        w,
        &read,
        &[("AWS_ACCESS_KEY_ID", None), ("AWS_SECRET_ACCESS_KEY", None)],
    );
    assert!(
        e.contains(url) && e.contains("403") && e.contains("anonymous"),
        "{e}"
    );
    // Half the credentials.
    let e = server.qed_fails(w, &read, &[("AWS_SECRET_ACCESS_KEY", None)]);
    assert!(
        e.contains(url) && e.contains("AWS_SECRET_ACCESS_KEY is not"),
        "{e}"
    );
    if kind == Kind::S3sFs {
        // Wrong credentials (moto checks none: see the module's doc).
        let e = server.qed_fails(w, &read, &[("AWS_SECRET_ACCESS_KEY", Some("wrong"))]);
        assert!(
            e.contains(url)
                && e.contains("SignatureDoesNotMatch")
                && e.contains("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "{e}"
        );
        let e = server.qed_fails(w, &read, &[("AWS_ACCESS_KEY_ID", Some("AKIAUNKNOWN"))]);
        assert!(
            e.contains(url)
                && e.contains("403")
                && e.contains("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "{e}"
        );
    }

    // The base is replaced, same size, while an overlay on it is open: the next read
    // that reaches the server is refused. Small chunks and no readahead, so that the
    // second read is not served from what the first brought.
    server.qed_ok(w, &["create", "-q", "-b", url, "-F", "raw", "over.qed"]);
    let old_tag = server.etag("errors", "base.raw");
    let mut child = server
        .qed_command(
            w,
            &[
                "io",
                "-r",
                "--remote-chunk-size",
                "64k",
                "--remote-readahead",
                "0",
                "-c",
                "read -P 0x01 4k 4k",
                "-c",
                "sleep 8000",
                "-c",
                "read -P 0x0c 3194880 4k",
                "over.qed",
            ],
            &[],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(
        first.starts_with("read 4096/4096 bytes at offset 4096"),
        "{first}"
    );
    let replaced_at = Instant::now();
    let new: Vec<u8> = old.iter().map(|b| b ^ 0xff).collect();
    server.put("errors", "base.raw", &new);
    assert!(
        replaced_at.elapsed() < Duration::from_secs(6),
        "replacing the object took {:?}: the reader's pause was too short for this machine",
        replaced_at.elapsed()
    );
    // Read on to the end, so that the reader never writes into a closed pipe.
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the read of a replaced base succeeded: {e}"
    );
    assert!(
        e.contains(url) && e.contains("the base image changed since it was opened"),
        "{e}"
    );
    match kind {
        // If-Match is sent with every read, and moto honours it.
        Kind::Moto => assert!(e.contains("412"), "{e}"),
        // s3s-fs ignores If-Match; the new ETag gives it away.
        Kind::S3sFs => assert!(e.contains("ETag was"), "{e}"),
    }
    // Reopened by another process, the overlay still knows which object it was written
    // against: refused, read-only or not, naming the URL and both ETags.
    let new_tag = server.etag("errors", "base.raw");
    assert_ne!(old_tag, new_tag);
    for args in [
        &["io", "-r", "-c", "read -P 0xf3 3194880 4k", "over.qed"][..],
        &["io", "-c", "write 0 4k", "over.qed"],
        &["stream", "over.qed"],
    ] {
        let e = server.qed_fails(w, args, &[]);
        assert!(
            e.contains(url)
                && e.contains(&format!("ETag {old_tag}"))
                && e.contains(&format!("ETag {new_tag}"))
                && e.contains(&format!("qed rebase -u -b {url} over.qed")),
            "{kind:?}: {e}"
        );
    }
    // Accepted by the user, it reads the new base.
    server.qed_ok(w, &["rebase", "-u", "-b", url, "-F", "raw", "over.qed"]);
    server.qed_ok(
        w,
        &["io", "-r", "-c", "read -P 0xf3 3194880 4k", "over.qed"],
    );

    // Between two commands: an overlay with data of its own, its base replaced.
    server.put("errors", "two.raw", &old);
    let url = "s3://errors/two.raw";
    server.qed_ok(w, &["create", "-q", "-b", url, "-F", "raw", "two.qed"]);
    server.qed_ok(w, &["io", "-c", "write -P 0x66 1M 64k", "two.qed"]);
    let old_tag = server.etag("errors", "two.raw");
    server.put("errors", "two.raw", &new);
    let new_tag = server.etag("errors", "two.raw");
    let e = server.qed_fails(w, &["convert", "-O", "raw", "two.qed", "two.out"], &[]);
    assert!(
        e.contains(url) && e.contains(&old_tag) && e.contains(&new_tag),
        "{kind:?}: {e}"
    );
    assert!(!w.join("two.out").exists());
    // QEMU, which has no s3 driver, opens the overlay with the backing file moved to a
    // local copy of the old object, and reads what we wrote and what the old base held.
    std::fs::write(w.join("old.raw"), &old).unwrap();
    std::fs::copy(w.join("two.qed"), w.join("two-local.qed")).unwrap();
    ok(
        w,
        QEMU_IMG,
        &[
            "rebase",
            "-u",
            "-f",
            "qed",
            "-b",
            "old.raw",
            "-F",
            "raw",
            "two-local.qed",
        ],
    );
    let mut expected = old.clone();
    expected[1 << 20..(1 << 20) + (64 << 10)].fill(0x66);
    std::fs::write(w.join("expected.raw"), &expected).unwrap();
    assert_identical(w, ("qed", "two-local.qed"), ("raw", "expected.raw"));

    // Between create and the first read: refused too.
    server.put("errors", "three.raw", &old);
    let url = "s3://errors/three.raw";
    server.qed_ok(w, &["create", "-q", "-b", url, "-F", "raw", "three.qed"]);
    let old_tag = server.etag("errors", "three.raw");
    server.put("errors", "three.raw", &new);
    let new_tag = server.etag("errors", "three.raw");
    let e = server.qed_fails(w, &["io", "-r", "-c", "read 0 4k", "three.qed"], &[]);
    assert!(
        e.contains(url) && e.contains(&old_tag) && e.contains(&new_tag),
        "{kind:?}: {e}"
    );

    // Under a running stream: it stops, and running it again is refused.
    server.put("errors", "four.raw", &old);
    let url = "s3://errors/four.raw";
    server.qed_ok(w, &["create", "-q", "-b", url, "-F", "raw", "four.qed"]);
    let old_tag = server.etag("errors", "four.raw");
    let child = server
        .qed_command(
            w,
            &[
                "stream",
                "--rate",
                "1M",
                "--remote-readahead",
                "0",
                "four.qed",
            ],
            &[],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    server.put("errors", "four.raw", &new);
    let new_tag = server.etag("errors", "four.raw");
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{kind:?}: the stream went on: {e}");
    assert!(
        e.contains(url) && e.contains("changed since it was opened"),
        "{kind:?}: {e}"
    );
    let e = server.qed_fails(w, &["stream", "four.qed"], &[]);
    assert!(
        e.contains(url) && e.contains(&old_tag) && e.contains(&new_tag),
        "{kind:?}: {e}"
    );
    // What it copied is the old object's, as QEMU reads it with a local copy of that.
    std::fs::copy(w.join("four.qed"), w.join("four-local.qed")).unwrap();
    ok(
        w,
        QEMU_IMG,
        &[
            "rebase",
            "-u",
            "-f",
            "qed",
            "-b",
            "old.raw",
            "-F",
            "raw",
            "four-local.qed",
        ],
    );
    assert_identical(w, ("qed", "four-local.qed"), ("raw", "old.raw"));

    // Wrong endpoints are named in the message: a port nothing listens on (retried
    // until the deadline, said once), and an endpoint with a path, which puts the
    // bucket under that path.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let wrong = format!("http://127.0.0.1:{closed}");
    let started = Instant::now();
    let e = server.qed_fails(
        w,
        &["info", "--remote-deadline", "2", "s3://errors/base.raw"],
        &[("AWS_ENDPOINT_URL_S3", Some(&wrong))],
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        e.contains("s3://errors/base.raw")
            && e.contains(&format!("(endpoint {wrong}/)"))
            && e.contains("deadline"),
        "{e}"
    );
    assert_eq!(e.matches("retrying until 2 s").count(), 1, "{e}");
    let with_path = format!("{}/store", server.endpoint());
    let e = server.qed_fails(
        w,
        &["info", "s3://errors/base.raw"],
        &[("AWS_ENDPOINT_URL_S3", Some(&with_path))],
    );
    assert!(
        e.contains("s3://errors/base.raw")
            && e.contains(&format!("endpoint {with_path}/"))
            && e.contains("has a path (/store/)"),
        "{kind:?}: {e}"
    );
}

#[test]
fn s3s_fs_overlays_read_s3_bases_and_write_locally() {
    overlays_read_s3_bases_and_write_locally(Kind::S3sFs);
}

#[test]
fn moto_overlays_read_s3_bases_and_write_locally() {
    overlays_read_s3_bases_and_write_locally(Kind::Moto);
}

#[test]
fn s3s_fs_errors_name_the_url_and_say_what_to_do() {
    s3_errors_name_the_url_and_say_what_to_do(Kind::S3sFs);
}

#[test]
fn moto_errors_name_the_url_and_say_what_to_do() {
    s3_errors_name_the_url_and_say_what_to_do(Kind::Moto);
}
