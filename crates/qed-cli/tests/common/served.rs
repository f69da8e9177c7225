//! `qed serve` run by a test: started on a Unix socket or an ephemeral TCP port, and
//! stopped by a signal with its exit checked. A server still running when its test ends
//! (a failed assertion, say) is killed, so that no test leaves one behind.

use super::{exited_within, spawn_server, Log, QED};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where a server listens.
pub enum Place {
    Tcp(u16),
    Unix(PathBuf),
}

/// A running `qed serve`; killed when dropped.
pub struct Served {
    child: Child,
    place: Place,
    /// The control socket, when the server has one.
    control: Option<PathBuf>,
    /// How long a clean stop may take.
    stop_limit: Duration,
    log: Log,
}

/// A number no other server of this test binary has had, for socket names.
fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Served {
    /// Starts `qed serve ARGS IMAGE` in `dir` on a fresh Unix socket (`unix`) or an
    /// ephemeral TCP port; returns once the server listens.
    pub fn start(dir: &Path, unix: bool, args: &[&str], image: &str) -> Served {
        Self::start_env(dir, unix, &[], args, image)
    }

    /// [`Served::start`] with `env` added to the server's environment.
    pub fn start_env(
        dir: &Path,
        unix: bool,
        env: &[(&str, &OsStr)],
        args: &[&str],
        image: &str,
    ) -> Served {
        let socket = dir.join(format!("nbd-{}.sock", unique()));
        let mut cmd = Command::new(QED);
        cmd.arg("serve").current_dir(dir);
        cmd.envs(env.iter().copied());
        if unix {
            cmd.arg("-k").arg(&socket);
        } else {
            // Port 0 lets the kernel pick a free port; the server prints which.
            cmd.args(["-p", "0"]);
        }
        cmd.args(args).arg(image);
        let (child, log, banner) = spawn_server(&mut cmd);
        let place = if unix {
            assert!(banner.contains("unix socket"), "banner: {banner}");
            Place::Unix(socket)
        } else {
            Place::Tcp(port_in(&banner))
        };
        Served {
            child,
            place,
            control: None,
            stop_limit: Duration::from_secs(30),
            log,
        }
    }

    /// `qed serve --vhost-user-blk SOCKET ARGS IMAGE` in `dir`; returns once it listens.
    pub fn vhost(dir: &Path, args: &[&str], image: &str) -> Served {
        Self::vhost_at(
            dir,
            &dir.join(format!("vhost-{}.sock", unique())),
            args,
            image,
        )
    }

    /// [`Served::vhost`] on the socket `socket`: where a frontend that lost its server
    /// reconnects.
    pub fn vhost_at(dir: &Path, socket: &Path, args: &[&str], image: &str) -> Served {
        let socket = socket.to_path_buf();
        let (child, log, banner) = spawn_server(
            Command::new(QED)
                .arg("serve")
                .arg("--vhost-user-blk")
                .arg(&socket)
                .args(args)
                .arg(image)
                .current_dir(dir),
        );
        let served = Served {
            child,
            place: Place::Unix(socket),
            control: None,
            stop_limit: Duration::from_secs(30),
            log,
        };
        // An image a killed server left is checked first, and says so first.
        if !banner.contains("vhost-user-blk") {
            served.wait_log("vhost-user-blk", 1);
        }
        served
    }

    /// [`Served::start`] on a Unix socket.
    pub fn unix(dir: &Path, args: &[&str], image: &str) -> Served {
        Self::start(dir, true, args, image)
    }

    /// `qed serve -k nbd.sock --control ctl.sock -t ARGS IMAGE` in `dir`; returns once
    /// both sockets listen. Its stop also asserts that neither socket is left behind,
    /// and may take longer: a job it runs is cancelled first.
    pub fn with_control(dir: &Path, args: &[&str], image: &str) -> Served {
        let nbd = dir.join("nbd.sock");
        let control = dir.join("ctl.sock");
        let (child, log, banner) = spawn_server(
            Command::new(QED)
                .arg("serve")
                .arg("-k")
                .arg(&nbd)
                .arg("--control")
                .arg(&control)
                .arg("-t")
                .args(args)
                .arg(image)
                .current_dir(dir),
        );
        assert!(banner.contains("control socket"), "banner: {banner}");
        Served {
            child,
            place: Place::Unix(nbd),
            control: Some(control),
            stop_limit: Duration::from_secs(60),
            log,
        }
    }

    /// The export's NBD URI.
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// The NBD URI of the export named `export`.
    pub fn uri_for(&self, export: &str) -> String {
        match &self.place {
            Place::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
            Place::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }

    pub fn place(&self) -> &Place {
        &self.place
    }

    pub fn port(&self) -> u16 {
        match self.place {
            Place::Tcp(p) => p,
            Place::Unix(_) => panic!("not a TCP server"),
        }
    }

    pub fn socket(&self) -> &Path {
        match &self.place {
            Place::Unix(path) => path,
            Place::Tcp(_) => panic!("not a Unix socket server"),
        }
    }

    /// The control socket's path.
    pub fn control(&self) -> &Path {
        self.control
            .as_ref()
            .expect("a server with a control socket")
    }

    /// The control socket's path, as `qed job` takes it.
    pub fn ctl(&self) -> &str {
        self.control().to_str().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server has printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends signal `sig` (a name such as TERM) to the server.
    pub fn signal(&self, sig: &str) {
        super::signal(self.pid(), sig);
    }

    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("qed serve died ({st}):\n{}", self.log());
        }
    }

    /// Waits until the log has `n` lines containing `what`.
    pub fn wait_log(&self, what: &str, n: usize) {
        let t = Instant::now();
        while self.log().matches(what).count() < n {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "expected {n} log lines with {what:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's exit status, once it exits within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        exited_within(&mut self.child, limit)
            .unwrap_or_else(|| panic!("qed serve did not exit within {limit:?}:\n{}", self.log()))
    }

    /// SIGKILL, as a crash would end the server; returns its exit status.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("kill qed serve");
        self.child.wait().expect("wait for qed serve")
    }

    /// Asserts that the server exits cleanly by itself (a server without `-t` stops once
    /// its last client has gone); returns what it printed.
    pub fn finish(mut self) -> String {
        self.assert_clean_exit();
        self.log()
    }

    /// SIGTERM, then a clean exit; returns what the server printed.
    pub fn stop(self) -> String {
        self.stop_with("TERM")
    }

    /// Signal `sig`, then a clean exit; returns what the server printed.
    pub fn stop_with(mut self, sig: &str) -> String {
        self.signal(sig);
        self.assert_clean_exit();
        self.log()
    }

    fn assert_clean_exit(&mut self) {
        let st = self.wait_exit(self.stop_limit);
        assert!(st.success(), "qed serve exited with {st}:\n{}", self.log());
        if let Some(control) = &self.control {
            assert!(!control.exists(), "the control socket is left behind");
            assert!(!self.socket().exists(), "the NBD socket is left behind");
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The TCP port a server's banner names (`... on 127.0.0.1:PORT ...`).
fn port_in(banner: &str) -> u16 {
    let at = banner.rfind(" on ").expect("banner names the address");
    let rest = &banner[at + 4..];
    let addr = rest.split([' ', ',']).next().unwrap();
    addr.rsplit(':').next().unwrap().parse().expect("a port")
}
