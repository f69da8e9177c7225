//! S3 servers the tests start on loopback ports (s3s-fs, and moto's server), found where
//! `tests/run` installs them; objects go in and out through each server's S3 API with
//! signed requests, as any client would, and `qed` is pointed at the server through the
//! environment.

use super::{describe, install_hint, QED};
use rusty_s3::actions::S3Action;
use rusty_s3::{Bucket, Credentials, UrlStyle};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const ACCESS_KEY: &str = "AKIAQEDTESTKEY000001";
pub const SECRET_KEY: &str = "qedTestSecretKey/0123456789abcdefghijklm";
pub const REGION: &str = "us-east-1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    S3sFs,
    Moto,
}

/// A client that hands back every status (the tests judge them) and gives up after a
/// minute.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// An S3 server on a free loopback port, stopped when dropped.
pub struct S3Server {
    kind: Kind,
    port: u16,
    child: Child,
    /// Its data and log.
    dir: TempDir,
}

/// Where `tests/run` installs a tool when it is not on PATH.
pub fn tool(name: &str) -> PathBuf {
    let candidates = match name {
        "s3s-fs" => {
            let cargo_home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
            vec![cargo_home.map(|c| c.join("bin/s3s-fs"))]
        }
        "moto_server" => vec![Some(
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto/bin/moto_server"),
        )],
        _ => vec![],
    };
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    on_path
        .into_iter()
        .chain(candidates.into_iter().flatten())
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("cannot find {name}{}", install_hint(name)))
}

impl S3Server {
    pub fn start(kind: Kind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = match kind {
            Kind::S3sFs => {
                let root = dir.path().join("root");
                std::fs::create_dir(&root).unwrap();
                let mut c = Command::new(tool("s3s-fs"));
                c.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(&root);
                c
            }
            Kind::Moto => {
                let mut c = Command::new(tool("moto_server"));
                c.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                c
            }
        };
        let child = cmd
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {kind:?}: {e}"));
        let mut server = Self {
            kind,
            port,
            child,
            dir,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{kind:?} exited at start ({status}):\n{}", server.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{kind:?} did not listen:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bucket(&self, name: &str) -> Bucket {
        Bucket::new(
            self.endpoint().parse().unwrap(),
            UrlStyle::Path,
            name.to_string(),
            REGION,
        )
        .unwrap()
    }

    /// Sends a presigned request; asserts a 2xx; returns the body.
    pub fn send(&self, method: &str, url: &str, body: &[u8]) -> Vec<u8> {
        let agent = agent();
        let resp = match method {
            "PUT" => agent.put(url).send(body),
            _ => agent.get(url).call(),
        }
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        // Whole images come back this way: more than ureq's default limit.
        let body = resp
            .into_body()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap();
        assert!(
            (200..300).contains(&status),
            "{:?}: {method} {url}: {status}: {}",
            self.kind,
            String::from_utf8_lossy(&body)
        );
        body
    }

    pub fn create_bucket(&self, name: &str) {
        let creds = Credentials::new(ACCESS_KEY, SECRET_KEY);
        let bucket = self.bucket(name);
        let url = bucket.create_bucket(&creds).sign(Duration::from_secs(600));
        self.send("PUT", url.as_str(), b"");
    }

    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        let creds = Credentials::new(ACCESS_KEY, SECRET_KEY);
        let bucket = self.bucket(bucket);
        let url = bucket
            .put_object(Some(&creds), key)
            .sign(Duration::from_secs(600));
        self.send("PUT", url.as_str(), data);
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let creds = Credentials::new(ACCESS_KEY, SECRET_KEY);
        let bucket = self.bucket(bucket);
        let url = bucket
            .get_object(Some(&creds), key)
            .sign(Duration::from_secs(600));
        self.send("GET", url.as_str(), b"")
    }

    /// The ETag the server gives the object now.
    pub fn etag(&self, bucket: &str, key: &str) -> String {
        let creds = Credentials::new(ACCESS_KEY, SECRET_KEY);
        let bucket = self.bucket(bucket);
        let url = bucket
            .get_object(Some(&creds), key)
            .sign(Duration::from_secs(600));
        let agent = agent();
        let resp = agent
            .get(url.as_str())
            .header("Range", "bytes=0-0")
            .call()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 206, "{:?}", self.kind);
        resp.headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{:?} gave no ETag", self.kind))
            .to_string()
    }

    /// The CRC32 checksum the server keeps for the object (`x-amz-checksum-crc32`, asked
    /// for with `x-amz-checksum-mode: ENABLED`), if it keeps one.
    pub fn checksum_crc32(&self, bucket: &str, key: &str) -> Option<String> {
        let creds = Credentials::new(ACCESS_KEY, SECRET_KEY);
        let bucket = self.bucket(bucket);
        let mut action = bucket.head_object(Some(&creds), key);
        action
            .headers_mut()
            .insert("x-amz-checksum-mode", "ENABLED");
        let url = action.sign(Duration::from_secs(600));
        let agent = agent();
        let resp = agent
            .head(url.as_str())
            .header("x-amz-checksum-mode", "ENABLED")
            .call()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{:?}", self.kind);
        resp.headers()
            .get("x-amz-checksum-crc32")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The HTTP status a signed GET of the object gets (404 when there is none).
    pub fn get_status(&self, bucket: &str, key: &str) -> u16 {
        let creds = Credentials::new(ACCESS_KEY, SECRET_KEY);
        let bucket = self.bucket(bucket);
        let url = bucket
            .get_object(Some(&creds), key)
            .sign(Duration::from_secs(600));
        let agent = agent();
        let resp = agent.get(url.as_str()).call().unwrap();
        resp.status().as_u16()
    }

    /// The ids of the multipart uploads in progress in `bucket`. moto answers
    /// ListMultipartUploads (and checks no signature); s3s-fs has no such call, and
    /// keeps each upload as files in its root: `.upload-ID.json`, and a
    /// `.upload_id-ID.part-N` for each part.
    pub fn uploads_in_progress(&self, bucket: &str) -> Vec<String> {
        let mut ids = match self.kind {
            Kind::Moto => {
                let url = format!("{}/{bucket}?uploads", self.endpoint());
                let body = String::from_utf8(self.send("GET", &url, b"")).unwrap();
                body.split("<UploadId>")
                    .skip(1)
                    .map(|s| s.split("</UploadId>").next().unwrap().to_string())
                    .collect()
            }
            Kind::S3sFs => std::fs::read_dir(self.dir.path().join("root"))
                .unwrap()
                .filter_map(|e| {
                    let name = e.unwrap().file_name().into_string().unwrap();
                    let id = name
                        .strip_prefix(".upload_id-")
                        .or_else(|| name.strip_prefix(".upload-"))?;
                    Some(id.split('.').next().unwrap().to_string())
                })
                .collect::<Vec<_>>(),
        };
        ids.sort();
        ids.dedup();
        ids
    }

    /// Kills the server, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `qed ARGS` in `dir`, pointed at this server with good credentials, except as
    /// `env` says (a value of `None` unsets the variable).
    pub fn qed_command(&self, dir: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> Command {
        let mut cmd = Command::new(QED);
        cmd.args(args).current_dir(dir).stdin(Stdio::null());
        // Only this server: nothing from the caller's environment may send a request
        // anywhere else.
        for var in [
            "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("AWS_ENDPOINT_URL_S3", self.endpoint())
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }

    pub fn qed(&self, dir: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
        self.qed_command(dir, args, env).output().unwrap()
    }

    /// `qed ARGS`, which must succeed; its stdout.
    pub fn qed_ok(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.qed(dir, args, &[]);
        assert!(
            out.status.success(),
            "{:?}: {}",
            self.kind,
            describe(QED, args, &out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `qed ARGS` with `env`, which must fail; its stderr.
    pub fn qed_fails(&self, dir: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> String {
        let out = self.qed(dir, args, env);
        assert!(
            !out.status.success(),
            "{:?}: expected failure from {}",
            self.kind,
            describe(QED, args, &out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
