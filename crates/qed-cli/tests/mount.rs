//! `qed mount` against real tools on the mounted file: mkfs.ext4, e2fsck, fio, cp,
//! qemu-img and qemu-io, plus the shipped binary's signals, daemon mode and refusals.
//!
//! Every mount runs as a child process of the test (or, with `-d`, as the daemon it
//! leaves), so what is tested is the binary: its exit status and what it leaves in the
//! image. Each mount is undone when its guard drops (`fusermount3 -u -z`), so a failing
//! test leaves nothing mounted. A missing tool fails these tests instead of skipping
//! them: skipping would let a machine without FUSE report the suite as passing.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::fio::{file_engine, Verified};
use common::mount::{is_mounted, touch, unmount, MountGuard, Mounted};
use common::qemu::{qemu_img_check, qemu_io};
use common::{create_qed, fails, need_check, new_dir, ok, Killed, FIO, QED, QEMU_IMG};

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Running tools.

/// The image is consistent by both checkers and not marked in use.
fn assert_clean(dir: &Path, image: &str) {
    qemu_img_check(dir, image);
    ok(dir, QED, &["check", image]);
    assert!(!need_check(&dir.join(image)), "{image}: NEED_CHECK is set");
}

/// 512-byte blocks a file takes.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks()
}

// ---------------------------------------------------------------------------------------
// 1. A filesystem on the mounted disk.

#[test]
fn mkfs_and_e2fsck_on_the_mount_and_a_copy_through_it() {
    for cache in ["writeback", "none"] {
        let tmp = new_dir();
        let dir = tmp.path();
        create_qed(dir, "img.qed", "256M");
        let mnt = touch(dir, "disk");
        let m = Mounted::start(dir, &[&format!("--cache={cache}")], "img.qed", &mnt);
        assert_eq!(m.disk, mnt.canonicalize().unwrap());
        assert_eq!(std::fs::metadata(&mnt).unwrap().len(), 256 * M);

        let disk = mnt.to_str().unwrap();
        ok(dir, "mkfs.ext4", &["-F", "-q", disk]);
        let out = ok(dir, "e2fsck", &["-fn", disk]);
        assert!(!out.contains("UNEXPECTED"), "{out}");
        // A copy of the disk as the mount shows it, taken while it is mounted.
        ok(
            dir,
            "dd",
            &[&format!("if={disk}"), "of=copy.raw", "bs=1M", "status=none"],
        );
        m.unmount(&mnt);

        let out = ok(
            dir,
            QEMU_IMG,
            &["compare", "-f", "qed", "-F", "raw", "img.qed", "copy.raw"],
        );
        assert!(out.contains("Images are identical"), "{out}");
        assert_clean(dir, "img.qed");
    }
}

// ---------------------------------------------------------------------------------------
// 2. fio with verification.

#[test]
fn fio_verifies_random_writes_at_depth_32() {
    for cache in ["none", "writeback"] {
        let tmp = new_dir();
        let dir = tmp.path();
        create_qed(dir, "img.qed", "64M");
        let mnt = touch(dir, "disk");
        let cache = format!("--cache={cache}");
        let fio = |disk: &Path, verify_only: bool| {
            let run = Verified {
                name: "fuse",
                engine: file_engine(disk),
                jobs: 2,
                region: 16 * M,
                iodepth: 32,
            };
            run.run(dir, verify_only);
        };

        let m = Mounted::start(dir, &[&cache], "img.qed", &mnt);
        fio(&m.disk, false);
        // Unaligned requests next to what fio wrote, through the mount.
        let disk = m.disk.to_str().unwrap().to_string();
        qemu_io(
            dir,
            "raw",
            &disk,
            false,
            &["write -P 0x77 33M 1000", "write -P 0x78 36863k 7k"],
        );
        m.unmount(&mnt);
        assert_clean(dir, "img.qed");

        // What fio wrote survives a new mount, and reads the same in the image.
        let m = Mounted::start(dir, &[&cache], "img.qed", &mnt);
        fio(&m.disk, true);
        qemu_io(
            dir,
            "raw",
            &disk,
            false,
            &["read -P 0x77 33M 1000", "read -P 0x78 36863k 7k"],
        );
        m.unmount(&mnt);
        qemu_io(
            dir,
            "qed",
            "img.qed",
            false,
            &["read -P 0x77 33M 1000", "read -P 0x78 36863k 7k"],
        );
        assert_clean(dir, "img.qed");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Holes: lseek, sparse copies.

/// `lseek(fd, offset, whence)`: the offset found, or the errno.
fn seek(f: &std::fs::File, offset: u64, whence: i32) -> Result<u64, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor we hold open.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

#[test]
fn holes_show_through_lseek_and_copies_stay_sparse() {
    let tmp = new_dir();
    let dir = tmp.path();
    // A raw backing file with data at 2M, and the image over it with data of its own:
    // the chain decides what is a hole. (qemu-img would allocate the raw file's first
    // block; truncate leaves all of it a hole.)
    ok(dir, "truncate", &["-s", "1G", "base.raw"]);
    qemu_io(dir, "raw", "base.raw", false, &["write -P 0x11 2M 64k"]);
    ok(
        dir,
        QED,
        &[
            "create", "-q", "-b", "base.raw", "-F", "raw", "img.qed", "1G",
        ],
    );
    qemu_io(
        dir,
        "qed",
        "img.qed",
        false,
        &[
            "write -P 0x22 5M 64k",
            "write -P 0x33 300M 128k",
            "write -P 0x44 700M 4k",
        ],
    );
    let mnt = touch(dir, "disk");
    let m = Mounted::start(dir, &["-r"], "img.qed", &mnt);
    let f = std::fs::File::open(&m.disk).unwrap();
    let data = libc::SEEK_DATA;
    let hole = libc::SEEK_HOLE;
    assert_eq!(seek(&f, 0, data), Ok(2 * M), "the backing file's data");
    assert_eq!(seek(&f, 0, hole), Ok(0));
    assert_eq!(seek(&f, 2 * M, hole), Ok(2 * M + 64 * K));
    assert_eq!(
        seek(&f, 2 * M + 64 * K, data),
        Ok(5 * M),
        "the image's own data"
    );
    assert_eq!(seek(&f, 5 * M, hole), Ok(5 * M + 64 * K));
    assert_eq!(seek(&f, 6 * M, data), Ok(300 * M));
    assert_eq!(seek(&f, 300 * M + 5, data), Ok(300 * M + 5));
    assert_eq!(seek(&f, 300 * M, hole), Ok(300 * M + 128 * K));
    // A 4k write allocates its whole 64k cluster.
    assert_eq!(seek(&f, 301 * M, data), Ok(700 * M));
    assert_eq!(seek(&f, 700 * M, hole), Ok(700 * M + 64 * K));
    assert_eq!(seek(&f, 700 * M + 64 * K, data), Err(libc::ENXIO));
    assert_eq!(seek(&f, 1000 * M, hole), Ok(1000 * M));
    assert_eq!(seek(&f, 1024 * M, hole), Err(libc::ENXIO));
    drop(f);

    // Copies that follow the holes take about as much space as the data.
    let disk = m.disk.to_str().unwrap();
    ok(dir, "cp", &["--sparse=always", disk, "cp.raw"]);
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "raw", "-O", "raw", disk, "convert.raw"],
    );
    m.unmount(&mnt);
    for copy in ["cp.raw", "convert.raw"] {
        let path = dir.join(copy);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024 * M);
        // 64k + 64k + 128k + 4k of data: well under a megabyte with the filesystem's
        // own blocks.
        let bytes = allocated(&path) * 512;
        assert!(bytes < 2 * M, "{copy} takes {bytes} bytes");
        let out = ok(
            dir,
            QEMU_IMG,
            &["compare", "-f", "raw", "-F", "qed", copy, "img.qed"],
        );
        assert!(out.contains("Images are identical"), "{copy}: {out}");
    }
}

#[test]
fn punched_holes_and_zero_ranges_read_as_zeros() {
    for discard in ["ignore", "unmap"] {
        let tmp = new_dir();
        let dir = tmp.path();
        create_qed(dir, "img.qed", "16M");
        qemu_io(dir, "qed", "img.qed", false, &["write -P 0x55 0 16M"]);
        let mnt = touch(dir, "disk");
        let m = Mounted::start(dir, &[&format!("--discard={discard}")], "img.qed", &mnt);
        let disk = m.disk.to_str().unwrap().to_string();
        // Partial clusters at both ends, whole ones between.
        ok(
            dir,
            "fallocate",
            &["-p", "-o", "1000", "-l", "300000", &disk],
        );
        ok(dir, "fallocate", &["-z", "-o", "4M", "-l", "1M", &disk]);
        // Neither grows the disk, and allocation without a range to zero is refused.
        fails(dir, "fallocate", &["-z", "-o", "16M", "-l", "1M", &disk]);
        fails(dir, "fallocate", &["-o", "0", "-l", "1M", &disk]);
        assert_eq!(std::fs::metadata(&m.disk).unwrap().len(), 16 * M);
        m.unmount(&mnt);
        qemu_io(
            dir,
            "qed",
            "img.qed",
            false,
            &[
                "read -P 0x55 0 1000",
                "read -P 0 1000 300000",
                "read -P 0x55 301000 3893304",
                "read -P 0 4M 1M",
                "read -P 0x55 5M 11M",
            ],
        );
        assert_clean(dir, "img.qed");
    }
}

#[test]
fn control_socket_compacts_what_punches_freed() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "32M");
    qemu_io(dir, "qed", "img.qed", false, &["write -P 0x66 0 32M"]);
    let full = std::fs::metadata(dir.join("img.qed")).unwrap().len();
    let mnt = touch(dir, "disk");
    let ctl = dir.join("ctl.sock");
    let m = Mounted::start(
        dir,
        &["--discard=unmap", "--control", ctl.to_str().unwrap()],
        "img.qed",
        &mnt,
    );
    let disk = m.disk.to_str().unwrap().to_string();
    ok(dir, "fallocate", &["-p", "-o", "0", "-l", "16M", &disk]);
    let id = ok(
        dir,
        QED,
        &["job", ctl.to_str().unwrap(), "compact", "--wait"],
    );
    assert_eq!(id.trim(), "compact0");
    // While mounted, the file is already down to the half that holds data.
    let compacted = std::fs::metadata(dir.join("img.qed")).unwrap().len();
    assert!(compacted <= full - 16 * M, "{full} -> {compacted}");
    // The punched half reads as zeros through the mount.
    ok(dir, "cmp", &["-n", "16777216", &disk, "/dev/zero"]);
    m.unmount(&mnt);
    assert!(!ctl.exists(), "the control socket is left behind");
    qemu_io(
        dir,
        "qed",
        "img.qed",
        true,
        &["read -P 0 0 16M", "read -P 0x66 16M 16M"],
    );
    assert_clean(dir, "img.qed");
}

// ---------------------------------------------------------------------------------------
// 4. Read-only.

#[test]
fn read_only_mount_refuses_writes() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "16M");
    qemu_io(dir, "qed", "img.qed", false, &["write -P 0x66 1M 64k"]);
    let before = std::fs::read(dir.join("img.qed")).unwrap();
    let mnt = touch(dir, "disk");
    let m = Mounted::start(dir, &["-r"], "img.qed", &mnt);

    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&m.disk)
        .expect_err("opening the read-only disk for writing");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM)),
        "{e}"
    );
    let disk = m.disk.to_str().unwrap().to_string();
    let out = fails(
        dir,
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={disk}"),
            "bs=4k",
            "count=1",
            "conv=notrunc",
        ],
    );
    assert!(out.contains("Read-only file system"), "{out}");
    fails(dir, "truncate", &["-s", "0", &disk]);
    // Reads still work.
    qemu_io(
        dir,
        "raw",
        &disk,
        true,
        &["read -P 0x66 1M 64k", "read -P 0 0 1M"],
    );
    m.unmount(&mnt);
    assert_eq!(
        std::fs::read(dir.join("img.qed")).unwrap(),
        before,
        "a read-only mount changed the image"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Signals with requests in flight.

#[test]
fn signals_leave_a_clean_image_with_requests_in_flight() {
    for sig in ["TERM", "INT"] {
        let tmp = new_dir();
        let dir = tmp.path();
        create_qed(dir, "img.qed", "128M");
        let mnt = touch(dir, "disk");
        let pid_file = dir.join("mount.pid");
        let mut m = Mounted::start(
            dir,
            &["--cache=none", "--pid-file", pid_file.to_str().unwrap()],
            "img.qed",
            &mnt,
        );
        let written = std::fs::read_to_string(&pid_file).expect("the pid file exists");
        assert_eq!(written.trim(), m.pid().to_string());

        // fio keeps a queue of 32 in flight on the first 32M...
        let mut fio = Killed(
            Command::new(FIO)
                .args([
                    "--name=load",
                    &format!("--filename={}", m.disk.display()),
                    "--ioengine=libaio",
                    "--direct=1",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--size=32M",
                    "--iodepth=32",
                    "--time_based",
                    "--runtime=60",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run fio (apt-get install fio)"),
        );
        // ...while writers record which of their writes past 64M were acknowledged.
        const LEN: usize = 256 * K as usize;
        let pattern = |i: u64| (i % 250) as u8 + 1;
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let disk = m.disk.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
                    let mut acked = Vec::new();
                    // 256 slots of 256k fill 64M..128M, each written once.
                    for i in (w..256).step_by(4) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let at = 64 * M + i * LEN as u64;
                        if f.write_all_at(&vec![pattern(i); LEN], at).is_err() {
                            break;
                        }
                        acked.push(i);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    acked
                })
            })
            .collect();
        // Signal once data is being allocated (the image is marked in use), with both
        // loads still running.
        common::wait_for(
            Duration::from_secs(20),
            "NEED_CHECK set by the writes",
            || need_check(&dir.join("img.qed")),
        );
        // fio takes a moment to start; both must still be writing when the signal lands.
        std::thread::sleep(Duration::from_millis(500));
        assert!(fio.0.try_wait().unwrap().is_none(), "fio ended early");
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "the writers ended early"
        );
        m.signal(sig);
        let signalled = Instant::now();
        let st = m.wait_exit(Duration::from_secs(30));
        stop.store(true, Ordering::Relaxed);
        assert!(st.success(), "SIG{sig}: qed mount exited with {st}");
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "SIG{sig}: exit took {:?}",
            signalled.elapsed()
        );
        // fio would go on with the plain file the mount leaves when it reopens its file.
        drop(fio);
        let acked: Vec<u64> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        assert!(!acked.is_empty(), "SIG{sig}: no write was acknowledged");
        assert!(!pid_file.exists(), "SIG{sig}: the pid file is left behind");
        common::wait_for(Duration::from_secs(10), "the mount gone", || {
            !is_mounted(&mnt)
        });

        assert_clean(dir, "img.qed");
        let cmds: Vec<String> = acked
            .iter()
            .map(|&i| format!("read -P {} {} {LEN}", pattern(i), 64 * M + i * LEN as u64))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(dir, "qed", "img.qed", false, &cmds);
    }
}

// ---------------------------------------------------------------------------------------
// 6. Refused mountpoints.

#[test]
fn refused_mountpoints_leave_the_image_untouched() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "16M");
    qemu_io(dir, "qed", "img.qed", false, &["write -P 0x12 0 64k"]);
    create_qed(dir, "other.qed", "16M");
    let image = dir.join("img.qed");
    let before = std::fs::read(&image).unwrap();
    let mtime = std::fs::metadata(&image).unwrap().modified().unwrap();

    let refuse = |mountpoint: &str, expect: &str| {
        let out = fails(dir, QED, &["mount", "img.qed", mountpoint]);
        assert!(
            out.contains(mountpoint) && out.contains(expect),
            "mount on {mountpoint}: {out}"
        );
    };
    refuse("missing", "does not exist");
    ok(dir, "mkfifo", &["fifo"]);
    refuse("fifo", "is a fifo");
    let _socket = std::os::unix::net::UnixListener::bind(dir.join("socket")).unwrap();
    refuse("socket", "is a socket");
    refuse("img.qed", "is the image itself");

    // Busy: another image is mounted there already.
    let mnt = touch(dir, "disk");
    let m = Mounted::start(dir, &[], "other.qed", &mnt);
    refuse("disk", "already a mount point");
    m.unmount(&mnt);

    // No /dev/fuse: a mount namespace of its own, with an empty /dev.
    let out = fails(
        dir,
        "unshare",
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!("mount -t tmpfs none /dev && exec {QED} mount img.qed disk"),
        ],
    );
    assert!(out.contains("/dev/fuse does not exist"), "{out}");

    assert_eq!(std::fs::read(&image).unwrap(), before, "the image changed");
    assert_eq!(
        std::fs::metadata(&image).unwrap().modified().unwrap(),
        mtime
    );
    assert!(!need_check(&image));
}

// ---------------------------------------------------------------------------------------
// 7. A directory mountpoint.

#[test]
fn directory_mountpoint_shows_the_disk_by_the_image_name() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "disk.qed", "24M");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mounted::start(dir, &[], "disk.qed", &mnt);
    assert_eq!(m.disk, mnt.canonicalize().unwrap().join("disk.qed"));

    let names: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["disk.qed"]);
    let meta = std::fs::metadata(mnt.join("disk.qed")).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), 24 * M);
    assert!(std::fs::metadata(mnt.join("other")).is_err());
    // The directory holds the disk and nothing else.
    assert!(std::fs::write(mnt.join("other"), b"x").is_err());
    assert!(std::fs::remove_file(mnt.join("disk.qed")).is_err());

    let disk = mnt.join("disk.qed");
    qemu_io(
        dir,
        "raw",
        disk.to_str().unwrap(),
        false,
        &["write -P 0x3c 1M 100k"],
    );
    m.unmount(&mnt);
    qemu_io(dir, "qed", "disk.qed", false, &["read -P 0x3c 1M 100k"]);
    assert_clean(dir, "disk.qed");
}

// ---------------------------------------------------------------------------------------
// 8. The daemon.

#[test]
fn daemon_returns_once_mounted_and_ends_at_unmount() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "16M");
    let mnt = touch(dir, "disk");
    let _guard = MountGuard(mnt.clone());
    let pid_file = dir.join("mount.pid");
    let started = Instant::now();
    // The caller's pipes must close when it returns, or this would wait for the daemon.
    let out = ok(
        dir,
        QED,
        &[
            "mount",
            "-d",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "img.qed",
            "disk",
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(out.contains("mounted on"), "{out}");
    // Mounted by the time it returned.
    assert!(is_mounted(&mnt));
    assert_eq!(std::fs::metadata(&mnt).unwrap().len(), 16 * M);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the pid file exists")
        .trim()
        .parse()
        .expect("a pid");
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists() && !zombie(pid);
    assert!(alive(pid), "the daemon is not running");

    qemu_io(
        dir,
        "raw",
        mnt.to_str().unwrap(),
        false,
        &["write -P 0x5d 2M 1M"],
    );
    unmount(&mnt);
    common::wait_for(Duration::from_secs(30), "the daemon ends", || !alive(pid));
    assert!(!pid_file.exists(), "the pid file is left behind");
    qemu_io(dir, "qed", "img.qed", false, &["read -P 0x5d 2M 1M"]);
    assert_clean(dir, "img.qed");
}

/// Whether `pid` has exited and waits for its parent to reap it.
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}
