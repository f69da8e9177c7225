//! Remote bases behind a slow link: nginx (and s3s-fs) on loopback, behind a proxy that
//! holds back every answer for 0, 20 or 50 ms as a distant object store does. Streams,
//! copy-on-read and cold reads must come out byte for byte as the base, and must keep
//! the link busy the way that makes them fast whatever the latency: several requests in
//! flight at once, each of them large. What is asserted is that behaviour, as the proxy
//! saw it, never a wall time; readahead must stay within the memory it is given, and a
//! process must not wait at exit for readahead nobody reads.

mod common;

use common::nginx::Nginx;
use common::s3::{Kind, S3Server};
use common::{ok, QED};
use qed_testkit::{DelayProxy, ProxyStats};
use std::path::Path;
use std::time::{Duration, Instant};

/// The base's virtual size, and where its data lies: (offset, length, pattern), zeros
/// elsewhere. Runs of a megabyte every two, and single clusters in between, so that a
/// stream has many runs to copy and gaps to skip.
const SIZE: u64 = 96 << 20;

fn regions() -> Vec<(u64, u64, u8)> {
    let mut r = Vec::new();
    for i in 0..(SIZE / (2 << 20)) {
        r.push((i * (2 << 20), 1 << 20, (i % 200 + 1) as u8));
        if i % 3 == 0 {
            r.push((i * (2 << 20) + (3 << 19), 4096, 0xe0 + (i % 16) as u8));
        }
    }
    r
}

/// Writes `base.qed` (qemu-img and qemu-io, as the oracle) into `www`, and its raw
/// contents as `base.raw` into `work`.
fn make_base(www: &Path, work: &Path) {
    let base = www.join("base.qed");
    let base = base.to_str().unwrap();
    ok(
        work,
        "qemu-img",
        &["create", "-q", "-f", "qed", base, &SIZE.to_string()],
    );
    let mut args = vec!["-f".to_string(), "qed".to_string()];
    for (off, len, p) in regions() {
        args.push("-c".into());
        args.push(format!("write -P {p} {off} {len}"));
    }
    args.push(base.to_string());
    ok(work, "qemu-io", &args);
    ok(
        work,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            base,
            work.join("base.raw").to_str().unwrap(),
        ],
    );
}

/// `qed io` commands reading `len` bytes at `off` and checking them against the base.
fn checked_reads(spans: &[(u64, u64)]) -> Vec<String> {
    let regions = regions();
    let mut cmds = Vec::new();
    for &(off, len) in spans {
        // Split at region edges, so that each piece has one pattern.
        let mut pos = off;
        while pos < off + len {
            let (end, p) = match regions.iter().find(|r| r.0 <= pos && pos < r.0 + r.1) {
                Some(&(s, l, p)) => ((s + l).min(off + len), p),
                None => {
                    let next = regions
                        .iter()
                        .map(|r| r.0)
                        .filter(|&s| s > pos)
                        .min()
                        .unwrap_or(SIZE);
                    (next.min(off + len), 0)
                }
            };
            cmds.push("-c".to_string());
            cmds.push(format!("read -P {p} {pos} {}", end - pos));
            pos = end;
        }
    }
    cmds
}

/// A proxy to nginx's port, holding back answers for `ms` milliseconds.
fn proxy(nginx: &Nginx, ms: u64) -> DelayProxy {
    DelayProxy::start(0, &nginx.addr(), Duration::from_millis(ms)).unwrap()
}

/// The base's URL through `proxy`.
fn url(proxy: &DelayProxy, nginx: &Nginx) -> String {
    format!(
        "http://127.0.0.1:{}{}",
        proxy.port(),
        nginx.path("base.qed")
    )
}

/// What a stream (or other sequential copy) of the base must have shown the proxy: few
/// requests, each large, and (where answers are slow enough for requests to overlap)
/// several in flight at once.
fn assert_fills_the_link(what: &str, ms: u64, stats: ProxyStats, file_bytes: u64) {
    // One request per megabyte of the file would already be few; a chunk per request
    // would be 16 times as many.
    let most = file_bytes / (1 << 20) + 16;
    assert!(
        stats.requests <= most,
        "{what} at {ms} ms: {} requests for a {file_bytes}-byte base (at most {most}): {stats:?}",
        stats.requests
    );
    // The data comes in megabyte runs with gaps: a request that spans several is large.
    assert!(
        stats.max_range >= 2 << 20,
        "{what} at {ms} ms: no request asked for 2 MiB or more: {stats:?}"
    );
    if ms > 0 {
        assert!(
            stats.max_in_flight >= 6,
            "{what} at {ms} ms: at most {} requests in flight at once: {stats:?}",
            stats.max_in_flight
        );
    }
}

#[test]
fn streams_keep_many_large_requests_in_flight_and_copy_exactly() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    make_base(&nginx.root(), w);
    let file_bytes = std::fs::metadata(nginx.root().join("base.qed"))
        .unwrap()
        .len();
    for ms in [0, 20, 50] {
        let proxy = proxy(&nginx, ms);
        let top = format!("top{ms}.qed");
        ok(
            w,
            QED,
            &[
                "create",
                "-q",
                "-b",
                &url(&proxy, &nginx),
                "-F",
                "qed",
                &top,
            ],
        );
        proxy.reset_stats();
        ok(w, QED, &["stream", &top]);
        let stats = proxy.stats();
        assert_fills_the_link("qed stream", ms, stats, file_bytes);
        assert!(
            stats.bytes_down <= file_bytes + (4 << 20),
            "qed stream at {ms} ms fetched {} bytes of a {file_bytes}-byte base: {stats:?}",
            stats.bytes_down
        );
        // No backing file any more: qemu-img reads it alone.
        ok(
            w,
            "qemu-img",
            &["compare", "-f", "qed", "-F", "raw", &top, "base.raw"],
        );
    }
}

#[test]
fn copy_on_read_and_cold_random_reads_are_exact_at_every_latency() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    make_base(&nginx.root(), w);
    let file_bytes = std::fs::metadata(nginx.root().join("base.qed"))
        .unwrap()
        .len();
    for ms in [0, 20, 50] {
        let proxy = proxy(&nginx, ms);
        // Copy-on-read of the whole disk, a megabyte per read, in order.
        let top = format!("cor{ms}.qed");
        ok(
            w,
            QED,
            &[
                "create",
                "-q",
                "-b",
                &url(&proxy, &nginx),
                "-F",
                "qed",
                &top,
            ],
        );
        proxy.reset_stats();
        let spans: Vec<_> = (0..SIZE / (1 << 20)).map(|i| (i << 20, 1 << 20)).collect();
        let mut args = vec!["io".to_string(), "--copy-on-read".to_string()];
        args.extend(checked_reads(&spans));
        args.push(top.clone());
        ok(w, QED, &args);
        let stats = proxy.stats();
        assert_fills_the_link("copy-on-read", ms, stats, file_bytes);
        // All of it was copied: the overlay alone holds the disk.
        let alone = format!(
            r#"json:{{"driver":"qed","file":{{"driver":"file","filename":"{top}"}},"backing":null}}"#
        );
        ok(w, "qemu-img", &["compare", "-F", "raw", &alone, "base.raw"]);

        // Cold random reads, each checked, on a fresh overlay.
        let top = format!("rand{ms}.qed");
        ok(
            w,
            QED,
            &[
                "create",
                "-q",
                "-b",
                &url(&proxy, &nginx),
                "-F",
                "qed",
                &top,
            ],
        );
        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ ms;
        let spans: Vec<_> = (0..40)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let len = 512 * (1 + seed % 256);
                ((seed >> 20) % (SIZE - len) / 512 * 512, len)
            })
            .collect();
        let mut args = vec!["io".to_string(), "-r".to_string()];
        args.extend(checked_reads(&spans));
        args.push(top.clone());
        ok(w, QED, &args);
    }
}

#[test]
fn an_s3_stream_behind_a_slow_link_is_exact_and_overlaps_requests() {
    let server = S3Server::start(Kind::S3sFs);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let www = w.join("www");
    std::fs::create_dir(&www).unwrap();
    make_base(&www, w);
    let data = std::fs::read(www.join("base.qed")).unwrap();
    server.create_bucket("lat");
    server.put("lat", "base.qed", &data);
    let addr = server.endpoint().trim_start_matches("http://").to_string();
    let proxy = DelayProxy::start(0, &addr, Duration::from_millis(50)).unwrap();
    let endpoint = format!("http://127.0.0.1:{}", proxy.port());
    let env = [("AWS_ENDPOINT_URL_S3", Some(endpoint.as_str()))];
    let run = |args: &[&str]| {
        let out = server.qed(w, args, &env);
        assert!(
            out.status.success(),
            "{}",
            common::describe(QED, args, &out)
        );
    };
    run(&[
        "create",
        "-q",
        "-b",
        "s3://lat/base.qed",
        "-F",
        "qed",
        "top.qed",
    ]);
    proxy.reset_stats();
    run(&["stream", "top.qed"]);
    assert_fills_the_link("qed stream from S3", 50, proxy.stats(), data.len() as u64);
    ok(
        w,
        "qemu-img",
        &["compare", "-f", "qed", "-F", "raw", "top.qed", "base.raw"],
    );
}

#[test]
fn readahead_stays_within_the_memory_cache() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    make_base(&nginx.root(), w);
    let proxy = proxy(&nginx, 20);
    ok(
        w,
        QED,
        &[
            "create",
            "-q",
            "-b",
            &url(&proxy, &nginx),
            "-F",
            "qed",
            "top.qed",
        ],
    );
    // Sequential reads of 256 KiB, which read ahead: with a 1 MiB cache, no more than
    // half of it may be read ahead, so a reader's own request and the readahead in
    // flight stay under a megabyte, while the default cache lets it go far further.
    let spans: Vec<_> = (0..(32 << 20) / (256 << 10))
        .map(|i| (i * (256 << 10), 256 << 10))
        .collect();
    // Each run fetches from the network: no cache on disk serves the second one.
    let mut small = vec![
        "io",
        "-r",
        "--remote-cache-dir=none",
        "--remote-cache",
        "1M",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    small.extend(checked_reads(&spans));
    small.push("top.qed".into());
    proxy.reset_stats();
    ok(w, QED, &small);
    let bounded = proxy.stats();
    assert!(
        bounded.max_range_bytes_in_flight <= (256 << 10) + (512 << 10),
        "{bounded:?}"
    );
    let mut large = vec![
        "io".to_string(),
        "-r".to_string(),
        "--remote-cache-dir=none".to_string(),
    ];
    large.extend(checked_reads(&spans));
    large.push("top.qed".into());
    proxy.reset_stats();
    ok(w, QED, &large);
    let free = proxy.stats();
    assert!(
        free.max_range_bytes_in_flight >= 4 << 20,
        "the default cache should let readahead go further: {free:?}"
    );
}

#[test]
fn a_process_does_not_wait_at_exit_for_readahead_in_flight() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    make_base(&nginx.root(), w);
    // Answers a second late: readahead started by the last reads is still in flight
    // when the process is done with its reads.
    let proxy = proxy(&nginx, 1000);
    let reads = checked_reads(&[(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20)]);
    let timed = |readahead: &str| {
        // Both runs fetch from the network: no cache on disk serves the second.
        let mut args = vec![
            "io",
            "-r",
            "-f",
            "qed",
            "--remote-cache-dir=none",
            "--remote-readahead",
            readahead,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(reads.iter().cloned());
        args.push(url(&proxy, &nginx));
        proxy.reset_stats();
        let started = Instant::now();
        ok(w, QED, &args);
        (started.elapsed(), proxy.stats())
    };
    let (without, plain) = timed("0");
    let (with, ahead) = timed("2M");
    assert!(
        ahead.requests > plain.requests,
        "no readahead was started: {plain:?} then {ahead:?}"
    );
    // A wait for the readahead would cost a whole second.
    assert!(
        with < without + Duration::from_millis(700),
        "{with:?} with readahead in flight at exit, {without:?} without"
    );
}
