//! Image locking against QEMU's own tools, both ways: while one process holds an image
//! (or an overlay on a shared backing file) the other's conflicting opens are refused
//! and its compatible ones go through, with `-U` reading past a writer; locks go with
//! the process that held them, killed or not, and with a backing file a stream drops.

mod common;

use common::mount::MountGuard;
use common::{create_qed, fails, new_dir, ok, QED, QEMU_IMG, QEMU_IO};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The lock bytes QEMU's processes (and ours) hold on `path` now, from /proc/locks.
fn lock_bytes(path: &Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).expect("stat the image").ino();
    let locks = std::fs::read_to_string("/proc/locks").expect("read /proc/locks");
    let mut bytes = Vec::new();
    for line in locks.lines() {
        // "1: OFDLCK ADVISORY READ -1 fe:00:1234 100 100"
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = f.iter().position(|w| w.matches(':').count() == 2) else {
            continue;
        };
        if f[at].rsplit(':').next() != Some(&ino.to_string()) {
            continue;
        }
        let (Some(Ok(start)), Some(Ok(end))) = (
            f.get(at + 1).map(|s| s.parse::<u64>()),
            f.get(at + 2).map(|s| s.parse::<u64>()),
        ) else {
            continue;
        };
        bytes.extend(start..=end);
    }
    bytes.sort_unstable();
    bytes
}

fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    common::wait_for(Duration::from_secs(20), what, cond)
}

/// A process holding an image open; killed when dropped (unmounting what it mounted).
struct Holder {
    child: Child,
    name: String,
    /// What it mounted, detached once it is gone.
    mountpoint: Option<MountGuard>,
}

impl Holder {
    /// Starts `prog args` in `dir` and waits until it holds a write lock (byte 101) on
    /// `image`, or any lock (byte 100) when `writes` is false.
    fn start(dir: &Path, prog: &str, args: &[&str], image: &str, writes: bool) -> Holder {
        let path = dir.join(image);
        let before = lock_bytes(&path);
        let child = Command::new(prog)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}{}", common::install_hint(prog)));
        let name = format!("{prog} {}", args.join(" "));
        let mut h = Holder {
            child,
            name: name.clone(),
            mountpoint: None,
        };
        let byte = if writes { 101 } else { 100 };
        let count = |b: &[u64]| b.iter().filter(|&&x| x == byte).count();
        wait_for(&format!("{name} to lock {image}"), || {
            if let Ok(Some(st)) = h.child.try_wait() {
                panic!("{name} exited with {st} before locking {image}");
            }
            count(&lock_bytes(&path)) > count(&before)
        });
        h
    }

    /// qemu-io holding `image` open (read-only with `read_only`) until killed; waits for
    /// its lock on `locked` (the image, or a backing file it reads).
    fn qemu_io(dir: &Path, image: &str, read_only: bool, locked: &str) -> Holder {
        let mut args = vec!["-f", "qed", "-c", "sleep 600000", image];
        if read_only {
            args.insert(2, "-r");
        }
        Holder::start(dir, QEMU_IO, &args, locked, !read_only && locked == image)
    }

    fn kill(&mut self, signal: &str) {
        common::signal(self.child.id(), signal);
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{} did not exit",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.mountpoint = None;
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts that `prog args` fails, saying which lock it could not get. Servers that
/// were let in would run on: they are stopped after a while, and fail the assertion.
fn refused(dir: &Path, prog: &str, args: &[&str]) {
    let mut line = vec!["30", prog];
    line.extend_from_slice(args);
    let out = fails(dir, "timeout", &line);
    assert!(
        out.contains("Failed to get") && out.contains("lock"),
        "{prog} {args:?} failed, but not for a lock:\n{out}"
    );
}

/// The md5 of a file's bytes, to show a refused command changed nothing.
fn digest(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read the image")
}

/// An image with data, a base with data and an overlay on it.
fn images(dir: &Path) {
    create_qed(dir, "disk.qed", "64M");
    ok(dir, QED, &["io", "-c", "write -P 0x11 0 1M", "disk.qed"]);
    create_qed(dir, "base.qed", "64M");
    ok(dir, QED, &["io", "-c", "write -P 0x22 0 4M", "base.qed"]);
    ok(
        dir,
        QED,
        &["create", "-q", "-b", "base.qed", "-F", "qed", "ov.qed"],
    );
    ok(
        dir,
        QED,
        &["create", "-q", "-b", "base.qed", "-F", "qed", "ov2.qed"],
    );
    ok(dir, QED, &["io", "-c", "write -P 0x33 1M 64k", "ov2.qed"]);
}

/// Our commands that write `disk.qed` (or, for commit, its backing file), each refused
/// while another process holds the image for writing.
fn our_writers_are_refused(dir: &Path, image: &str) {
    let before = digest(&dir.join(image));
    let sock = dir.join("refused.sock");
    let sock = sock.to_str().unwrap();
    refused(dir, QED, &["serve", "-k", sock, image]);
    refused(dir, QED, &["io", "-c", "write -P 0x99 0 64k", image]);
    refused(dir, QED, &["compact", image]);
    refused(dir, QED, &["defrag", image]);
    refused(dir, QED, &["resize", image, "128M"]);
    refused(dir, QED, &["check", "-r", "all", image]);
    refused(dir, QED, &["create", "-q", image, "1M"]);
    let mnt = dir.join("refused.disk");
    std::fs::write(&mnt, b"").unwrap();
    refused(dir, QED, &["mount", image, mnt.to_str().unwrap()]);
    // Readers that do not share are refused too, and told about -U.
    let out = fails(dir, QED, &["info", image]);
    assert!(
        out.contains("Failed to get shared \"write\" lock") && out.contains("-U"),
        "{out}"
    );
    refused(dir, QED, &["io", "-r", "-c", "read 0 64k", image]);
    assert_eq!(
        digest(&dir.join(image)),
        before,
        "a refused command changed {image}"
    );
    // With -U they read.
    ok(dir, QED, &["info", "-U", image]);
    ok(dir, QED, &["map", "-U", image]);
    ok(dir, QED, &["check", "-U", image]);
    ok(dir, QED, &["compare", "-U", image, image]);
    ok(
        dir,
        QED,
        &["io", "-r", "-U", "-c", "read -P 0x11 0 64k", image],
    );
    ok(dir, QED, &["convert", "-U", "-O", "raw", image, "copy.raw"]);
    let out = fails(dir, QED, &["io", "-U", "-c", "write 0 64k", image]);
    assert!(out.contains("force-share"), "{out}");
}

#[test]
fn qemu_writers_keep_our_writers_out() {
    let d = new_dir();
    let dir = d.path();
    images(dir);
    let sock = dir.join("q.sock");
    let sock = sock.to_str().unwrap();
    let addr = format!("addr.type=unix,addr.path={sock}");
    let holders: [(&str, Vec<&str>); 3] = [
        (QEMU_IO, vec!["-f", "qed", "-c", "sleep 600000", "disk.qed"]),
        ("qemu-nbd", vec!["-f", "qed", "-t", "-k", sock, "disk.qed"]),
        (
            "qemu-storage-daemon",
            vec![
                "--blockdev",
                "driver=file,filename=disk.qed,node-name=f",
                "--blockdev",
                "driver=qed,file=f,node-name=q",
                "--nbd-server",
                &addr,
                "--export",
                "type=nbd,id=e,node-name=q,writable=on",
            ],
        ),
    ];
    for (prog, args) in &holders {
        let mut h = Holder::start(dir, prog, args, "disk.qed", true);
        our_writers_are_refused(dir, "disk.qed");
        h.kill("TERM");
        let _ = std::fs::remove_file(dir.join("q.sock"));
    }
    // Nobody holds it now: a writer gets in.
    ok(dir, QED, &["io", "-c", "write -P 0x11 0 64k", "disk.qed"]);
}

#[test]
fn our_writers_keep_qemus_out() {
    let d = new_dir();
    let dir = d.path();
    images(dir);
    let sock = dir.join("s.sock");
    let sock = sock.to_str().unwrap();
    let mnt = dir.join("disk.mnt");
    std::fs::write(&mnt, b"").unwrap();
    let holders: [Vec<&str>; 3] = [
        vec!["serve", "-k", sock, "disk.qed"],
        vec!["io", "-c", "sleep 600000", "disk.qed"],
        vec!["mount", "disk.qed", mnt.to_str().unwrap()],
    ];
    for args in &holders {
        let mut h = Holder::start(dir, QED, args, "disk.qed", true);
        if args[0] == "mount" {
            h.mountpoint = Some(MountGuard(mnt.clone()));
        }
        let before = digest(&dir.join("disk.qed"));
        refused(
            dir,
            QEMU_IO,
            &["-f", "qed", "-c", "write 0 64k", "disk.qed"],
        );
        refused(
            dir,
            QEMU_IO,
            &["-f", "qed", "-r", "-c", "read 0 64k", "disk.qed"],
        );
        refused(dir, QEMU_IMG, &["info", "disk.qed"]);
        refused(dir, QEMU_IMG, &["resize", "disk.qed", "128M"]);
        refused(dir, QEMU_IMG, &["create", "-f", "qed", "disk.qed", "1M"]);
        let qsock = dir.join("q.sock");
        refused(
            dir,
            "qemu-nbd",
            &["-f", "qed", "-k", qsock.to_str().unwrap(), "disk.qed"],
        );
        refused(
            dir,
            "qemu-storage-daemon",
            &[
                "--blockdev",
                "driver=file,filename=disk.qed,node-name=f",
                "--blockdev",
                "driver=qed,file=f,node-name=q",
            ],
        );
        assert_eq!(digest(&dir.join("disk.qed")), before);
        // QEMU's -U reads beside our writer.
        ok(dir, QEMU_IMG, &["info", "-U", "disk.qed"]);
        ok(
            dir,
            QEMU_IO,
            &[
                "-f",
                "qed",
                "-r",
                "-U",
                "-c",
                "read -P 0x11 0 64k",
                "disk.qed",
            ],
        );
        // And another qed is kept out like QEMU.
        our_writers_are_refused(dir, "disk.qed");
        h.kill("TERM");
        let _ = std::fs::remove_file(dir.join("s.sock"));
    }
    ok(
        dir,
        QEMU_IO,
        &["-f", "qed", "-c", "write -P 0x11 0 64k", "disk.qed"],
    );
}

#[test]
fn readers_share_with_readers() {
    let d = new_dir();
    let dir = d.path();
    images(dir);
    let sock = dir.join("s.sock");
    let sock = sock.to_str().unwrap();
    // QEMU reads; we read beside it, and may not write.
    let mut h = Holder::qemu_io(dir, "disk.qed", true, "disk.qed");
    ok(dir, QED, &["info", "disk.qed"]);
    ok(
        dir,
        QED,
        &["io", "-r", "-c", "read -P 0x11 0 64k", "disk.qed"],
    );
    ok(dir, QED, &["compare", "disk.qed", "disk.qed"]);
    refused(dir, QED, &["io", "-c", "write 0 64k", "disk.qed"]);
    h.kill("TERM");
    // We read; QEMU reads beside us, and may not write.
    let mut h = Holder::start(
        dir,
        QED,
        &["serve", "-r", "-k", sock, "disk.qed"],
        "disk.qed",
        false,
    );
    ok(dir, QEMU_IMG, &["info", "disk.qed"]);
    ok(
        dir,
        QEMU_IO,
        &["-f", "qed", "-r", "-c", "read -P 0x11 0 64k", "disk.qed"],
    );
    refused(
        dir,
        QEMU_IO,
        &["-f", "qed", "-c", "write 0 64k", "disk.qed"],
    );
    h.kill("TERM");
}

#[test]
fn a_backing_file_in_use_is_not_written() {
    let d = new_dir();
    let dir = d.path();
    images(dir);
    let sock = dir.join("s.sock");
    let sock = sock.to_str().unwrap();
    // QEMU uses the overlay: the base may be read, not written.
    let mut h = Holder::qemu_io(dir, "ov.qed", false, "base.qed");
    // The overlay itself is QEMU's: no stream or commit of it here.
    refused(dir, QED, &["stream", "ov.qed"]);
    refused(dir, QED, &["commit", "ov.qed"]);
    refused(dir, QED, &["rebase", "-u", "-b", "", "ov.qed"]);
    ok(dir, QED, &["info", "base.qed"]);
    ok(
        dir,
        QED,
        &["io", "-r", "-c", "read -P 0x22 0 64k", "base.qed"],
    );
    refused(dir, QED, &["io", "-c", "write 0 64k", "base.qed"]);
    refused(dir, QED, &["serve", "-k", sock, "base.qed"]);
    refused(dir, QED, &["commit", "ov2.qed"]);
    refused(dir, QED, &["compact", "base.qed"]);
    h.kill("KILL");
    // We use the overlay (serving it, streaming into it): QEMU may read the base only.
    let ctl = dir.join("ctl.sock");
    let ctl = ctl.to_str().unwrap();
    let mut h = Holder::start(
        dir,
        QED,
        &["serve", "-k", sock, "--control", ctl, "ov.qed"],
        "base.qed",
        false,
    );
    ok(dir, QEMU_IMG, &["info", "base.qed"]);
    refused(
        dir,
        QEMU_IO,
        &["-f", "qed", "-c", "write 0 64k", "base.qed"],
    );
    refused(dir, QEMU_IMG, &["commit", "ov2.qed"]);
    // A stream copies the base in and drops it: its lock goes with it, while the
    // server goes on.
    ok(dir, QED, &["job", ctl, "stream", "--wait"]);
    wait_for("the stream to let go of the base", || {
        lock_bytes(&dir.join("base.qed")).is_empty()
    });
    ok(
        dir,
        QEMU_IO,
        &["-f", "qed", "-c", "write -P 0x44 0 64k", "base.qed"],
    );
    ok(
        dir,
        QEMU_IO,
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0x22 0 64k",
            &format!("nbd+unix:///?socket={sock}"),
        ],
    );
    h.kill("TERM");
    // An offline stream holds the base while it runs, then lets go.
    ok(
        dir,
        QED,
        &["create", "-q", "-b", "base.qed", "-F", "qed", "ov3.qed"],
    );
    let mut h = Holder::start(
        dir,
        QED,
        &["stream", "--rate", "64k", "ov3.qed"],
        "base.qed",
        false,
    );
    refused(
        dir,
        QEMU_IO,
        &["-f", "qed", "-c", "write 0 64k", "base.qed"],
    );
    refused(
        dir,
        QEMU_IO,
        &["-f", "qed", "-r", "-c", "read 0 64k", "ov3.qed"],
    );
    h.kill("KILL");
    // Nobody else uses the base now: commit writes into it while its own overlay
    // reads it.
    ok(dir, QED, &["commit", "ov2.qed"]);
    ok(
        dir,
        QEMU_IO,
        &["-f", "qed", "-r", "-c", "read -P 0x33 1M 64k", "base.qed"],
    );
}

#[test]
fn a_killed_holder_holds_nothing() {
    let d = new_dir();
    let dir = d.path();
    images(dir);
    let sock = dir.join("s.sock");
    let sock = sock.to_str().unwrap();
    for args in [
        vec!["serve", "-k", sock, "ov.qed"],
        vec!["io", "-c", "sleep 600000", "ov.qed"],
    ] {
        let mut h = Holder::start(dir, QED, &args, "ov.qed", true);
        refused(dir, QEMU_IO, &["-f", "qed", "-c", "write 0 64k", "ov.qed"]);
        h.kill("KILL");
        assert!(lock_bytes(&dir.join("ov.qed")).is_empty());
        assert!(lock_bytes(&dir.join("base.qed")).is_empty());
        ok(
            dir,
            QEMU_IO,
            &["-f", "qed", "-c", "write -P 0x55 0 64k", "ov.qed"],
        );
        let _ = std::fs::remove_file(dir.join("s.sock"));
    }
    let mut h = Holder::qemu_io(dir, "ov.qed", false, "ov.qed");
    refused(dir, QED, &["io", "-c", "write 0 64k", "ov.qed"]);
    h.kill("KILL");
    ok(dir, QED, &["io", "-c", "write -P 0x66 0 64k", "ov.qed"]);
    ok(dir, QED, &["check", "ov.qed"]);
}

#[test]
fn locks_are_qemus_bytes() {
    let d = new_dir();
    let dir = d.path();
    images(dir);
    let sock = dir.join("s.sock");
    let sock = sock.to_str().unwrap();
    let mut ours = Holder::start(dir, QED, &["serve", "-k", sock, "ov.qed"], "ov.qed", true);
    let (ov_ours, base_ours) = (
        lock_bytes(&dir.join("ov.qed")),
        lock_bytes(&dir.join("base.qed")),
    );
    ours.kill("TERM");
    let mut qemu = Holder::qemu_io(dir, "ov.qed", false, "ov.qed");
    let (ov_qemu, base_qemu) = (
        lock_bytes(&dir.join("ov.qed")),
        lock_bytes(&dir.join("base.qed")),
    );
    qemu.kill("TERM");
    assert_eq!(
        ov_ours, ov_qemu,
        "the writer's lock bytes differ from QEMU's"
    );
    assert_eq!(
        base_ours, base_qemu,
        "the backing file's lock bytes differ from QEMU's"
    );
    assert_eq!(ov_ours, [100, 101, 103, 201, 203]);
    assert_eq!(base_ours, [100, 201, 203]);
    let mut ours = Holder::start(
        dir,
        QED,
        &["io", "-r", "-U", "-c", "sleep 600000", "ov.qed"],
        "ov.qed",
        false,
    );
    assert_eq!(lock_bytes(&dir.join("ov.qed")), [100]);
    ours.kill("TERM");
}

#[test]
fn a_qcow2_images_backing_files_are_locked_too() {
    let d = new_dir();
    let dir = d.path();
    ok(dir, QEMU_IMG, &["create", "-q", "-f", "raw", "b.raw", "4M"]);
    ok(
        dir,
        QEMU_IO,
        &["-f", "raw", "-c", "write -P 0x77 0 1M", "b.raw"],
    );
    ok(
        dir,
        QEMU_IMG,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "m.qcow2",
        ],
    );
    ok(
        dir,
        QEMU_IMG,
        &[
            "create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "t.qcow2",
        ],
    );
    // Reading the qcow2 image reads its whole chain: nobody may write the files below.
    let mut h = Holder::start(
        dir,
        QED,
        &["io", "-r", "-c", "sleep 600000", "t.qcow2"],
        "b.raw",
        false,
    );
    assert_eq!(lock_bytes(&dir.join("m.qcow2")), [100, 201, 203]);
    refused(dir, QEMU_IO, &["-f", "raw", "-c", "write 0 64k", "b.raw"]);
    refused(
        dir,
        QEMU_IO,
        &["-f", "qcow2", "-c", "write 0 64k", "m.qcow2"],
    );
    h.kill("TERM");
    // A copy of the image into its own base is refused, not an emptied base.
    let before = digest(&dir.join("b.raw"));
    let out = fails(dir, QED, &["convert", "-O", "raw", "t.qcow2", "b.raw"]);
    assert!(
        out.contains("lock") || out.contains("backing chain"),
        "{out}"
    );
    assert_eq!(
        digest(&dir.join("b.raw")),
        before,
        "the base was overwritten"
    );
    ok(
        dir,
        QEMU_IO,
        &["-f", "raw", "-r", "-c", "read -P 0x77 0 1M", "b.raw"],
    );
}
