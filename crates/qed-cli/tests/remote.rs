//! Remote bases: the `qed` tool reading images that nginx serves over http, judged by
//! qemu-img against the same images read locally; overlays pinned to the object they
//! were written against, across processes and QEMU's changes to them.
//!
//! nginx and QEMU's tools are required (tests/run installs them): a missing one fails
//! these tests rather than skipping them.

mod common;

use common::nginx::Nginx;
use common::qemu::{data_runs, qemu_written_base};
use common::served::Served;
use common::{etag_of, fails, has_pin_record, ok, run, QED};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A QED base that qemu-img made and qemu-io wrote, with its raw contents beside it.
fn qemu_base(nginx: &Nginx, work: &Path) -> PathBuf {
    let www = nginx.root();
    qemu_written_base(&www);
    let raw = work.join("base.raw");
    ok(
        work,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            www.join("base.qed").to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    raw
}

#[test]
fn an_overlay_on_a_qed_base_over_http_reads_the_base_and_writes_locally() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    qemu_base(&nginx, w);
    let url = nginx.url("base.qed");
    let base_bytes = std::fs::read(nginx.root().join("base.qed")).unwrap();

    // No size: it is the base's, found over http.
    let out = ok(w, QED, &["create", "-b", &url, "-F", "qed", "top.qed"]);
    assert!(out.contains(&format!("backing_file={url}")), "{out}");
    let info: Value =
        serde_json::from_str(&ok(w, QED, &["info", "--output", "json", "top.qed"])).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["backing-filename"], url.as_str());
    assert_eq!(info["full-backing-filename"], url.as_str());

    ok(w, QED, &["convert", "-O", "raw", "top.qed", "out.raw"]);
    ok(
        w,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "out.raw", "base.raw"],
    );
    // QEMU finds the overlay consistent (read without its base: this QEMU may lack curl).
    let no_base =
        r#"json:{"driver":"qed","file":{"driver":"file","filename":"top.qed"},"backing":null}"#;
    ok(w, "qemu-img", &["check", no_base]);

    ok(w, QED, &["io", "-c", "write -P 0x77 2M 64k", "top.qed"]);
    ok(
        w,
        QED,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0x77 2M 64k",
            "-c",
            "read -P 0xab 3M 64k",
            "top.qed",
        ],
    );
    ok(w, QED, &["convert", "-O", "raw", "top.qed", "out2.raw"]);
    ok(
        w,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x77 2M 64k",
            "-c",
            "read -P 0x5c 63M 1M",
            "out2.raw",
        ],
    );
    fails(
        w,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "out2.raw", "base.raw"],
    );
    ok(w, "qemu-img", &["check", no_base]);
    let e = fails(w, QED, &["commit", "top.qed"]);
    assert!(e.contains(&url) && e.contains("read-only"), "{e}");
    assert_eq!(
        std::fs::read(nginx.root().join("base.qed")).unwrap(),
        base_bytes,
        "the base changed"
    );
}

#[test]
fn a_base_we_wrote_is_probed_and_read_over_http() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let www = nginx.root();
    ok(&www, QED, &["create", "-q", "base.qed", "32M"]);
    ok(
        &www,
        QED,
        &[
            "io",
            "-c",
            "write -P 0x33 5M 128k",
            "-c",
            "write -P 0x44 31M 1M",
            "base.qed",
        ],
    );
    ok(&www, QED, &["convert", "-O", "raw", "base.qed", "base.raw"]);
    let local = www.join("base.raw");

    // Without -F the format is probed through http.
    let out = run(w, QED, &["create", "-b", &nginx.url("base.qed"), "top.qed"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("detected qed"));
    ok(w, QED, &["convert", "-O", "raw", "top.qed", "out.raw"]);
    ok(
        w,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "out.raw",
            local.to_str().unwrap(),
        ],
    );

    // A raw base over http, under a QED overlay.
    ok(
        w,
        QED,
        &[
            "create",
            "-b",
            &nginx.url("base.raw"),
            "-F",
            "raw",
            "top2.qed",
        ],
    );
    ok(w, QED, &["convert", "-O", "raw", "top2.qed", "out2.raw"]);
    ok(
        w,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "out2.raw",
            local.to_str().unwrap(),
        ],
    );
}

#[test]
fn a_sparse_qed_base_sends_only_its_tables_and_allocated_clusters() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let www = nginx.root();
    ok(
        &www,
        "qemu-img",
        &["create", "-q", "-f", "qed", "base.qed", "4G"],
    );
    ok(
        &www,
        "qemu-io",
        &[
            "-c",
            "write -P 0x21 100M 64k",
            "-c",
            "write -P 0x22 3000M 64k",
            "base.qed",
        ],
    );
    let file_len = std::fs::metadata(www.join("base.qed")).unwrap().len();

    ok(
        w,
        QED,
        &[
            "create",
            "-b",
            &nginx.url("base.qed"),
            "-F",
            "qed",
            "top.qed",
        ],
    );
    ok(w, QED, &["convert", "-O", "raw", "top.qed", "out.raw"]);
    ok(
        w,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x21 100M 64k",
            "-c",
            "read -P 0x22 3000M 64k",
            "-c",
            "read -P 0 0 100M",
            "out.raw",
        ],
    );
    let sent = nginx.bytes_sent("base.qed");
    // The create and the convert each open the base: header, L1, two L2 tables and two
    // data clusters, at most the whole file (a few hundred KiB), never the 4 GiB.
    assert!(file_len < 2 << 20, "{file_len}");
    assert!(
        sent <= 2 * file_len + 16,
        "sent {sent} bytes of a {file_len}-byte file"
    );
}

#[test]
fn info_map_convert_compare_and_io_take_urls() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    qemu_base(&nginx, w);
    let url = nginx.url("base.qed");

    let info: Value =
        serde_json::from_str(&ok(w, QED, &["info", "--output", "json", &url])).unwrap();
    assert_eq!(info["filename"], url.as_str());
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["cluster-size"], 65536);
    assert!(info.get("actual-size").is_none());
    let human = ok(w, QED, &["info", &url]);
    assert!(human.contains("disk size: unavailable"), "{human}");

    let map = ok(w, QED, &["map", "--output", "json", &url]);
    let ours: Value = serde_json::from_str(&map).unwrap();
    let local_map = ok(
        w,
        "qemu-img",
        &[
            "map",
            "--output",
            "json",
            nginx.root().join("base.qed").to_str().unwrap(),
        ],
    );
    let theirs: Value = serde_json::from_str(&local_map).unwrap();
    assert_eq!(data_runs(&ours), data_runs(&theirs));

    ok(w, QED, &["convert", "-O", "raw", &url, "direct.raw"]);
    ok(
        w,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "direct.raw",
            "base.raw",
        ],
    );
    ok(w, QED, &["convert", "-O", "qed", &url, "copy.qed"]);
    ok(
        w,
        "qemu-img",
        &["compare", "-f", "qed", "-F", "raw", "copy.qed", "base.raw"],
    );
    let same = ok(w, QED, &["compare", &url, "base.raw"]);
    assert!(same.contains("identical"), "{same}");
    ok(
        w,
        QED,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0xab 1M 3M",
            "-c",
            "read -P 0x11 40M 64k",
            &url,
        ],
    );

    // Writes to a URL are refused, naming it.
    let e = fails(w, QED, &["io", "-c", "write 0 512", &url]);
    assert!(e.contains(&url) && e.contains("read-only"), "{e}");
}

#[test]
fn missing_objects_and_unknown_names_are_clear_errors() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let url = nginx.url("missing.qed");
    let e = fails(w, QED, &["info", &url]);
    assert!(e.contains(&url) && e.contains("404"), "{e}");
    let e = fails(w, QED, &["create", "-b", &url, "-F", "qed", "top.qed"]);
    assert!(e.contains(&url) && e.contains("404"), "{e}");
    assert!(!w.join("top.qed").exists());
    let e = fails(w, QED, &["convert", "-O", "raw", "nosuch.qed", "out.raw"]);
    assert!(
        e.contains("nosuch.qed") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn serve_exports_a_url_read_only() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    qemu_base(&nginx, w);
    let url = nginx.url("base.qed");
    let served = Served::unix(w, &["-r"], &url);
    let compared = run(
        w,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &served.uri(),
            "base.raw",
        ],
    );
    drop(served);
    assert!(
        compared.status.success(),
        "{}{}",
        String::from_utf8_lossy(&compared.stdout),
        String::from_utf8_lossy(&compared.stderr)
    );
}

#[test]
fn every_command_that_opens_an_image_takes_the_remote_flags_and_refuses_bad_values() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let commands: [&[&str]; 15] = [
        &["create", "-b", "base", "top.qed"],
        &["info", "x"],
        &["map", "x"],
        &["check", "x"],
        &["io", "-c", "read 0 1", "x"],
        &["convert", "x", "y"],
        &["compare", "x", "y"],
        &["commit", "x"],
        &["rebase", "-b", "y", "x"],
        &["resize", "x", "1M"],
        &["measure", "x"],
        &["serve", "x"],
        &["mount", "x", "y"],
        &["bench", "x"],
        &["stream", "x"],
    ];
    for command in commands {
        for (flag, value) in [
            ("--remote-timeout", "0"),
            ("--remote-deadline", "-3"),
            ("--remote-connections", "0"),
            ("--remote-chunk-size", "100k"),
            ("--remote-cache", "12Q"),
        ] {
            let mut args = command.to_vec();
            let given = format!("{flag}={value}");
            args.insert(1, &given);
            let out = run(w, QED, &args);
            let e = String::from_utf8_lossy(&out.stderr);
            // A usage error, as qemu-img ends one: refused before anything is opened.
            assert_eq!(out.status.code(), Some(1), "{args:?}: {e}");
            assert!(
                e.contains(&format!("invalid value '{value}' for '{flag}")),
                "{args:?}: {e}"
            );
        }
    }
    // Good values pass through to an ordinary open.
    ok(w, QED, &["create", "-q", "local.qed", "1M"]);
    ok(
        w,
        QED,
        &[
            "info",
            "--remote-timeout",
            "0.5",
            "--remote-deadline",
            "2",
            "--remote-connections",
            "2",
            "--remote-chunk-size",
            "1M",
            "--remote-cache",
            "4M",
            "--remote-readahead",
            "0",
            "local.qed",
        ],
    );
}

/// A server that accepts connections and never answers; the connections stay open
/// until it is dropped.
struct Stalled {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stalled {
    fn start() -> Self {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((conn, _)) = listener.accept() {
                        held.push(conn);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_short_deadline_makes_a_stalled_server_fail_fast() {
    let server = Stalled::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let url = format!("http://127.0.0.1:{}/base.qed", server.port);
    for command in [
        vec!["info", url.as_str()],
        vec!["create", "-b", url.as_str(), "-F", "qed", "top.qed"],
        vec!["convert", "-O", "raw", url.as_str(), "out.raw"],
    ] {
        let mut args = vec![
            command[0],
            "--remote-timeout",
            "0.5",
            "--remote-deadline",
            "1.5",
        ];
        args.extend(&command[1..]);
        let started = Instant::now();
        let e = fails(w, QED, &args);
        let took = started.elapsed();
        // The defaults (30 s a request, 120 s in all) would wait minutes.
        assert!(took < Duration::from_secs(6), "{args:?} took {took:?}");
        assert!(
            e.contains(&url) && e.contains("timed out") && e.contains("deadline"),
            "{args:?}: {e}"
        );
    }
    assert!(!w.join("top.qed").exists());
}

/// Puts `bytes` in place of `name` under nginx's root, as a new file (a new ETag), the
/// way an upload replaces an object.
fn replace(nginx: &Nginx, name: &str, bytes: &[u8]) {
    let tmp = nginx.root().join(format!("{name}.new"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, nginx.root().join(name)).unwrap();
}

/// A refusal of a replaced base: it names the URL and both ETags, and says how to
/// accept the new object.
fn assert_refused(e: &str, url: &str, old: &str, new: &str) {
    assert!(
        e.contains(url)
            && e.contains("not the one")
            && e.contains(&format!("ETag {old}"))
            && e.contains(&format!("ETag {new}"))
            && e.contains(&format!("qed rebase -u -b {url}")),
        "{e}"
    );
}

#[test]
fn an_overlay_refuses_a_base_replaced_after_it_was_created_until_rebased() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let old: Vec<u8> = (0..(8u32 << 20)).map(|i| (i >> 16) as u8).collect();
    std::fs::write(nginx.root().join("base.raw"), &old).unwrap();
    std::fs::write(w.join("old.raw"), &old).unwrap();
    let url = nginx.url("base.raw");
    let old_tag = etag_of(&url);

    ok(
        w,
        QED,
        &["create", "-q", "-b", &url, "-F", "raw", "top.qed"],
    );
    assert!(has_pin_record(&w.join("top.qed")), "create pinned nothing");
    assert_eq!(
        pin_of(w, "top.qed"),
        Some(format!("ETag {old_tag}, {} bytes", old.len()))
    );
    // The object is replaced before the overlay ever read it (same size: only the ETag
    // tells).
    let new: Vec<u8> = old.iter().map(|b| b ^ 0xff).collect();
    std::thread::sleep(Duration::from_millis(1100)); // nginx's ETag has the mtime in seconds
    replace(&nginx, "base.raw", &new);
    let new_tag = etag_of(&url);
    assert_ne!(old_tag, new_tag);

    // Every open is refused, read-only or not, before reading: nothing is mixed.
    let sent = nginx.settled_bytes_sent("base.raw");
    for args in [
        &["io", "-r", "-c", "read 0 4k", "top.qed"][..],
        &["io", "-c", "write -P 0x5a 0 4k", "top.qed"],
        &["convert", "-O", "raw", "top.qed", "out.raw"],
        &["stream", "top.qed"],
        &["map", "top.qed"],
    ] {
        let e = fails(w, QED, args);
        assert_refused(&e, &url, &old_tag, &new_tag);
    }
    // Only the one-byte probes of each open crossed the wire.
    assert!(
        nginx.settled_bytes_sent("base.raw") - sent <= 5,
        "the base was read"
    );
    assert!(!w.join("out.raw").exists());

    // QEMU opens the overlay (the record is in its header cluster, which it ignores)
    // and reads what we would, given a copy of the old base.
    let info: Value = serde_json::from_str(&ok(
        w,
        "qemu-img",
        &["info", "--output", "json", "-U", "top.qed"],
    ))
    .unwrap();
    assert_eq!(info["backing-filename"], url.as_str());
    let with_old = r#"json:{"driver":"qed","file":{"driver":"file","filename":"top.qed"},"backing":{"driver":"raw","file":{"driver":"file","filename":"old.raw"}}}"#;
    ok(
        w,
        "qemu-img",
        &["compare", "-F", "raw", with_old, "old.raw"],
    );
    // Through the curl driver, QEMU itself reads the new object: it pins nothing.
    ok(w, "qemu-io", &["-r", "-c", "read -P 0xff 0 64k", "top.qed"]);

    // The user's word: the new object is the base now.
    ok(
        w,
        QED,
        &["rebase", "-u", "-b", &url, "-F", "raw", "top.qed"],
    );
    assert_eq!(
        pin_of(w, "top.qed"),
        Some(format!("ETag {new_tag}, {} bytes", new.len()))
    );
    ok(
        w,
        QED,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0xff 0 64k",
            "-c",
            "read -P 0xef 1M 64k",
            "top.qed",
        ],
    );
    ok(w, QED, &["stream", "top.qed"]);
    assert!(!has_pin_record(&w.join("top.qed")), "a stream left a pin");
    assert_eq!(pin_of(w, "top.qed"), None);
    std::fs::write(w.join("new.raw"), &new).unwrap();
    ok(
        w,
        "qemu-img",
        &["compare", "-F", "raw", "top.qed", "new.raw"],
    );
}

#[test]
fn an_overlay_qemu_made_is_pinned_when_first_opened_and_qemu_changes_keep_it() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let base: Vec<u8> = (0..(8u32 << 20)).map(|i| (i >> 16) as u8 ^ 0x5a).collect();
    std::fs::write(nginx.root().join("base.raw"), &base).unwrap();
    std::fs::write(w.join("copy.raw"), &base).unwrap();
    let url = nginx.url("base.raw");
    let old_tag = etag_of(&url);

    // QEMU makes the overlay (through its curl driver) and writes to it: no record.
    ok(
        w,
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", &url, "-F", "raw", "top.qed",
        ],
    );
    ok(w, "qemu-io", &["-c", "write -P 0x77 1M 64k", "top.qed"]);
    assert!(!has_pin_record(&w.join("top.qed")));
    // A read-only open pins nothing (it may not write)...
    ok(
        w,
        QED,
        &["io", "-r", "-c", "read -P 0x77 1M 64k", "top.qed"],
    );
    assert!(!has_pin_record(&w.join("top.qed")));
    // ... the first read-write open does.
    ok(w, QED, &["io", "-c", "write -P 0x78 2M 64k", "top.qed"]);
    assert!(has_pin_record(&w.join("top.qed")));
    assert_eq!(
        pin_of(w, "top.qed"),
        Some(format!("ETag {old_tag}, {} bytes", base.len()))
    );

    // QEMU grows the image and writes to it: it rewrites the header's sector, and the
    // record after the name stays.
    ok(w, "qemu-img", &["resize", "-q", "top.qed", "16M"]);
    ok(w, "qemu-io", &["-c", "write -P 0x79 12M 64k", "top.qed"]);
    ok(
        w,
        QED,
        &["io", "-r", "-c", "read -P 0x79 12M 64k", "top.qed"],
    );
    ok(w, QED, &["check", "top.qed"]);

    // QEMU moves the backing file to a local copy: the record is not for the name the
    // header holds, and nothing is refused (the base is not remote any more).
    ok(
        w,
        "qemu-img",
        &[
            "rebase", "-u", "-f", "qed", "-b", "copy.raw", "-F", "raw", "top.qed",
        ],
    );
    ok(
        w,
        QED,
        &["io", "-r", "-c", "read -P 0x78 2M 64k", "top.qed"],
    );
    // QEMU commits into that copy (growing it to 16M): the overlay's header area stays.
    ok(w, "qemu-img", &["commit", "-q", "-d", "top.qed"]);
    ok(
        w,
        QED,
        &["io", "-r", "-c", "read -P 0x78 2M 64k", "top.qed"],
    );
    // Back to the URL, by QEMU: the record made for that name is found again, and it
    // still refuses a new object under the URL.
    ok(
        w,
        "qemu-img",
        &[
            "rebase", "-u", "-f", "qed", "-b", &url, "-F", "raw", "top.qed",
        ],
    );
    std::thread::sleep(Duration::from_millis(1100)); // nginx's ETag has the mtime in seconds
    let mut changed = base.clone();
    changed[5 << 20] ^= 1;
    replace(&nginx, "base.raw", &changed);
    let new_tag = etag_of(&url);
    let e = fails(w, QED, &["io", "-r", "-c", "read 0 4k", "top.qed"]);
    assert_refused(&e, &url, &old_tag, &new_tag);
    let e = fails(w, QED, &["io", "-c", "write 0 4k", "top.qed"]);
    assert_refused(&e, &url, &old_tag, &new_tag);
    // QEMU reads the overlay as we would, given the copy the commit wrote into (the
    // overlay's clusters, whichever base is under them).
    let with_copy = r#"json:{"driver":"qed","file":{"driver":"file","filename":"top.qed"},"backing":{"driver":"raw","file":{"driver":"file","filename":"copy.raw"}}}"#;
    ok(
        w,
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0x77 1M 64k",
            "-c",
            "read -P 0x78 2M 64k",
            "-c",
            "read -P 0x79 12M 64k",
            with_copy,
        ],
    );

    // The user accepts the new object.
    ok(
        w,
        QED,
        &["rebase", "-u", "-b", &url, "-F", "raw", "top.qed"],
    );
    ok(w, QED, &["io", "-r", "-c", "read -P 0x0b 5M 1", "top.qed"]);

    // A longer name written by QEMU over the record cuts it: a record that is not whole
    // is no record, and refuses nothing.
    let long = format!("{url}?{}", "x".repeat(40));
    ok(
        w,
        "qemu-img",
        &[
            "rebase", "-u", "-f", "qed", "-b", &long, "-F", "raw", "top.qed",
        ],
    );
    std::thread::sleep(Duration::from_millis(1100));
    replace(&nginx, "base.raw", &base);
    ok(w, QED, &["io", "-r", "-c", "read -P 0x0a 5M 4k", "top.qed"]);
    assert_eq!(pin_of(w, "top.qed"), None);

    // rebase -u to a server out of reach: done, unpinned, with a warning.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gone = format!("http://127.0.0.1:{port}/base.raw");
    let out = run(
        w,
        QED,
        &[
            "rebase",
            "--remote-deadline",
            "1",
            "-u",
            "-b",
            &gone,
            "-F",
            "raw",
            "top.qed",
        ],
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(e.contains("warning") && e.contains("not pinned"), "{e}");
    let info: Value =
        serde_json::from_str(&ok(w, QED, &["info", "--output", "json", "top.qed"])).unwrap();
    assert_eq!(info["backing-filename"], gone.as_str());
    assert!(info.get("base-pin").is_none(), "{info}");
}

/// The remote base `image` is pinned to, as `qed info` shows it.
fn pin_of(w: &Path, image: &str) -> Option<String> {
    let info: Value =
        serde_json::from_str(&ok(w, QED, &["info", "--output", "json", image])).unwrap();
    info.get("base-pin")
        .map(|p| p.as_str().unwrap().to_string())
}

#[test]
fn a_stream_that_keeps_a_remote_base_pins_it() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(nginx.root().join("base.raw"), vec![0x41u8; 4 << 20]).unwrap();
    let url = nginx.url("base.raw");
    let tag = etag_of(&url);
    // mid.qed over the URL (pinned), top.qed over mid.qed (a local base: no pin).
    ok(
        w,
        QED,
        &["create", "-q", "-b", &url, "-F", "raw", "mid.qed"],
    );
    ok(w, QED, &["io", "-c", "write -P 0x42 1M 64k", "mid.qed"]);
    ok(
        w,
        QED,
        &["create", "-q", "-b", "mid.qed", "-F", "qed", "top.qed"],
    );
    assert_eq!(pin_of(w, "top.qed"), None);
    // Streaming mid.qed's clusters up makes the URL top.qed's base, pinned.
    ok(w, QED, &["stream", "-b", &url, "top.qed"]);
    std::fs::remove_file(w.join("mid.qed")).unwrap();
    assert_eq!(
        pin_of(w, "top.qed"),
        Some(format!("ETag {tag}, {} bytes", 4 << 20))
    );
    ok(
        w,
        QED,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0x42 1M 64k",
            "-c",
            "read -P 0x41 2M 64k",
            "top.qed",
        ],
    );
    std::thread::sleep(Duration::from_millis(1100));
    replace(&nginx, "base.raw", &[0x43u8; 4 << 20]);
    let e = fails(w, QED, &["io", "-r", "-c", "read 2M 4k", "top.qed"]);
    assert_refused(&e, &url, &tag, &etag_of(&url));
}
