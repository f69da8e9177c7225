//! `qed serve` started as a service: on a socket handed over by socket activation (as
//! libnbd's `[ CMD ]` form and systemd hand it), and in the background with `--fork`.
//! Also the export of a raw file whose size is not a multiple of 512.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::qemu::qemu_io;
use common::{activated, create_qed, describe, need_check, new_dir, ok, QED, QEMU_IMG};

/// Runs `prog` in `dir`, failing the test if it has not finished within `limit`: a
/// server that ignores the socket handed to it would leave the client waiting forever.
fn run_within(dir: &Path, prog: &str, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}{}", common::install_hint(prog)));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let _ = out.read_to_end(&mut o);
        o
    });
    let err_reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = err.read_to_end(&mut e);
        e
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{prog} {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

fn ok_within(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = run_within(dir, prog, args, Duration::from_secs(60));
    assert!(out.status.success(), "{}", describe(prog, args, &out));
    String::from_utf8(out.stdout).unwrap()
}

/// Writes recognisable data over the first `len` bytes of `image` (a 4 MiB run of
/// 0x5a and one of 0xc3 further on, a hole between).
fn fill(dir: &Path, image: &str) {
    qemu_io(
        dir,
        "qed",
        image,
        false,
        &["write -P 0x5a 0 4M", "write -P 0xc3 9M 3M"],
    );
}

// ---------------------------------------------------------------------------------------
// Socket activation.

#[test]
fn nbdinfo_and_nbdcopy_start_activated_servers() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "a.qed", "16M");
    create_qed(dir, "b.qed", "16M");
    fill(dir, "a.qed");

    let info = ok_within(dir, "nbdinfo", &["--", "[", QED, "serve", "a.qed", "]"]);
    assert!(
        info.contains("export-size: 16777216") && info.contains("base:allocation"),
        "{info}"
    );
    let map = ok_within(
        dir,
        "nbdinfo",
        &["--map", "--", "[", QED, "serve", "-r", "a.qed", "]"],
    );
    let first: Vec<&str> = map
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(first, ["0", "4194304", "0", "data"], "{map}");

    ok_within(
        dir,
        "nbdcopy",
        &[
            "--", "[", QED, "serve", "a.qed", "]", "[", QED, "serve", "b.qed", "]",
        ],
    );
    ok(
        dir,
        QEMU_IMG,
        &["compare", "-f", "qed", "-F", "qed", "a.qed", "b.qed"],
    );
    qemu_io(
        dir,
        "qed",
        "b.qed",
        true,
        &[
            "read -P 0x5a 0 4M",
            "read -P 0 4M 5M",
            "read -P 0xc3 9M 3M",
            "read -P 0 12M 4M",
        ],
    );
    // Each server left when its client did, and left its image clean.
    assert!(!need_check(&dir.join("a.qed")) && !need_check(&dir.join("b.qed")));
}

#[test]
fn a_handed_over_tcp_socket_is_served_and_listening_options_are_refused() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "16M");
    fill(dir, "img.qed");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    for refused in [
        &["-p", "10809"][..],
        &["-b", "127.0.0.1"],
        &["-k", "x.sock"],
    ] {
        let mut args = refused.to_vec();
        args.push("img.qed");
        let out = activated(dir, listener.as_raw_fd(), &args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("socket activation"),
            "{refused:?}: {}\n{err}",
            out.status
        );
    }
    assert!(!dir.join("x.sock").exists());

    let mut cmd = activated(dir, listener.as_raw_fd(), &["img.qed"]);
    let (mut child, log, banner) = common::spawn_server(&mut cmd);
    assert!(
        banner.contains(&format!("127.0.0.1:{port} (socket activation)")),
        "{banner}"
    );
    // The test keeps its own handle: the server is the one accepting on it.
    let uri = format!("nbd://127.0.0.1:{port}/");
    let out = qemu_io(
        dir,
        "raw",
        &uri,
        true,
        &["read -P 0x5a 0 4M", "read -P 0xc3 9M 3M"],
    );
    assert!(out.contains("read 3145728/3145728"), "{out}");
    // Not persistent: the server ends with its one client.
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}:\n{}", log.lock().unwrap());

    // A descriptor 3 that is no socket, and two sockets, are refused.
    let file = std::fs::File::open(dir.join("img.qed")).unwrap();
    let out = activated(dir, file.as_raw_fd(), &["img.qed"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a socket"),
        "{err}"
    );
    let out = activated(dir, listener.as_raw_fd(), &["img.qed"])
        .env("LISTEN_FDS", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("LISTEN_FDS"), "{err}");
}

// ---------------------------------------------------------------------------------------
// --fork.

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn fork_returns_once_ready_and_the_server_ends_on_sigterm() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "16M");
    let sock = dir.join("nbd.sock");
    let pid_file = dir.join("serve.pid");
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let started = Instant::now();
    let st = Command::new(QED)
        .args(["serve", "--fork", "-t", "--pid-file"])
        .arg(&pid_file)
        .arg("-k")
        .arg(&sock)
        .arg("img.qed")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .unwrap();
    assert!(st.success(), "qed serve --fork: {st}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Ready means listening, with the pid file written: no retry, no wait.
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the pid file exists when --fork returns")
        .trim()
        .parse()
        .unwrap();
    assert!(!ended(pid), "the server is running");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_io(dir, "raw", &uri, false, &["write -P 0x77 1M 2M"]);
    // Persistent: a second client after the first.
    qemu_io(
        dir,
        "raw",
        &uri,
        true,
        &["read -P 0x77 1M 2M", "read -P 0 3M 1M"],
    );

    let log = terminated_cleanly(dir, pid, &pid_file, &sock);
    assert!(log.contains("exported as"), "{log}");
}

#[test]
fn fork_reports_startup_errors_with_a_failing_exit() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "16M");
    let out = run_within(
        dir,
        QED,
        &["serve", "--fork", "-k", "nbd.sock", "missing.qed"],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.qed"),
        "{err}"
    );
    // A port already taken: the error comes after the image is open, from the child.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = run_within(
        dir,
        QED,
        &["serve", "--fork", "-p", &port, "img.qed"],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("could not listen"),
        "{err}"
    );
    assert!(!need_check(&dir.join("img.qed")));
}

// ---------------------------------------------------------------------------------------
// Sizes that are not a multiple of 512.

#[test]
fn a_raw_file_of_odd_size_is_exported_at_its_exact_size() {
    let tmp = new_dir();
    let dir = tmp.path();
    let mut data = vec![0x11u8; 992];
    data.extend_from_slice(&[0xab; 8]);
    std::fs::write(dir.join("odd.raw"), &data).unwrap();
    let info = ok_within(
        dir,
        "nbdinfo",
        &["--", "[", QED, "serve", "-f", "raw", "odd.raw", "]"],
    );
    assert!(info.contains("export-size: 1000\n"), "{info}");
    ok_within(
        dir,
        "nbdcopy",
        &[
            "--", "[", QED, "serve", "-f", "raw", "-r", "odd.raw", "]", "copy.raw",
        ],
    );
    assert_eq!(std::fs::read(dir.join("copy.raw")).unwrap(), data);
    // QEMU's client rounds the size up to a sector and reads the tail as zeroes itself.
    let sock = dir.join("odd.sock");
    let (mut child, _log, _) = common::spawn_server(
        Command::new(QED)
            .args(["serve", "-f", "raw", "-k"])
            .arg(&sock)
            .arg("odd.raw")
            .current_dir(dir),
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = qemu_io(
        dir,
        "raw",
        &uri,
        true,
        &[
            "read -P 0x11 0 992",
            "read -P 0xab 992 8",
            "read -P 0 1000 24",
        ],
    );
    assert!(out.contains("read 24/24 bytes at offset 1000"), "{out}");
    let st = child.wait().unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read(dir.join("odd.raw")).unwrap(), data);
}

/// Sends SIGTERM to the forked server `pid` and waits for it; asserts that it removed
/// its pid file and socket and left `img.qed` clean. Returns its log, `serve.log`.
fn terminated_cleanly(dir: &Path, pid: u32, pid_file: &Path, sock: &Path) -> String {
    common::signal(pid, "TERM");
    let t = Instant::now();
    while !ended(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the server ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !pid_file.exists() && !sock.exists(),
        "pid file and socket removed"
    );
    assert!(
        !need_check(&dir.join("img.qed")),
        "the image was left clean"
    );
    std::fs::read_to_string(dir.join("serve.log")).unwrap()
}

/// The vhost-user-blk export's lifecycle is the NBD export's: --fork returns once it
/// listens, with the pid file written, and SIGTERM ends it, removing both and leaving
/// the image clean.
#[test]
fn a_forked_vhost_user_blk_export_ends_on_sigterm() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "16M");
    let sock = dir.join("vhost.sock");
    let pid_file = dir.join("serve.pid");
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let st = Command::new(QED)
        .args(["serve", "--fork", "--num-queues", "2", "--pid-file"])
        .arg(&pid_file)
        .arg("--vhost-user-blk")
        .arg(&sock)
        .arg("img.qed")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .unwrap();
    assert!(st.success(), "qed serve --fork --vhost-user-blk: {st}");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the pid file exists when --fork returns")
        .trim()
        .parse()
        .unwrap();
    assert!(!ended(pid), "the server is running");
    let kind = std::fs::symlink_metadata(&sock)
        .expect("the socket exists")
        .file_type();
    assert!(kind.is_socket(), "{} is a socket", sock.display());

    let log = terminated_cleanly(dir, pid, &pid_file, &sock);
    assert!(log.contains("vhost-user-blk device (2 queues)"), "{log}");
    assert!(log.contains("requests completed per queue: 0, 0"), "{log}");
}
