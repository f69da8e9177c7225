//! The cache on disk that every `qed` process of a host shares for remote images: what
//! one process fetched, the others read from disk; chunks being fetched are fetched
//! once; a replaced object is never mixed with what was cached of the old one; a killed
//! process or a damaged file leaves nothing trusted; the cache keeps its bound; and a
//! cache that cannot be written only costs a warning. Against nginx and both S3
//! servers.

mod common;

use common::nginx::Nginx;
use common::s3::{Kind, S3Server};
use common::{describe, test_bytes, QED};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `qed ARGS` in `dir` with the cache on disk in `cache` (as the environment names it).
fn qed_cached(dir: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(QED)
        .args(args)
        .current_dir(dir)
        .env("QED_CACHE_DIR", cache)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok_cached(dir: &Path, cache: &Path, args: &[&str]) -> Output {
    let out = qed_cached(dir, cache, args);
    assert!(out.status.success(), "{}", describe(QED, args, &out));
    out
}

/// `qed cache info --output=json` of `cache`.
fn cache_info(cache: &Path) -> Value {
    let out = ok_cached(Path::new("/"), cache, &["cache", "info", "--output=json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A raw base of `len` bytes of test data, in nginx's root as `name`.
fn raw_base(nginx: &Nginx, name: &str, len: usize, seed: u64) -> Vec<u8> {
    let bytes = test_bytes(len, seed);
    fs::write(nginx.root().join(name), &bytes).unwrap();
    bytes
}

/// Reads all of `url` (a raw object) through `qed convert` into `out`, and returns it.
fn read_all(dir: &Path, cache: &Path, url: &str, out: &str, extra: &[&str]) -> Vec<u8> {
    let _ = fs::remove_file(dir.join(out));
    let mut args = vec!["convert", "-f", "raw", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[url, out]);
    ok_cached(dir, cache, &args);
    fs::read(dir.join(out)).unwrap()
}

#[test]
fn a_second_process_reads_from_disk_what_the_first_fetched() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    let base = raw_base(&nginx, "base.raw", 6 << 20, 1);
    let url = nginx.url("base.raw");

    assert_eq!(read_all(w, &cache, &url, "a.raw", &[]), base);
    let first = nginx.settled_bytes_sent("base.raw");
    assert!(first >= base.len() as u64, "sent {first}");
    // A second process, and one with another chunk size, read it from disk; only the
    // one-byte probe of each open crosses the wire.
    assert_eq!(read_all(w, &cache, &url, "b.raw", &[]), base);
    assert!(
        nginx.settled_bytes_sent("base.raw") - first <= 1,
        "the second process fetched again"
    );
    let info = cache_info(&cache);
    assert_eq!(info["objects"].as_array().unwrap().len(), 1, "{info}");
    let object = &info["objects"][0];
    assert_eq!(object["name"], url.as_str());
    assert_eq!(object["size"], base.len() as u64);
    assert_eq!(object["chunks"], 96, "{info}");
    assert!(object["key"].as_str().unwrap().contains("etag"), "{info}");
    assert_eq!(object["in-use"], false);
    assert!(info["bytes"].as_u64().unwrap() > base.len() as u64);

    // Turned off, a process fetches for itself.
    let before = nginx.settled_bytes_sent("base.raw");
    let args = ["--remote-cache-dir=none"];
    assert_eq!(read_all(w, &cache, &url, "c.raw", &args), base);
    assert!(nginx.settled_bytes_sent("base.raw") - before >= base.len() as u64);

    // Cleared, it is empty, and the next reader fetches again.
    let out = ok_cached(w, &cache, &["cache", "clear"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Removed 96 chunks"));
    assert_eq!(cache_info(&cache)["bytes"], 0);
    let before = nginx.settled_bytes_sent("base.raw");
    assert_eq!(read_all(w, &cache, &url, "d.raw", &[]), base);
    assert!(nginx.settled_bytes_sent("base.raw") - before >= base.len() as u64);
}

#[test]
fn the_cache_is_on_by_default_under_the_xdg_cache_home() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let base = raw_base(&nginx, "base.raw", 1 << 20, 2);
    let url = nginx.url("base.raw");
    let run = |env: &[(&str, &Path)]| {
        let mut cmd = Command::new(QED);
        cmd.args(["io", "-f", "raw", "-r", "-c", "read 0 1M", &url])
            .current_dir(w)
            .env_remove("QED_CACHE_DIR")
            .env_remove("XDG_CACHE_HOME");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[("XDG_CACHE_HOME", &w.join("xdg"))]);
    assert!(cache_info(&w.join("xdg/qed"))["chunks"].as_u64().unwrap() >= 16);
    assert!(w.join("xdg/qed/CACHEDIR.TAG").exists());
    run(&[("HOME", &w.join("home"))]);
    assert!(
        cache_info(&w.join("home/.cache/qed"))["chunks"]
            .as_u64()
            .unwrap()
            >= 16
    );
    // QED_CACHE_DIR wins, and `none` turns it off.
    run(&[
        ("QED_CACHE_DIR", Path::new("none")),
        ("HOME", &w.join("off")),
    ]);
    assert!(!w.join("off").exists());
    drop(base);
}

#[test]
fn a_replaced_object_is_never_mixed_with_the_cached_one() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    let old = raw_base(&nginx, "base.raw", 2 << 20, 3);
    let url = nginx.url("base.raw");
    assert_eq!(read_all(w, &cache, &url, "a.raw", &[]), old);
    // Same size: only the ETag (with nginx, the mtime in seconds) tells them apart.
    std::thread::sleep(Duration::from_millis(1100));
    let new = raw_base(&nginx, "base.raw.new", 2 << 20, 4);
    fs::rename(
        nginx.root().join("base.raw.new"),
        nginx.root().join("base.raw"),
    )
    .unwrap();
    assert_eq!(read_all(w, &cache, &url, "b.raw", &[]), new);
    let info = cache_info(&cache);
    assert_eq!(info["objects"].as_array().unwrap().len(), 2, "{info}");
}

#[test]
fn racing_processes_fetch_each_chunk_once() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    let base = raw_base(&nginx, "base.raw", 16 << 20, 5);
    let url = nginx.url("base.raw");
    let children: Vec<_> = (0..4)
        .map(|i| {
            Command::new(QED)
                .args([
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &url,
                    &format!("{i}.raw"),
                ])
                .current_dir(w)
                .env("QED_CACHE_DIR", &cache)
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..4 {
        assert!(
            fs::read(w.join(format!("{i}.raw"))).unwrap() == base,
            "copy {i}"
        );
    }
    let sent = nginx.settled_bytes_sent("base.raw");
    assert!(
        sent <= base.len() as u64 + 4,
        "4 processes were sent {sent} bytes of a {}-byte object",
        base.len()
    );
}

#[test]
fn a_killed_fetcher_and_damaged_chunks_leave_nothing_trusted() {
    // Slow enough that the first reader is killed with chunks stored, in flight and
    // not begun.
    let nginx = Nginx::start_with("limit_rate 4m;");
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    let base = raw_base(&nginx, "base.raw", 16 << 20, 6);
    let url = nginx.url("base.raw");
    let mut child = Command::new(QED)
        .args(["convert", "-f", "raw", "-O", "raw", &url, "a.raw"])
        .current_dir(w)
        .env("QED_CACHE_DIR", &cache)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for(Duration::from_secs(30), "chunks on disk", || {
        cache_info(&cache)["chunks"].as_u64().unwrap_or(0) >= 8
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let info = cache_info(&cache);
    let stored = info["chunks"].as_u64().unwrap();
    assert!(stored < 256, "the reader finished before it was killed");

    // Damage two chunks as a crash could: one cut short, one with a byte changed.
    let dir: PathBuf = fs::read_dir(cache.join("objects"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut chunks: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("c-"))
        .collect();
    chunks.sort();
    let bytes = fs::read(&chunks[0]).unwrap();
    fs::write(&chunks[0], &bytes[..bytes.len() / 2]).unwrap();
    let mut bytes = fs::read(&chunks[1]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&chunks[1], &bytes).unwrap();

    let before = nginx.settled_bytes_sent("base.raw");
    assert!(
        read_all(w, &cache, &url, "b.raw", &[]) == base,
        "read back differs"
    );
    let fetched = nginx.settled_bytes_sent("base.raw") - before;
    // Everything but the sound chunks came again: the damaged two included, nothing
    // twice.
    let chunk = 64 << 10;
    let sound = stored - 2;
    assert!(
        fetched >= base.len() as u64 - sound * chunk && fetched <= base.len() as u64 + 1,
        "fetched {fetched} with {sound} sound chunks on disk"
    );
}

#[test]
fn the_cache_keeps_its_bound() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    let url_a = nginx.url("a.raw");
    let url_b = nginx.url("b.raw");
    let a = raw_base(&nginx, "a.raw", 8 << 20, 7);
    let b = raw_base(&nginx, "b.raw", 8 << 20, 8);
    let bound = ["--remote-cache-size", "4M"];
    assert_eq!(read_all(w, &cache, &url_a, "a.out", &bound), a);
    assert_eq!(read_all(w, &cache, &url_b, "b.out", &bound), b);
    let info = cache_info(&cache);
    assert!(info["bytes"].as_u64().unwrap() <= 4 << 20, "{info}");
    // The most recent chunks stayed: the end of b, not a.
    let objects = info["objects"].as_array().unwrap();
    assert_eq!(objects[0]["name"], url_b.as_str(), "{info}");
    assert!(objects[0]["chunks"].as_u64().unwrap() > 0);
    // Pruning by hand to a smaller bound.
    ok_cached(w, &cache, &["cache", "prune", "--remote-cache-size", "1M"]);
    assert!(cache_info(&cache)["bytes"].as_u64().unwrap() <= 1 << 20);
    // What was evicted is fetched again, correctly.
    assert_eq!(read_all(w, &cache, &url_a, "a2.out", &bound), a);
}

/// Makes `dir` unwritable even for root (immutable), else by its mode; undone by the
/// returned closure.
fn read_only_dir(dir: &Path) -> impl FnOnce() + '_ {
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let out = Command::new("chattr").arg("+i").arg(dir).output().unwrap();
        assert!(
            out.status.success(),
            "chattr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        let mut p = fs::metadata(dir).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o555);
        fs::set_permissions(dir, p).unwrap();
    }
    move || {
        if root {
            let _ = Command::new("chattr").arg("-i").arg(dir).output();
        } else {
            let mut p = fs::metadata(dir).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
            let _ = fs::set_permissions(dir, p);
        }
    }
}

#[test]
fn an_unwritable_cache_costs_one_warning_and_reads_go_to_the_network() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let base = raw_base(&nginx, "base.raw", 4 << 20, 9);
    let url = nginx.url("base.raw");
    let check = |cache: &Path| {
        let out = ok_cached(
            w,
            cache,
            &["convert", "-f", "raw", "-O", "raw", &url, "o.raw"],
        );
        assert!(fs::read(w.join("o.raw")).unwrap() == base);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.matches("host cache").count(), 1, "{err}");
        assert!(err.contains(&cache.display().to_string()), "{err}");
        fs::remove_file(w.join("o.raw")).unwrap();
    };
    // A directory that cannot be written.
    let ro = w.join("ro");
    fs::create_dir(&ro).unwrap();
    let undo = read_only_dir(&ro);
    check(&ro);
    undo();
    // A file where the directory should be.
    fs::write(w.join("file"), b"not a directory").unwrap();
    check(&w.join("file"));
    // An object directory that becomes unwritable after opening: stores fail, reads
    // still succeed.
    let cache = w.join("cache");
    ok_cached(
        w,
        &cache,
        &["io", "-f", "raw", "-r", "-c", "read 0 64k", &url],
    );
    let objects = cache.join("objects");
    let object = fs::read_dir(&objects)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let undo = read_only_dir(&object);
    check(&cache);
    undo();
}

fn s3_objects_are_cached_by_endpoint_and_version(kind: Kind) {
    let server = S3Server::start(kind);
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    server.create_bucket("images");
    let old = test_bytes(3 << 20, 10);
    server.put("images", "base.raw", &old);
    let url = "s3://images/base.raw";
    let read = |out: &str| {
        let o = server.qed(
            w,
            &["convert", "-f", "raw", "-O", "raw", url, out],
            &[("QED_CACHE_DIR", Some(cache.to_str().unwrap()))],
        );
        assert!(
            o.status.success(),
            "{kind:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        fs::read(w.join(out)).unwrap()
    };
    assert!(read("a.raw") == old);
    let info = cache_info(&cache);
    let object = &info["objects"][0];
    assert_eq!(object["name"], url);
    let key = object["key"].as_str().unwrap();
    assert!(key.contains(&server.endpoint()), "{kind:?}: {key}");
    assert!(
        key.contains(&server.etag("images", "base.raw")),
        "{kind:?}: {key}"
    );
    assert_eq!(object["chunks"], 48);
    // Replaced under the same key, it is read as it is now.
    let new = test_bytes(3 << 20, 20);
    server.put("images", "base.raw", &new);
    assert!(
        read("b.raw") == new,
        "{kind:?}: the old object's chunks were served"
    );
    let info = cache_info(&cache);
    assert_eq!(
        info["objects"].as_array().unwrap().len(),
        2,
        "{kind:?}: {info}"
    );
}

#[test]
fn s3s_fs_objects_are_cached_by_endpoint_and_version() {
    s3_objects_are_cached_by_endpoint_and_version(Kind::S3sFs);
}

#[test]
fn moto_objects_are_cached_by_endpoint_and_version() {
    s3_objects_are_cached_by_endpoint_and_version(Kind::Moto);
}

#[test]
fn an_export_reads_a_warm_base_from_the_cache_files() {
    let nginx = Nginx::start();
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    let www = nginx.root();
    common::ok(
        &www,
        "qemu-img",
        &["create", "-q", "-f", "qed", "base.qed", "64M"],
    );
    common::ok(
        &www,
        "qemu-io",
        &[
            "-c",
            "write -P 0x31 0 5M",
            "-c",
            "write -P 0x32 9M 3M",
            "-c",
            "write -P 0x33 40M 8M",
            "base.qed",
        ],
    );
    let url = nginx.url("base.qed");
    let cache_dir = format!("--remote-cache-dir={}", cache.display());
    common::ok(
        w,
        QED,
        &["create", "-q", "-b", &url, "-F", "qed", "top.qed"],
    );
    // Warmed by another process.
    ok_cached(w, &cache, &["convert", "-O", "raw", "top.qed", "warm.raw"]);
    let warm = nginx.settled_bytes_sent("base.qed");
    // Served, every read of the base comes from the cache's files (straight into the
    // export's io_uring once a chunk is checked): the same bytes, none fetched again.
    let served = common::served::Served::unix(w, &["-r", "-t", &cache_dir], "top.qed");
    for _ in 0..2 {
        common::ok(
            w,
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                "warm.raw",
                &served.uri(),
            ],
        );
    }
    common::ok(
        w,
        "qemu-img",
        &[
            "compare",
            "-F",
            "raw",
            &www.join("base.qed").display().to_string(),
            &served.uri(),
        ],
    );
    served.stop();
    assert!(
        nginx.settled_bytes_sent("base.qed") - warm <= 1,
        "the export fetched the base again"
    );
}
