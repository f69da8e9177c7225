//! Jobs inside `qed serve`: streams started and watched through the control socket
//! (`--control`, `qed job`) or at launch (`--stream`), while real NBD clients use the
//! export; and the control protocol's answers to bad requests.
//!
//! Every server is a child process running the shipped binary, as in tests/nbd.rs, and
//! every image is judged afterwards by QEMU's own tools.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::fio::{nbd_engine, Verified};
use common::qemu::{assert_identical, qemu_img_check, qemu_img_info, qemu_io};
use common::served::Served;
use common::{describe, fails, need_check, new_dir, ok, test_bytes, QED, QEMU_IMG};

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Images.

/// Writes `base.raw` (test bytes) and the same content as `base.qed`; returns the bytes.
fn make_base(dir: &Path, size: u64) -> Vec<u8> {
    let bytes = test_bytes(size as usize, 0xba5e);
    std::fs::write(dir.join("base.raw"), &bytes).unwrap();
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "raw", "-O", "qed", "base.raw", "base.qed"],
    );
    bytes
}

/// An empty overlay `name` on `backing`.
fn overlay(dir: &Path, name: &str, backing: &str) {
    ok(
        dir,
        QED,
        &["create", "-q", "-b", backing, "-F", "qed", name],
    );
}

fn backing_of(dir: &Path, image: &str) -> Option<String> {
    qemu_img_info(dir, image)["backing-filename"]
        .as_str()
        .map(str::to_string)
}

/// Depth (in the backing chain) qemu-img map gives the byte at `offset`.
fn depth_at(map: &Value, offset: u64) -> u64 {
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if (start..start + len).contains(&offset) {
            return e["depth"].as_u64().unwrap();
        }
    }
    panic!("offset {offset} is not in the map");
}

// ---------------------------------------------------------------------------------------
// `qed job`.

/// `query-jobs` as `qed job SOCKET query --output json` prints it.
fn query(dir: &Path, ctl: &str) -> Value {
    let out = ok(dir, QED, &["job", ctl, "query", "--output", "json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("query printed bad JSON ({e}):\n{out}"))
}

fn find_job(dir: &Path, ctl: &str, id: &str) -> Option<Value> {
    let all = query(dir, ctl);
    all.as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
}

fn job(dir: &Path, ctl: &str, id: &str) -> Value {
    find_job(dir, ctl, id).unwrap_or_else(|| panic!("no job {id} in {}", query(dir, ctl)))
}

/// Polls until the job `id` is concluded; returns it as the server lists it.
fn wait_concluded(dir: &Path, ctl: &str, id: &str, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let j = job(dir, ctl, id);
        if j["status"] == "concluded" {
            return j;
        }
        assert_eq!(j["status"], "running", "{j}");
        assert!(
            t.elapsed() < limit,
            "job {id} still running after {limit:?}: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until the job `id` exists (it may be being started by another process) and
/// has copied something.
fn wait_progress(dir: &Path, ctl: &str, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let j = find_job(dir, ctl, id);
        if let Some(j) = j
            .as_ref()
            .filter(|j| j["current-progress"].as_u64().unwrap() > 0)
        {
            return j.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no progress: {j:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_completed(j: &Value, size: u64) {
    assert_eq!(j["status"], "concluded", "{j}");
    assert!(j.get("error").is_none(), "the job failed: {j}");
    assert_eq!(j["type"], "stream", "{j}");
    assert_eq!(j["current-progress"], size, "{j}");
    assert_eq!(j["total-progress"], size, "{j}");
}

// ---------------------------------------------------------------------------------------
// 1. A stream under fio.

/// fio's four jobs, each writing (or with `verify_only`, checking) its own 8M of the
/// first 32M with crc32c verification.
fn fio(dir: &Path, uri: &str, verify_only: bool) {
    let run = Verified {
        name: "nbd",
        engine: nbd_engine(uri),
        jobs: 4,
        region: 8 * M,
        iodepth: 16,
    };
    run.run(dir, verify_only);
}

#[test]
fn online_stream_under_fio_verify() {
    const SIZE: u64 = 64 * M;
    let tmp = new_dir();
    let dir = tmp.path();
    let mut expected = make_base(dir, SIZE);
    overlay(dir, "top.qed", "base.qed");
    // The image's own data, which the stream must leave alone.
    qemu_io(dir, "qed", "top.qed", false, &["write -P 0x5a 40M 1M"]);
    expected[40 * M as usize..41 * M as usize].fill(0x5a);

    let s = Served::with_control(dir, &["-e", "5"], "top.qed");
    // Slow enough to be copying all through fio's run.
    let id = ok(dir, QED, &["job", s.ctl(), "stream", "--rate", "6M"]);
    let id = id.trim();
    assert_eq!(job(dir, s.ctl(), id)["status"], "running");
    fio(dir, &s.uri(), false);
    let during = job(dir, s.ctl(), id);
    eprintln!("after fio's writes: {during}");

    let j = wait_concluded(dir, s.ctl(), id, Duration::from_secs(120));
    assert_completed(&j, SIZE);
    // What fio wrote reads back now that the image stands alone.
    fio(dir, &s.uri(), true);
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "raw", "-O", "raw", &s.uri(), "export.raw"],
    );
    let log = s.stop();
    assert!(
        log.contains(&format!("top.qed: job '{id}' (stream) completed")),
        "{log}"
    );

    assert!(!need_check(&dir.join("top.qed")));
    assert_eq!(backing_of(dir, "top.qed"), None);
    qemu_img_check(dir, "top.qed");
    // The image is what was served, to the byte...
    assert_identical(dir, ("raw", "export.raw"), ("qed", "top.qed"));
    // ... which is the base overlaid with the image's own data and fio's writes.
    let export = std::fs::read(dir.join("export.raw")).unwrap();
    let fio_part = 0..32 * M as usize;
    assert_ne!(export[fio_part.clone()], expected[fio_part.clone()]);
    expected[fio_part.clone()].copy_from_slice(&export[fio_part]);
    std::fs::write(dir.join("expected.raw"), &expected).unwrap();
    assert_identical(dir, ("raw", "expected.raw"), ("qed", "top.qed"));
    let map: Value = serde_json::from_str(&ok(
        dir,
        QEMU_IMG,
        &["map", "-f", "qed", "--output=json", "top.qed"],
    ))
    .unwrap();
    for e in map.as_array().unwrap() {
        assert_eq!(e["depth"], 0, "a run still read from a backing file: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Cancelling through `qed job`.

#[test]
fn qed_job_query_cancel_and_an_offline_stream_after() {
    const SIZE: u64 = 32 * M;
    let tmp = new_dir();
    let dir = tmp.path();
    make_base(dir, SIZE);
    overlay(dir, "top.qed", "base.qed");

    let s = Served::with_control(dir, &[], "top.qed");
    assert_eq!(ok(dir, QED, &["job", s.ctl(), "query"]).trim(), "No jobs");
    let id = ok(
        dir,
        QED,
        &["job", s.ctl(), "stream", "--rate", "1M", "--id", "slow"],
    );
    assert_eq!(id.trim(), "slow");
    wait_progress(dir, s.ctl(), "slow");
    let human = ok(dir, QED, &["job", s.ctl(), "query"]);
    let row = human.lines().find(|l| l.starts_with("slow ")).unwrap();
    assert!(row.contains("stream") && row.contains("running"), "{human}");
    assert!(row.contains(&format!("/{SIZE} (")), "{human}");

    ok(dir, QED, &["job", s.ctl(), "cancel", "--wait", "slow"]);
    let j = job(dir, s.ctl(), "slow");
    assert_eq!(j["status"], "concluded", "{j}");
    assert_eq!(j["error"], "Operation canceled", "{j}");
    assert!(j["current-progress"].as_u64().unwrap() < SIZE, "{j}");
    let human = ok(dir, QED, &["job", s.ctl(), "query"]);
    assert!(human.contains("error: Operation canceled"), "{human}");
    // A concluded job cannot be cancelled; the server's words reach the user.
    let out = fails(dir, QED, &["job", s.ctl(), "cancel", "slow"]);
    assert!(out.contains("cannot accept command verb 'cancel'"), "{out}");
    ok(dir, QED, &["job", s.ctl(), "dismiss", "slow"]);
    assert_eq!(query(dir, s.ctl()), serde_json::json!([]));

    // A client waiting for a job that does not complete says so, and fails.
    let waiting = Command::new(QED)
        .args([
            "job",
            s.ctl(),
            "stream",
            "--rate",
            "1M",
            "--id",
            "w",
            "--wait",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_progress(dir, s.ctl(), "w");
    ok(dir, QED, &["job", s.ctl(), "cancel", "w"]);
    let out = waiting.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "{}",
        describe("qed job", &["--wait"], &out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "w");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("qed: job 'w' (stream) cancelled at"), "{err}");

    let log = s.stop();
    assert!(log.contains("job 'slow' (stream) cancelled at"), "{log}");
    assert!(log.contains("job 'w' (stream) cancelled at"), "{log}");

    // Some clusters were copied, the header still names the base, and the image reads
    // exactly as its base.
    assert_eq!(backing_of(dir, "top.qed").as_deref(), Some("base.qed"));
    qemu_img_check(dir, "top.qed");
    assert_identical(dir, ("qed", "base.qed"), ("qed", "top.qed"));
    let map: Value = serde_json::from_str(&ok(
        dir,
        QEMU_IMG,
        &["map", "-f", "qed", "--output=json", "top.qed"],
    ))
    .unwrap();
    assert_eq!(depth_at(&map, 0), 0, "nothing was copied: {map}");
    assert_eq!(depth_at(&map, SIZE - 1), 1, "everything was copied: {map}");

    // The offline command finishes the job.
    ok(dir, QED, &["stream", "top.qed"]);
    assert_eq!(backing_of(dir, "top.qed"), None);
    qemu_img_check(dir, "top.qed");
    assert_identical(dir, ("raw", "base.raw"), ("qed", "top.qed"));
}

// ---------------------------------------------------------------------------------------
// 3. The protocol's errors.

/// A control connection spoken by hand.
struct Raw {
    out: UnixStream,
    lines: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> (Raw, Value) {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut raw = Raw {
            out: s.try_clone().unwrap(),
            lines: BufReader::new(s),
        };
        let greeting = raw.read().expect("a greeting");
        (raw, greeting)
    }

    fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.lines.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("the server sent a line that is not JSON ({e}): {line}")
            })),
            Err(e) => panic!("reading a reply: {e}"),
        }
    }

    /// Sends `line` and returns the reply.
    fn ask(&mut self, line: &str) -> Value {
        self.out.write_all(line.as_bytes()).unwrap();
        self.out.write_all(b"\n").unwrap();
        self.read().unwrap_or_else(|| panic!("no reply to {line}"))
    }

    /// Sends `line`, asserts an error of `class` whose description contains `desc`.
    fn refused(&mut self, line: &str, class: &str, desc: &str) -> Value {
        let r = self.ask(line);
        assert_eq!(r["error"]["class"], class, "{line} -> {r}");
        let got = r["error"]["desc"].as_str().unwrap();
        assert!(got.contains(desc), "{line} -> {r}");
        r
    }
}

#[test]
fn control_protocol_errors() {
    const SIZE: u64 = 16 * M;
    let tmp = new_dir();
    let dir = tmp.path();
    make_base(dir, SIZE);
    overlay(dir, "top.qed", "base.qed");
    // A socket file left by a server that is gone is replaced.
    drop(std::os::unix::net::UnixListener::bind(dir.join("ctl.sock")).unwrap());

    let s = Served::with_control(dir, &[], "top.qed");
    let (mut c, greeting) = Raw::connect(s.control());
    assert!(
        greeting["QMP"]["version"]["qemu"]["major"].is_u64(),
        "{greeting}"
    );
    assert_eq!(greeting["QMP"]["capabilities"], serde_json::json!([]));

    let r = c.ask(r#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(r, serde_json::json!({"return": {}}));
    let r = c.ask(r#"{"execute":"query-jobs","id":"q1"}"#);
    assert_eq!(r, serde_json::json!({"return": [], "id": "q1"}));
    let r = c.ask(r#"{"execute":"query-commands"}"#);
    for name in ["stream", "query-jobs", "job-cancel", "job-dismiss"] {
        assert!(
            r["return"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!({ "name": name })),
            "{r}"
        );
    }

    c.refused(
        "{\"execute\": \"query-jobs\"",
        "GenericError",
        "JSON parse error",
    );
    c.refused("not json", "GenericError", "JSON parse error");
    c.refused("[1, 2]", "GenericError", "must be a JSON object");
    c.refused(
        r#"{"arguments":{}}"#,
        "GenericError",
        "lacks member 'execute'",
    );
    c.refused(
        r#"{"execute":"stream","arguments":[]}"#,
        "GenericError",
        "must be an object",
    );
    let r = c.refused(
        r#"{"execute":"no-such-command","id":5}"#,
        "CommandNotFound",
        "no-such-command",
    );
    assert_eq!(r["id"], 5);
    c.refused(
        r#"{"execute":"job-cancel"}"#,
        "GenericError",
        "Parameter 'id' is missing",
    );
    c.refused(
        r#"{"execute":"job-cancel","arguments":{"id":"nope"}}"#,
        "GenericError",
        "Job 'nope' not found",
    );
    c.refused(
        r#"{"execute":"job-dismiss","arguments":{"id":"nope"}}"#,
        "GenericError",
        "not found",
    );
    c.refused(
        r#"{"execute":"stream","arguments":{"rate":"fast"}}"#,
        "GenericError",
        "Invalid parameter type for 'rate'",
    );
    c.refused(
        r#"{"execute":"stream","arguments":{"rate":0}}"#,
        "GenericError",
        "more than 0",
    );
    c.refused(
        r#"{"execute":"stream","arguments":{"speed":1}}"#,
        "GenericError",
        "Parameter 'speed' is unexpected",
    );
    c.refused(
        r#"{"execute":"stream","arguments":{"base":"nosuch.qed"}}"#,
        "GenericError",
        "not in the backing chain",
    );
    c.refused(
        r#"{"execute":"stream","arguments":{"job-id":"1bad"}}"#,
        "GenericError",
        "Invalid job ID",
    );

    // One stream at a time.
    let r = c.ask(r#"{"execute":"stream","arguments":{"rate":1048576,"job-id":"one"},"id":1}"#);
    assert_eq!(r, serde_json::json!({"return": {"id": "one"}, "id": 1}));
    c.refused(r#"{"execute":"stream"}"#, "GenericError", "busy");
    c.refused(
        r#"{"execute":"job-dismiss","arguments":{"id":"one"}}"#,
        "GenericError",
        "in state 'running'",
    );
    // The connection survived every error.
    let r = c.ask(r#"{"execute":"query-jobs"}"#);
    assert_eq!(r["return"][0]["id"], "one", "{r}");

    // A line past the bound: an error, then the connection ends (maybe before the
    // line's end is written).
    let long = format!(
        "{{\"execute\":\"query-jobs\",\"id\":\"{}\"}}\n",
        "x".repeat(70_000)
    );
    let _ = c.out.write_all(long.as_bytes());
    let r = c.read().expect("a reply to the long line");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("longer than"),
        "{r}"
    );
    let mut rest = Vec::new();
    let _ = c.lines.read_to_end(&mut rest);
    assert!(rest.is_empty(), "more after the refusal: {rest:?}");

    // Others are still served; `qed job` prints the server's errors and fails.
    let (mut d, _) = Raw::connect(s.control());
    let r = d.ask(r#"{"execute":"job-cancel","arguments":{"id":"one"}}"#);
    assert_eq!(r, serde_json::json!({"return": {}}));
    let out = fails(dir, QED, &["job", s.ctl(), "cancel", "nope"]);
    assert!(out.contains("qed: Job 'nope' not found"), "{out}");
    let out = fails(dir, QED, &["job", s.ctl(), "stream", "-b", "nosuch.qed"]);
    assert!(out.contains("not in the backing chain"), "{out}");
    wait_concluded(dir, s.ctl(), "one", Duration::from_secs(30));

    // The image is not served twice (its write lock is held)...
    let out = fails(dir, QED, &["serve", "-k", "other.sock", "top.qed"]);
    assert!(out.contains("Failed to get \"write\" lock"), "{out}");
    // ...and a live control socket is not taken over, for another image either.
    common::create_qed(dir, "other.qed", "1M");
    let out = fails(
        dir,
        QED,
        &[
            "serve",
            "-k",
            "other.sock",
            "--control",
            s.ctl(),
            "other.qed",
        ],
    );
    assert!(out.contains("in use"), "{out}");
    assert!(s.control().exists());
    assert!(!dir.join("other.sock").exists());
    s.stop();
    assert_eq!(backing_of(dir, "top.qed").as_deref(), Some("base.qed"));

    // Exports a stream cannot run on refuse it with a reason.
    let s = Served::with_control(dir, &["-f", "raw"], "base.raw");
    let (mut c, _) = Raw::connect(s.control());
    c.refused(r#"{"execute":"stream"}"#, "GenericError", "raw image");
    drop(c);
    s.stop();
    let s = Served::with_control(dir, &["-r"], "top.qed");
    let (mut c, _) = Raw::connect(s.control());
    c.refused(r#"{"execute":"stream"}"#, "GenericError", "read-only");
    drop(c);
    s.stop();
}

// ---------------------------------------------------------------------------------------
// 4. `qed serve --stream`.

#[test]
fn serve_stream_at_launch_with_copy_on_read_and_signals() {
    const SIZE: u64 = 32 * M;
    let tmp = new_dir();
    let dir = tmp.path();
    make_base(dir, SIZE);
    overlay(dir, "top.qed", "base.qed");

    // Refused before anything listens.
    for (args, why) in [
        (&["--stream", "-r"][..], "read-only"),
        (
            &["--stream", "--stream-base", "nosuch.qed"][..],
            "not in the backing chain",
        ),
        (&["--stream", "--stream-rate", "0"][..], "more than 0"),
        (&["--stream-rate", "1M"][..], "--stream"),
    ] {
        let mut a = vec!["serve", "-k", "nbd.sock", "--control", "ctl.sock"];
        a.extend_from_slice(args);
        a.push("top.qed");
        let out = fails(dir, QED, &a);
        assert!(out.contains(why), "{a:?}: {out}");
        assert!(!dir.join("ctl.sock").exists() && !dir.join("nbd.sock").exists());
    }
    let out = fails(dir, QED, &["serve", "-f", "raw", "--stream", "base.raw"]);
    assert!(out.contains("raw image"), "{out}");

    // Copy-on-read and the stream fill the same clusters; reads stay right throughout.
    let s = Served::with_control(
        dir,
        &["--stream", "--stream-rate", "4M", "--copy-on-read"],
        "top.qed",
    );
    // Started just after the banner, so perhaps not yet listed.
    assert_eq!(wait_progress(dir, s.ctl(), "stream0")["status"], "running");
    assert_identical(dir, ("raw", "base.raw"), ("raw", &s.uri()));
    let j = wait_concluded(dir, s.ctl(), "stream0", Duration::from_secs(120));
    assert_completed(&j, SIZE);
    assert_identical(dir, ("raw", "base.raw"), ("raw", &s.uri()));
    let log = s.stop();
    assert!(
        log.contains("top.qed: job 'stream0' (stream) completed"),
        "{log}"
    );
    assert_eq!(backing_of(dir, "top.qed"), None);
    qemu_img_check(dir, "top.qed");
    assert_identical(dir, ("raw", "base.raw"), ("qed", "top.qed"));

    // A signal cancels the job first: the image still names its base, and is clean.
    for sig in ["INT", "TERM"] {
        std::fs::remove_file(dir.join("top.qed")).unwrap();
        overlay(dir, "top.qed", "base.qed");
        let s = Served::with_control(dir, &["--stream", "--stream-rate", "1M"], "top.qed");
        wait_progress(dir, s.ctl(), "stream0");
        let log = s.stop_with(sig);
        assert!(
            log.contains("job 'stream0' (stream) cancelled at"),
            "{sig}: {log}"
        );
        assert!(!need_check(&dir.join("top.qed")));
        assert_eq!(backing_of(dir, "top.qed").as_deref(), Some("base.qed"));
        qemu_img_check(dir, "top.qed");
        assert_identical(dir, ("qed", "base.qed"), ("qed", "top.qed"));
    }
}

// ---------------------------------------------------------------------------------------
// 5. Keeping a layer of the chain.

#[test]
fn stream_keeping_a_middle_layer() {
    const SIZE: &str = "32M";
    let tmp = new_dir();
    let dir = tmp.path();
    // top -> upper -> mid -> base, each layer with data of its own and some over the
    // layer below.
    ok(dir, QED, &["create", "-q", "base.qed", SIZE]);
    qemu_io(dir, "qed", "base.qed", false, &["write -P 0x11 0 8M"]);
    overlay(dir, "mid.qed", "base.qed");
    qemu_io(
        dir,
        "qed",
        "mid.qed",
        false,
        &["write -P 0x21 0 1M", "write -P 0x22 8M 8M"],
    );
    overlay(dir, "upper.qed", "mid.qed");
    qemu_io(
        dir,
        "qed",
        "upper.qed",
        false,
        &[
            "write -P 0x32 8M 1M",
            "write -P 0x33 16M 8M",
            "write -z 20M 1M",
        ],
    );
    overlay(dir, "top.qed", "upper.qed");
    qemu_io(dir, "qed", "top.qed", false, &["write -P 0x44 24M 1M"]);
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "qed", "-O", "raw", "top.qed", "before.raw"],
    );

    let s = Served::with_control(dir, &[], "top.qed");
    // Named relative to the client's directory, which is not the server's concern.
    ok(
        dir,
        QED,
        &["job", s.ctl(), "stream", "-b", "mid.qed", "--wait"],
    );
    let chain = |dir: &Path| -> Vec<String> {
        let out = ok(
            dir,
            QEMU_IMG,
            // The server holds the image: QEMU reads it sharing (-U).
            &["info", "-U", "--backing-chain", "--output=json", "top.qed"],
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let f = i["filename"].as_str().unwrap();
                Path::new(f)
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(chain(dir), ["top.qed", "mid.qed", "base.qed"]);
    // Again, now that mid.qed is the backing file: nothing to copy, and the header must
    // go on naming mid.qed.
    ok(
        dir,
        QED,
        &["job", s.ctl(), "stream", "-b", "mid.qed", "--wait"],
    );
    assert_eq!(chain(dir), ["top.qed", "mid.qed", "base.qed"]);
    let jobs = query(dir, s.ctl());
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs}");
    for j in jobs.as_array().unwrap() {
        assert_completed(j, 32 * M);
    }
    s.stop();

    qemu_img_check(dir, "top.qed");
    assert_identical(dir, ("raw", "before.raw"), ("qed", "top.qed"));
    let map: Value = serde_json::from_str(&ok(
        dir,
        QEMU_IMG,
        &["map", "-f", "qed", "--output=json", "top.qed"],
    ))
    .unwrap();
    // upper.qed's clusters are the image's own now; mid and base are read through.
    assert_eq!(depth_at(&map, 8 * M), 0, "{map}");
    assert_eq!(depth_at(&map, 16 * M), 0, "{map}");
    assert_eq!(depth_at(&map, 20 * M), 0, "{map}");
    assert_eq!(depth_at(&map, 24 * M), 0, "{map}");
    assert_eq!(depth_at(&map, 0), 1, "{map}");
    assert_eq!(depth_at(&map, 12 * M), 1, "{map}");
    assert_eq!(depth_at(&map, 4 * M), 2, "{map}");

    // The rest, online again: no backing file at all.
    let s = Served::with_control(dir, &[], "top.qed");
    ok(dir, QED, &["job", s.ctl(), "stream", "-p"]);
    let j = wait_concluded(dir, s.ctl(), "stream0", Duration::from_secs(60));
    assert_completed(&j, 32 * M);
    s.stop();
    assert_eq!(chain(dir), ["top.qed"]);
    qemu_img_check(dir, "top.qed");
    assert_identical(dir, ("raw", "before.raw"), ("qed", "top.qed"));
}

// ---------------------------------------------------------------------------------------
// Compaction and defragmentation while clients write.

/// A 128 MiB image, written whole by qemu-io, then with every other cluster and a few
/// long runs discarded: scattered free space for the jobs to fill. Returns what the
/// guest reads.
fn holey_image(dir: &Path, name: &str) -> Vec<u8> {
    const SIZE: u64 = 128 * M;
    let bytes = test_bytes(SIZE as usize, 7);
    std::fs::write(dir.join("pattern.raw"), &bytes).unwrap();
    ok(
        dir,
        QEMU_IMG,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qed",
            "-S",
            "0",
            "pattern.raw",
            name,
        ],
    );
    let mut expected = bytes;
    let mut cmds = Vec::new();
    for c in (0..SIZE / (64 * K)).filter(|c| c % 2 == 1 || (900..1100).contains(c)) {
        cmds.push(format!("discard {} {}", c * 64 * K, 64 * K));
        expected[(c * 64 * K) as usize..((c + 1) * 64 * K) as usize].fill(0);
    }
    let mut args = vec!["io".to_string()];
    for c in &cmds {
        args.extend(["-c".to_string(), c.clone()]);
    }
    args.push(name.to_string());
    ok(dir, QED, &args);
    expected
}

#[test]
fn online_compact_and_defrag_under_fio_verify() {
    let tmp = new_dir();
    let dir = tmp.path();
    let mut expected = holey_image(dir, "img.qed");
    let before = std::fs::metadata(dir.join("img.qed")).unwrap().len();
    let s = Served::with_control(dir, &["-e", "5", "--discard=unmap"], "img.qed");
    let mut moved = Vec::new();
    for kind in ["compact", "defrag"] {
        // fio writes and verifies the first 32 MiB while the job moves clusters.
        std::thread::scope(|sc| {
            let writer = sc.spawn(|| fio(dir, &s.uri(), false));
            let id = ok(dir, QED, &["job", s.ctl(), kind, "--wait"]);
            let j = job(dir, s.ctl(), id.trim());
            assert!(j.get("error").is_none(), "{kind} failed: {j}");
            assert_eq!(j["type"], kind, "{j}");
            moved.push(j["current-progress"].as_u64().unwrap());
            writer.join().unwrap();
        });
        fio(dir, &s.uri(), true);
    }
    assert!(
        moved.iter().all(|&m| m > 0),
        "a job found nothing to do: {moved:?}"
    );
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "raw", "-O", "raw", &s.uri(), "export.raw"],
    );
    let log = s.stop();
    assert!(log.contains("(compact) completed"), "{log}");
    assert!(log.contains("(defrag) completed"), "{log}");
    qemu_img_check(dir, "img.qed");
    let after = std::fs::metadata(dir.join("img.qed")).unwrap().len();
    assert!(after < before * 3 / 5, "{before} -> {after} bytes");
    // fio's part is what fio verified; the rest is what was there.
    let export = std::fs::read(dir.join("export.raw")).unwrap();
    expected[..32 * M as usize].copy_from_slice(&export[..32 * M as usize]);
    std::fs::write(dir.join("expected.raw"), &expected).unwrap();
    assert_identical(dir, ("raw", "expected.raw"), ("qed", "img.qed"));
}

#[test]
fn compact_free_starts_a_compaction_on_its_own() {
    let tmp = new_dir();
    let dir = tmp.path();
    let bytes = test_bytes(64 * M as usize, 3);
    std::fs::write(dir.join("pattern.raw"), &bytes).unwrap();
    ok(
        dir,
        QEMU_IMG,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qed",
            "-S",
            "0",
            "pattern.raw",
            "img.qed",
        ],
    );
    let before = std::fs::metadata(dir.join("img.qed")).unwrap().len();
    let s = Served::with_control(dir, &["--discard=unmap", "--compact-free=25"], "img.qed");
    // 20% freed: below the mark, nothing starts.
    qemu_io(dir, "raw", &s.uri(), false, &["discard 0 12M", "flush"]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(query(dir, s.ctl()), serde_json::json!([]));
    // 40%: a compaction runs, and the file shrinks by what was freed.
    qemu_io(dir, "raw", &s.uri(), false, &["discard 32M 12M", "flush"]);
    let t = Instant::now();
    let id = loop {
        if let Some(j) = query(dir, s.ctl()).as_array().unwrap().first() {
            break j["id"].as_str().unwrap().to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no compaction started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let j = wait_concluded(dir, s.ctl(), &id, Duration::from_secs(60));
    assert_eq!(j["type"], "compact", "{j}");
    assert!(j.get("error").is_none(), "{j}");
    let shrunk = std::fs::metadata(dir.join("img.qed")).unwrap().len();
    assert!(shrunk <= before - 24 * M, "{before} -> {shrunk}");
    // Nothing more was freed: no second compaction.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(query(dir, s.ctl()).as_array().unwrap().len(), 1);
    let log = s.stop();
    assert!(
        log.contains(&format!("job '{id}' (compact) completed")),
        "{log}"
    );
    qemu_img_check(dir, "img.qed");
    let mut expected = bytes;
    expected[..12 * M as usize].fill(0);
    expected[32 * M as usize..44 * M as usize].fill(0);
    std::fs::write(dir.join("expected.raw"), &expected).unwrap();
    assert_identical(dir, ("raw", "expected.raw"), ("qed", "img.qed"));
}
