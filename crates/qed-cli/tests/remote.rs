//! Remote bases: the `qed` tool reading images that nginx serves over http, judged by
//! qemu-img against the same images read locally.
//!
//! nginx and QEMU's tools are required (tests/run installs them): a missing one fails
//! these tests rather than skipping them.

mod common;

use common::nginx::Nginx;
use common::{fails, ok, run, QED};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A QED base that qemu-img made and qemu-io wrote, with its raw contents beside it.
fn qemu_base(nginx: &Nginx, work: &Path) -> PathBuf {
    let www = nginx.root();
    ok(
        &www,
        "qemu-img",
        &["create", "-q", "-f", "qed", "base.qed", "64M"],
    );
    ok(
        &www,
        "qemu-io",
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
    let strip = |v: &Value| -> Vec<(u64, u64, bool)> {
        v.as_array()
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
    };
    assert_eq!(strip(&ours), strip(&theirs));

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
    let socket = w.join("nbd.sock");
    let mut child = Command::new(QED)
        .args(["serve", "-r", "-k"])
        .arg(&socket)
        .arg(&url)
        .current_dir(w)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("qed serve exited: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "qed serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let nbd = format!("nbd+unix:///?socket={}", socket.display());
    let compared = run(
        w,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &nbd, "base.raw"],
    );
    let _ = child.kill();
    let _ = child.wait();
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
            // clap's usage error: refused before anything is opened.
            assert_eq!(out.status.code(), Some(2), "{args:?}: {e}");
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
