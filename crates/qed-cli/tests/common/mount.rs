//! `qed mount` run by a test: the FUSE mount it makes, found in the mount table, and
//! detached however the test ends.

use super::{describe, run, QED};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const FUSERMOUNT: &str = "fusermount3";

/// An empty regular file to mount on.
pub fn touch(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b"").expect("create the mountpoint");
    p
}

/// Whether something is mounted on `path`, by the mount table.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("read the mount table");
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Unmounts `path` (retrying while a closing client still holds it), failing after a
/// bounded wait.
pub fn unmount(path: &Path) {
    let t = Instant::now();
    loop {
        let out = run(
            Path::new("/"),
            FUSERMOUNT,
            &[OsStr::new("-u"), path.as_os_str()],
        );
        if out.status.success() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            describe(FUSERMOUNT, &[OsStr::new("-u"), path.as_os_str()], &out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Detaches whatever is still mounted on its path when dropped.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new(FUSERMOUNT)
                .args([OsStr::new("-u"), OsStr::new("-z"), self.0.as_os_str()])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// A running `qed mount`: killed and unmounted when dropped.
pub struct Mounted {
    child: Child,
    /// Where the disk can be opened (the mountpoint, or the file in it).
    pub disk: PathBuf,
    log: Arc<Mutex<String>>,
    _guard: MountGuard,
}

impl Mounted {
    /// Starts `qed mount ARGS IMAGE MOUNTPOINT` in `dir`; returns once the banner says
    /// the disk is mounted and the mount table shows it.
    pub fn start(dir: &Path, args: &[&str], image: &str, mountpoint: &Path) -> Mounted {
        let mut child = Command::new(QED)
            .arg("mount")
            .args(args)
            .arg(image)
            .arg(mountpoint)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qed mount");
        let guard = MountGuard(mountpoint.to_path_buf());
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let banner = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "qed mount {args:?} {image} did not mount ({status:?}):\n{}",
                    log.lock().unwrap()
                );
            }
        };
        let at = banner
            .find(" mounted on ")
            .expect("the banner names the place");
        let disk = PathBuf::from(banner[at + 12..].trim_end_matches(" (read-only)"));
        super::wait_for(
            Duration::from_secs(10),
            "the mount table shows the mount",
            || is_mounted(mountpoint),
        );
        Mounted {
            child,
            disk,
            log,
            _guard: guard,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        super::signal(self.pid(), sig);
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        super::exited_within(&mut self.child, limit).unwrap_or_else(|| {
            panic!(
                "qed mount did not exit within {limit:?}:\n{}",
                self.log.lock().unwrap()
            )
        })
    }

    /// `fusermount3 -u`, then asserts a clean exit.
    pub fn unmount(mut self, mountpoint: &Path) {
        unmount(mountpoint);
        let st = self.wait_exit(Duration::from_secs(30));
        assert!(
            st.success(),
            "qed mount exited with {st}:\n{}",
            self.log.lock().unwrap()
        );
        assert!(!is_mounted(mountpoint));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
