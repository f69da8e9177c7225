//! An nginx started by a test: unprivileged, on a free loopback port, with a config and
//! every file it writes in its own directory, and an access log that says how many body
//! bytes each request was sent.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// An nginx serving [`Nginx::root`]; stopped when dropped.
pub struct Nginx {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// The first segment of every URL: a port reused by a later server must not give
    /// its files the URLs (and, written in the same second with the same size, the
    /// ETags) of an earlier server's, which the host cache would take for the same.
    prefix: String,
    /// Directives added to the server block (such as a rate limit).
    extra: String,
}

impl Nginx {
    /// Starts nginx on a free port, serving an empty directory.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// [`Nginx::start`], with `extra` directives in the server block (`limit_rate 4m;`).
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let prefix = format!("s{:x}{:x}", nanos, std::process::id());
        let mut nginx = Self {
            dir,
            port,
            child: None,
            prefix,
            extra: extra.to_string(),
        };
        nginx.restart();
        nginx
    }

    /// Starts nginx again (after [`Nginx::stop`]) on the same port and files.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "nginx is running");
        let d = self.dir.path().display();
        let port = self.port;
        let conf = format!(
            "daemon off;\nmaster_process off;\nerror_log stderr;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               log_format sent '$uri $status $body_bytes_sent';\n\
               access_log {d}/access.log sent;\n\
               client_body_temp_path {d}/client_body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               server {{ listen 127.0.0.1:{port}; location /{prefix}/ {{ alias {d}/www/; }} {extra} }}\n\
             }}\n",
            prefix = self.prefix,
            extra = self.extra
        );
        let conf_path = self.dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new("nginx")
            .arg("-e")
            .arg("stderr")
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run nginx: {e} (these tests need it: apt-get install nginx-light)")
            });
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nginx exited at start: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Kills nginx: connections drop, new ones are refused.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The directory nginx serves.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    /// The address nginx listens on, `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The path part of `name`'s URL (`/PREFIX/name`), for a URL through a proxy.
    pub fn path(&self, name: &str) -> String {
        format!("/{}/{name}", self.prefix)
    }

    /// The URL of `name` under the root.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{}/{name}", self.port, self.prefix)
    }

    /// [`Nginx::bytes_sent`] once nginx has logged what it was serving: it writes a
    /// request's line after the response has left, so a client can be done first.
    pub fn settled_bytes_sent(&self, name: &str) -> u64 {
        let mut last = self.bytes_sent(name);
        for _ in 0..40 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = self.bytes_sent(name);
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    /// Body bytes sent for `name` so far, from the access log.
    pub fn bytes_sent(&self, name: &str) -> u64 {
        let log = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let want = format!("/{}/{name}", self.prefix);
        log.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let (uri, _status, sent) = (f.next()?, f.next()?, f.next()?);
                (uri == want).then(|| sent.parse::<u64>().ok()).flatten()
            })
            .sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
