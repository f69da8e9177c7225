//! What the CLI's integration tests share: running the real tools and reading what they
//! leave. Each test file takes the parts it needs: this module runs commands and
//! servers; `served` is `qed serve`, `mount` is `qed mount`, `qemu` is qemu-img and
//! qemu-io as the oracle, `fio` the verified fio runs, `nginx` and `s3` the HTTP and S3
//! servers remote bases come from, and `dir` the scratch directory the whole-image
//! command tests work in.

#![allow(dead_code)]

pub mod dir;
pub mod fio;
pub mod mount;
pub mod nginx;
pub mod qemu;
pub mod s3;
pub mod served;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const QED: &str = env!("CARGO_BIN_EXE_qed");
pub const QEMU_IMG: &str = "qemu-img";
pub const QEMU_IO: &str = "qemu-io";
pub const FIO: &str = "fio";

/// Runs `prog` in `dir`. A missing tool fails the test, saying what to install:
/// skipping would let a machine without it report the suite as passing.
pub fn run<S: AsRef<OsStr>>(dir: &Path, prog: &str, args: &[S]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}{}", install_hint(prog)))
}

/// Where a tool the tests run comes from (`tests/run` installs them all).
pub fn install_hint(prog: &str) -> &'static str {
    match prog {
        "qemu-img" | "qemu-io" | "qemu-nbd" | "qemu-storage-daemon" => {
            " (apt-get install qemu-utils, or run tests/run)"
        }
        "nbdinfo" | "nbdcopy" => " (apt-get install libnbd-bin, or run tests/run)",
        "fio" => " (apt-get install fio, or run tests/run)",
        "fusermount3" => " (apt-get install fuse3, or run tests/run)",
        "mkfs.ext4" | "e2fsck" | "mke2fs" => " (apt-get install e2fsprogs, or run tests/run)",
        "nginx" => " (apt-get install nginx-light, or run tests/run)",
        "s3s-fs" => {
            " (cargo install s3s-fs --version 0.14.1 --features binary --locked, or run \
             tests/run)"
        }
        "moto_server" => " (pip install 'moto[server]' in a venv, or run tests/run)",
        "qemu-system-x86_64" => " (qemu-system-x86 from bookworm-backports: run tests/run)",
        "openssl" => " (apt-get install openssl, or run tests/run)",
        "bash" | "md5sum" | "setpriv" => " (a base system tool)",
        _ => "",
    }
}

/// A command and what came of it, for assertion messages.
pub fn describe<S: AsRef<OsStr>>(prog: &str, args: &[S], out: &Output) -> String {
    let line: Vec<String> = args
        .iter()
        .map(|a| {
            let a = a.as_ref().to_string_lossy();
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect();
    format!(
        "`{prog} {}`\n  status: {}\n  stdout:\n{}\n  stderr:\n{}",
        line.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `prog`, asserts success, returns stdout.
pub fn ok<S: AsRef<OsStr>>(dir: &Path, prog: &str, args: &[S]) -> String {
    let out = run(dir, prog, args);
    assert!(out.status.success(), "{}", describe(prog, args, &out));
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs `prog` and asserts its exit code; returns its stdout and stderr.
pub fn exits<S: AsRef<OsStr>>(dir: &Path, prog: &str, args: &[S], code: i32) -> (String, String) {
    let out = run(dir, prog, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit code {code} from {}",
        describe(prog, args, &out)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `prog`, asserts failure, returns stdout and stderr together.
pub fn fails<S: AsRef<OsStr>>(dir: &Path, prog: &str, args: &[S]) -> String {
    let out = run(dir, prog, args);
    assert!(
        !out.status.success(),
        "expected failure from {}",
        describe(prog, args, &out)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The QED header's NEED_CHECK bit (features at 0x10, bit 0x2).
pub fn need_check(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut b, 0x10))
        .expect("read the image header");
    u64::from_le_bytes(b) & 0x2 != 0
}

/// Deterministic bytes with runs of zeros (every fifth 64 KiB), so that copies and
/// streams meet holes as well as data.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(64 << 10).enumerate() {
        if i % 5 == 2 {
            continue;
        }
        for b in chunk {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    out
}

pub fn new_dir() -> TempDir {
    tempfile::tempdir().expect("create a temporary directory")
}

pub fn create_qed(dir: &Path, name: &str, size: &str) {
    ok(dir, QED, &["create", "-q", name, size]);
}

/// Sends signal `sig` (a name such as TERM) to process `pid`, through kill(1).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Waits for `child` to exit, at most `limit`; `None` if it is still running then.
pub fn exited_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("look at a child process") {
            return Some(st);
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed (and reaped) when dropped, so that a failing test leaves
/// nothing running.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits until `cond` holds, failing the test with `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a server started by a test printed on stderr, collected while it runs.
pub type Log = Arc<Mutex<String>>;

/// Spawns `cmd`, a server that prints a banner line on stderr once it listens, with its
/// stderr collected into a log; returns the server, the log and the banner. A server
/// that prints nothing within 20 s is killed, and the test fails with what it printed.
pub fn spawn_server(cmd: &mut Command) -> (Child, Log, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let log = Log::default();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(banner) => (child, log, banner),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "{cmd:?} did not start ({status:?}):\n{}",
                log.lock().unwrap()
            );
        }
    }
}

/// Whether the header cluster of the QED image at `path` holds the magic of a record
/// pinning a remote base (a record qed no longer trusts has its magic cleared).
pub fn has_pin_record(path: &Path) -> bool {
    let bytes = std::fs::read(path).expect("read the image");
    let header = &bytes[..bytes.len().min(64 << 10)];
    header.windows(8).any(|w| w == b"QEDpin\0\x01")
}

/// The ETag a server gives for `url` now, from a one-byte ranged GET.
pub fn etag_of(url: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let resp = agent
        .get(url)
        .header("Range", "bytes=0-0")
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{url} has no ETag"))
        .to_string()
}

/// `qed serve ARGS` with `fd` handed over as socket activation does: at descriptor 3,
/// LISTEN_FDS=1 and LISTEN_PID naming the server's own process.
pub fn activated(dir: &Path, fd: RawFd, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    // The shell learns the pid it keeps when it execs the server.
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$@\"", "sh", QED, "serve"])
        .args(args)
        .current_dir(dir)
        .env("LISTEN_FDS", "1")
        .stdin(Stdio::null());
    // SAFETY: between fork and exec the closure only calls dup2 and fcntl, which are
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}
