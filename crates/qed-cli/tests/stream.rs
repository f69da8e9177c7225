//! `qed stream` and `--copy-on-read` against real servers and QEMU's tools: a base
//! behind nginx streamed into a local overlay, only its allocated clusters crossing the
//! wire; copy-on-read filling only what was read; a base replaced mid-stream refused;
//! streams that keep a base, judged by qemu-img.

mod common;

use common::nginx::Nginx;
use common::qemu::{assert_identical, qemu_img_info, qemu_io};
use common::{etag_of, fails, has_pin_record, ok, QED, QEMU_IMG};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A sparse 4 GiB QED base, made by qemu-img and written by qemu-io, in nginx's root,
/// with a raw copy of its contents in `work`. Returns its file length.
fn sparse_base(nginx: &Nginx, work: &Path) -> u64 {
    let www = nginx.root();
    ok(
        &www,
        QEMU_IMG,
        &["create", "-q", "-f", "qed", "base.qed", "4G"],
    );
    qemu_io(
        &www,
        "qed",
        "base.qed",
        false,
        &[
            "write -P 0x21 0 1M",
            "write -P 0x22 100M 64k",
            "write -P 0x23 3000M 2M",
            "write -z 3001M 64k",
        ],
    );
    ok(
        work,
        QEMU_IMG,
        &[
            "convert",
            "-O",
            "raw",
            www.join("base.qed").to_str().unwrap(),
            "base.raw",
        ],
    );
    std::fs::metadata(www.join("base.qed")).unwrap().len()
}

#[test]
fn streaming_an_http_base_moves_only_its_allocated_clusters() {
    let nginx = Nginx::start();
    let work = common::new_dir();
    let w = work.path();
    let file_len = sparse_base(&nginx, w);
    let url = nginx.url("base.qed");
    ok(
        w,
        QED,
        &["create", "-q", "-b", &url, "-F", "qed", "top.qed"],
    );
    let before_stream = nginx.bytes_sent("base.qed");

    ok(w, QED, &["stream", "-p", "top.qed"]);

    // Header, L1, the L2 tables in use and 3 MiB of data, each once (plus the one-byte
    // probe that finds the size); never the 4 GiB.
    let sent = nginx.bytes_sent("base.qed") - before_stream;
    assert!(file_len < 4 << 20, "{file_len}");
    assert!(
        sent <= file_len + 1,
        "sent {sent} bytes of a {file_len}-byte base"
    );
    assert!(sent >= 3 << 20, "sent only {sent} bytes");

    let i = qemu_img_info(w, "top.qed");
    assert!(i.get("backing-filename").is_none(), "{i}");
    ok(w, QEMU_IMG, &["check", "top.qed"]);
    ok(
        w,
        QEMU_IMG,
        &["compare", "-f", "qed", "-F", "raw", "top.qed", "base.raw"],
    );
    // Only what the base had: the image stays sparse.
    let top_len = std::fs::metadata(w.join("top.qed")).unwrap().len();
    assert!(top_len < 8 << 20, "top.qed is {top_len} bytes");

    // The server is gone: the image no longer needs it.
    drop(nginx);
    ok(
        w,
        QEMU_IMG,
        &["compare", "-f", "qed", "-F", "raw", "top.qed", "base.raw"],
    );
}

#[test]
fn copy_on_read_fills_only_what_was_read() {
    let mut nginx = Nginx::start();
    let work = common::new_dir();
    let w = work.path();
    sparse_base(&nginx, w);
    let url = nginx.url("base.qed");
    ok(
        w,
        QED,
        &["create", "-q", "-b", &url, "-F", "qed", "top.qed"],
    );

    ok(
        w,
        QED,
        &[
            "io",
            "--copy-on-read",
            "-c",
            "read -P 0x21 128k 64k",
            "-c",
            "read -P 0x23 3000M 4k",
            "top.qed",
        ],
    );
    let map: Value =
        serde_json::from_str(&ok(w, QED, &["map", "--output", "json", "top.qed"])).unwrap();
    let local: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    // Whole 64 KiB clusters around what was read, nothing else.
    assert_eq!(
        local,
        vec![(128 << 10, 64 << 10), (3000 << 20, 64 << 10)],
        "{map}"
    );
    ok(w, QEMU_IMG, &["check", "top.qed"]);

    // What was read is local now: it reads without the server (QEMU, told to open no
    // backing file, reads it from the image); the rest does not.
    nginx.stop();
    let alone =
        r#"json:{"driver":"qed","file":{"driver":"file","filename":"top.qed"},"backing":null}"#;
    qemu_io(
        w,
        "qed",
        alone,
        true,
        &[
            "read -P 0x21 128k 64k",
            "read -P 0x23 3000M 64k",
            "read -P 0 0 64k",
        ],
    );
    let err = fails(
        w,
        QED,
        &[
            "io",
            "--remote-deadline",
            "2",
            "-r",
            "-c",
            "read 0 4k",
            "top.qed",
        ],
    );
    assert!(err.contains(&url), "{err}");
}

/// A 64 MiB raw base of `byte`s behind `nginx`, and an overlay on it in `w`. Returns the
/// base's URL.
fn raw_base_and_overlay(nginx: &Nginx, w: &Path, byte: u8) -> String {
    let www = nginx.root();
    ok(
        &www,
        QEMU_IMG,
        &["create", "-q", "-f", "raw", "base.raw", "64M"],
    );
    qemu_io(
        &www,
        "raw",
        "base.raw",
        false,
        &[&format!("write -P {byte:#x} 0 64M")],
    );
    let url = nginx.url("base.raw");
    ok(
        w,
        QED,
        &["create", "-q", "-b", &url, "-F", "raw", "top.qed"],
    );
    url
}

#[test]
fn a_base_replaced_mid_stream_stops_it_and_touches_nothing_more() {
    let nginx = Nginx::start();
    let work = common::new_dir();
    let w = work.path();
    let www = nginx.root();
    let url = raw_base_and_overlay(&nginx, w, 0x31);
    let old_tag = etag_of(&url);

    let child = Command::new(QED)
        .args(["stream", "--rate", "8M", "top.qed"])
        .current_dir(w)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // A new object under the same name: another ETag.
    let tmp = www.join("new.raw");
    std::fs::write(&tmp, vec![0x32u8; 64 << 20]).unwrap();
    std::fs::rename(&tmp, www.join("base.raw")).unwrap();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(!out.status.success(), "the stream went on over a new base");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("changed"), "{err}");

    // Consistent, still naming its base, and what it copied is the old base's.
    ok(w, QEMU_IMG, &["check", "top.qed"]);
    let i = qemu_img_info(w, "top.qed");
    assert_eq!(i["backing-filename"], url.as_str(), "{i}");
    // Asked of QEMU: our own tools no longer open the overlay over the new object.
    let map: Value = serde_json::from_str(&ok(
        w,
        QEMU_IMG,
        &["map", "--output", "json", "-f", "qed", "top.qed"],
    ))
    .unwrap();
    let copied: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert!(!copied.is_empty(), "nothing was copied before the change");
    for (start, len) in &copied {
        qemu_io(
            w,
            "qed",
            "top.qed",
            true,
            &[&format!("read -P 0x31 {start} {len}")],
        );
    }

    // Another process does not take the new object for the old: the overlay keeps the
    // old one's identity, and every open is refused, naming both, before reading.
    let new_tag = etag_of(&url);
    assert_ne!(old_tag, new_tag);
    let before = std::fs::read(w.join("top.qed")).unwrap();
    for args in [
        &["stream", "top.qed"][..],
        &["io", "-r", "-c", "read 0 4k", "top.qed"],
        &["convert", "-O", "raw", "top.qed", "mixed.raw"],
    ] {
        let e = fails(w, QED, args);
        assert!(
            e.contains(&url)
                && e.contains(&format!("ETag {old_tag}"))
                && e.contains(&format!("ETag {new_tag}"))
                && e.contains(&format!("qed rebase -u -b {url}")),
            "{args:?}: {e}"
        );
    }
    assert_eq!(
        std::fs::read(w.join("top.qed")).unwrap(),
        before,
        "a refused open changed the overlay"
    );
    // QEMU reads it as the old base's, given a copy of that base.
    std::fs::write(w.join("old.raw"), vec![0x31u8; 64 << 20]).unwrap();
    let with_old = r#"json:{"driver":"qed","file":{"driver":"file","filename":"top.qed"},"backing":{"driver":"raw","file":{"driver":"file","filename":"old.raw"}}}"#;
    ok(w, QEMU_IMG, &["compare", "-F", "raw", with_old, "old.raw"]);

    // Told to, it takes the new object: what it copied stays, the rest comes from the
    // new base, and once all is copied no pin is left.
    ok(
        w,
        QED,
        &["rebase", "-u", "-b", &url, "-F", "raw", "top.qed"],
    );
    ok(w, QED, &["stream", "top.qed"]);
    assert!(qemu_img_info(w, "top.qed")
        .get("backing-filename")
        .is_none());
    assert!(!has_pin_record(&w.join("top.qed")), "a pin without a base");
    ok(w, QEMU_IMG, &["check", "top.qed"]);
    let (start, len) = copied[0];
    qemu_io(
        w,
        "qed",
        "top.qed",
        true,
        &[
            &format!("read -P 0x31 {start} {len}"),
            "read -P 0x32 63M 1M",
        ],
    );
}

#[test]
fn a_stream_can_keep_a_base_and_qemu_agrees() {
    let work = common::new_dir();
    let w = work.path();
    ok(
        w,
        QEMU_IMG,
        &["create", "-q", "-f", "raw", "base.raw", "32M"],
    );
    qemu_io(w, "raw", "base.raw", false, &["write -P 0x41 0 32M"]);
    ok(
        w,
        QEMU_IMG,
        &[
            "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "mid.qed",
        ],
    );
    qemu_io(w, "qed", "mid.qed", false, &["write -P 0x42 1M 1M"]);
    ok(
        w,
        QEMU_IMG,
        &[
            "create", "-q", "-f", "qed", "-b", "mid.qed", "-F", "qed", "top.qed",
        ],
    );
    qemu_io(w, "qed", "top.qed", false, &["write -P 0x43 1536k 4k"]);
    ok(
        w,
        QEMU_IMG,
        &["convert", "-O", "raw", "top.qed", "expected.raw"],
    );

    let err = fails(w, QED, &["stream", "-b", "other.raw", "top.qed"]);
    assert!(err.contains("not in the backing chain"), "{err}");
    ok(w, QED, &["stream", "-b", "base.raw", "top.qed"]);

    let i = qemu_img_info(w, "top.qed");
    let named = i["backing-filename"].as_str().unwrap().to_string();
    assert_eq!(
        Path::new(&named),
        w.join("base.raw").canonicalize().unwrap(),
        "{i}"
    );
    assert_eq!(i["backing-filename-format"], "raw", "{i}");
    std::fs::remove_file(w.join("mid.qed")).unwrap();
    ok(w, QEMU_IMG, &["check", "top.qed"]);
    assert_identical(w, ("qed", "top.qed"), ("raw", "expected.raw"));
    // Only mid's megabyte moved up: 16 clusters, and the base supplies the rest.
    let len = std::fs::metadata(w.join("top.qed")).unwrap().len();
    assert!(len < 2 << 20, "top.qed is {len} bytes");
}

#[test]
fn a_server_killed_mid_stream_fails_it_and_a_rerun_completes() {
    let mut nginx = Nginx::start();
    let work = common::new_dir();
    let w = work.path();
    let url = raw_base_and_overlay(&nginx, w, 0x51);

    let deadline = 4;
    let child = Command::new(QED)
        .args([
            "stream",
            "--rate",
            "8M",
            "--remote-deadline",
            &deadline.to_string(),
            "top.qed",
        ])
        .current_dir(w)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    nginx.stop();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    // The deadline counts from when the server stopped answering, for every reader:
    // readers that started retrying later (the stream's workers, a reader waiting for a
    // chunk another one was fetching) do not each wait a deadline of their own.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(deadline + 2),
        "the stream took {took:?} to give up, with a deadline of {deadline} s"
    );
    assert!(
        !out.status.success(),
        "the stream went on without its server"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url), "{err}");
    // The wait was announced, once, with its reason.
    assert_eq!(err.matches("retrying until").count(), 1, "{err}");
    assert!(err.contains(&format!("qed: {url}: ")), "{err}");
    assert!(err.contains("onnection"), "{err}");

    // Consistent without the server (QEMU told to open no backing file)...
    let alone =
        r#"json:{"driver":"qed","file":{"driver":"file","filename":"top.qed"},"backing":null}"#;
    ok(w, QEMU_IMG, &["check", alone]);
    // ... and still naming it.
    nginx.restart();
    assert_eq!(
        qemu_img_info(w, "top.qed")["backing-filename"],
        url.as_str()
    );
    ok(w, QED, &["stream", "top.qed"]);
    assert!(qemu_img_info(w, "top.qed")
        .get("backing-filename")
        .is_none());
    ok(w, QEMU_IMG, &["check", "top.qed"]);
    qemu_io(w, "qed", "top.qed", true, &["read -P 0x51 0 64M"]);
}
