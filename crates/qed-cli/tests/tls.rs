//! `qed serve` with TLS against real clients: qemu-img and qemu-io with tls-creds-x509
//! and tls-creds-psk, nbdinfo and nbdcopy with nbds:// URIs, fio's nbd engine; and the
//! refusals: plain clients of a TLS-only server, wrong keys, unknown users and CAs,
//! missing client certificates, and raw clients that break the TLS handshake.
//!
//! Certificates are made here, at test time, with `openssl`; no key is ever committed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::fio::fio_json;
use common::served::{Place, Served};
use common::{
    activated, create_qed, describe, need_check, new_dir, ok, run, FIO, QED, QEMU_IMG, QEMU_IO,
};

const PSK_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

// ---------------------------------------------------------------------------------------
// Credentials.

fn openssl(dir: &Path, args: &[&str]) {
    ok(dir, "openssl", args);
}

/// A CA in `dir/NAME/` (ca-cert.pem, ca-key.pem) and, signed by it, a server certificate
/// for 127.0.0.1 and localhost and a client certificate: QEMU's directory layout.
fn make_x509(dir: &Path, name: &str) -> std::path::PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("ext.cnf"),
        "[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nCN=qed test CA\n\
         [ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\n\
         [server]\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         [client]\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-config",
        "ext.cnf",
        "-extensions",
        "ca",
    ]);
    openssl(&d, &ca);
    for who in ["server", "client"] {
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
        openssl(&d, &req);
        openssl(
            &d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-extensions",
                who,
            ],
        );
    }
    d
}

/// A PSK file with `alice` (and, for qemu, a directory holding it as keys.psk).
fn make_psk(dir: &Path, key: &str) -> std::path::PathBuf {
    let d = dir.join(format!("psk-{key}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("keys.psk"), format!("bob:00ff\nalice:{key}\n")).unwrap();
    d
}

// ---------------------------------------------------------------------------------------
// The export, as TLS clients address it.

/// qemu's `--image-opts` address of the export.
fn qemu_opts(s: &Served) -> String {
    match s.place() {
        Place::Tcp(p) => format!("driver=nbd,host=127.0.0.1,port={p},tls-creds=tls0"),
        // A Unix socket names no host for qemu to check the certificate against.
        Place::Unix(socket) => format!(
            "driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost",
            socket.display()
        ),
    }
}

/// An nbds:// URI of the export, with `query` (tls-certificates=..., say).
fn nbds_uri(s: &Served, user: Option<&str>, query: &str) -> String {
    let user = user.map(|u| format!("{u}@")).unwrap_or_default();
    match s.place() {
        Place::Tcp(p) => format!("nbds://{user}127.0.0.1:{p}/?{query}"),
        Place::Unix(socket) => format!("nbds+unix://{user}/?socket={}&{query}", socket.display()),
    }
}

/// qemu-io through `object` (a tls-creds object with id tls0) on the export; asserts
/// success and no pattern failure.
fn qemu_io_tls(dir: &Path, object: &str, s: &Served, cmds: &[&str]) -> String {
    let opts = qemu_opts(s);
    let mut args = vec!["--object", object, "--image-opts", &opts];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = ok(dir, QEMU_IO, &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {args:?}:\n{out}"
    );
    out
}

/// Runs `prog` and asserts it fails, with `expect` (any of them) in what it printed.
fn refused(dir: &Path, prog: &str, args: &[&str], expect: &[&str]) {
    let out = run(dir, prog, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "should fail: {}",
        describe(prog, args, &out)
    );
    assert!(
        expect.iter().any(|e| text.contains(e)),
        "expected one of {expect:?}: {}",
        describe(prog, args, &out)
    );
}

fn x509_object(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    )
}

fn psk_object(dir: &Path, user: &str) -> String {
    format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username={user}",
        dir.display()
    )
}

// ---------------------------------------------------------------------------------------
// Real clients.

#[test]
fn x509_with_qemu_and_libnbd_over_tcp_and_unix() {
    let tmp = new_dir();
    let dir = tmp.path();
    let ca = make_x509(dir, "ca");
    let certs = ca.to_str().unwrap();
    create_qed(dir, "img.qed", "64M");
    std::fs::write(dir.join("in.raw"), vec![0x3cu8; 4 << 20]).unwrap();
    for unix in [false, true] {
        for verify in [false, true] {
            let mut args = vec!["-t", "-e", "4", "--tls-certificates", certs];
            if verify {
                args.push("--tls-verify-peer");
            }
            let s = Served::start(dir, unix, &args, "img.qed");
            assert!(s.log().contains("TLS required"), "{}", s.log());
            let obj = x509_object(&ca);
            qemu_io_tls(
                dir,
                &obj,
                &s,
                &["write -P 0xa5 1M 1M", "read -P 0xa5 1M 1M"],
            );
            let info = ok(
                dir,
                QEMU_IMG,
                &["info", "--object", &obj, "--image-opts", &qemu_opts(&s)],
            );
            assert!(info.contains("67108864 bytes"), "{info}");
            let uri = nbds_uri(&s, None, &format!("tls-certificates={certs}"));
            let out = ok(dir, "nbdinfo", &[&uri]);
            assert!(
                out.contains("with TLS") && out.contains("67108864"),
                "{out}"
            );
            ok(dir, "nbdcopy", &["in.raw", &uri]);
            ok(dir, "nbdcopy", &[&uri, "out.raw"]);
            let back = std::fs::read(dir.join("out.raw")).unwrap();
            assert_eq!(back.len(), 64 << 20);
            assert!(back[..4 << 20].iter().all(|&b| b == 0x3c));
            assert!(back[4 << 20..].iter().all(|&b| b == 0));
            s.stop();
            assert!(!need_check(&dir.join("img.qed")));
        }
    }
}

/// Two servers on sockets handed over by socket activation, TLS required: libnbd's
/// tools copy between them through TLS, and a plain client learns nothing.
#[test]
fn activated_servers_require_tls_and_nbdcopy_copies_between_them() {
    use std::os::fd::AsRawFd;
    let tmp = new_dir();
    let dir = tmp.path();
    let ca = make_x509(dir, "ca");
    let certs = ca.to_str().unwrap();
    create_qed(dir, "a.qed", "16M");
    create_qed(dir, "b.qed", "16M");
    ok(
        dir,
        QEMU_IO,
        &[
            "-f",
            "qed",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -P 0xc3 9M 3M",
            "a.qed",
        ],
    );
    let mut servers = Vec::new();
    let mut uris = Vec::new();
    for image in ["a.qed", "b.qed"] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut cmd = activated(
            dir,
            listener.as_raw_fd(),
            &["-t", "-e", "4", "--tls-certificates", certs, image],
        );
        let (child, log, banner) = common::spawn_server(&mut cmd);
        assert!(
            banner.contains("(socket activation), TLS required"),
            "{banner}"
        );
        servers.push((child, log));
        uris.push(format!("nbds://127.0.0.1:{port}/?tls-certificates={certs}"));
    }
    let info = ok(dir, "nbdinfo", &[&uris[0]]);
    assert!(
        info.contains("with TLS") && info.contains("16777216"),
        "{info}"
    );
    ok(dir, "nbdcopy", &[&uris[0], &uris[1]]);
    // Without TLS the export is not even opened.
    let plain = uris[0].replace("nbds://", "nbd://");
    let plain = plain.split('?').next().unwrap();
    refused(dir, "nbdinfo", &[plain], &["TLS", "tls"]);
    for (mut child, log) in servers {
        common::signal(child.id(), "TERM");
        let st = child.wait().unwrap();
        assert!(st.success(), "{st}:\n{}", log.lock().unwrap());
    }
    ok(
        dir,
        QEMU_IMG,
        &["compare", "-f", "qed", "-F", "qed", "a.qed", "b.qed"],
    );
    let out = ok(
        dir,
        QEMU_IO,
        &[
            "-f",
            "qed",
            "-r",
            "-c",
            "read -P 0x5a 0 4M",
            "-c",
            "read -P 0xc3 9M 3M",
            "b.qed",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    assert!(!need_check(&dir.join("a.qed")) && !need_check(&dir.join("b.qed")));
}

#[test]
fn psk_with_qemu_and_libnbd_over_tcp_and_unix() {
    let tmp = new_dir();
    let dir = tmp.path();
    let psk = make_psk(dir, PSK_KEY);
    let file = psk.join("keys.psk");
    let file = file.to_str().unwrap();
    create_qed(dir, "img.qed", "64M");
    for unix in [false, true] {
        let s = Served::start(dir, unix, &["-t", "-e", "4", "--tls-psk", file], "img.qed");
        let obj = psk_object(&psk, "alice");
        qemu_io_tls(dir, &obj, &s, &["write -P 0x42 0 2M", "read -P 0x42 0 2M"]);
        let uri = nbds_uri(&s, Some("alice"), &format!("tls-psk-file={file}"));
        let out = ok(dir, "nbdinfo", &[&uri]);
        assert!(out.contains("with TLS"), "{out}");
        ok(dir, "nbdcopy", &[&uri, "out.raw"]);
        let back = std::fs::read(dir.join("out.raw")).unwrap();
        assert!(back[..2 << 20].iter().all(|&b| b == 0x42));
        s.stop();
    }
}

#[test]
fn fio_verifies_through_tls() {
    let tmp = new_dir();
    let dir = tmp.path();
    // fio's nbd engine gives libnbd no leave to read files a URI names, so the client's
    // certificates come from libnbd's default place: $HOME/.pki/libnbd for a user other
    // than root (root's is /etc/pki/libnbd, which a test does not touch). As root, fio
    // runs as nobody, with the test's directory open to it.
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".pki")).unwrap();
    let ca = make_x509(&home.join(".pki"), "libnbd");
    let certs = ca.to_str().unwrap();
    // SAFETY: geteuid cannot fail.
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        use std::os::unix::fs::PermissionsExt;
        let open = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        for d in [dir, &home, &home.join(".pki"), &ca] {
            open(d, 0o755);
        }
        for f in std::fs::read_dir(&ca).unwrap() {
            open(&f.unwrap().path(), 0o644);
        }
    }
    // O_DIRECT sends reads and writes through the connection's ring; writeback through
    // the pool.
    for cache in ["none", "writeback"] {
        let _ = std::fs::remove_file(dir.join("img.qed"));
        create_qed(dir, "img.qed", "32M");
        let cache = format!("--cache={cache}");
        let args = [
            "-t",
            "-e",
            "2",
            &cache,
            "--tls-certificates",
            certs,
            "--tls-verify-peer",
        ];
        let s = Served::start(dir, false, &args, "img.qed");
        let uri = nbds_uri(&s, None, "");
        let mut cmd = Command::new(if as_root { "setpriv" } else { FIO });
        if as_root {
            cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", FIO]);
        }
        let out = cmd
            .env("HOME", &home)
            .current_dir(dir)
            .args([
                "--name=tls",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--size=16M",
                "--offset_increment=16M",
                "--iodepth=32",
                "--numjobs=2",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run fio");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "fio: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = fio_json(&text);
        let jobs = report["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 2);
        for j in jobs {
            assert_eq!(j["error"], 0, "{j}");
            assert_eq!(j["read"]["io_bytes"], 16u64 << 20, "{j}");
            assert_eq!(j["write"]["io_bytes"], 16u64 << 20, "{j}");
        }
        s.stop();
        assert!(!need_check(&dir.join("img.qed")));
    }
}

// ---------------------------------------------------------------------------------------
// Refusals.

mod wire {
    pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
    pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
}

/// The option haggling by hand, over any stream (plain, or TLS on top of it).
struct Haggle<S: Read + Write>(S);

impl<S: Read + Write> Haggle<S> {
    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = wire::IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        // A server that has hung up shows in the reply (or its absence) that follows.
        let _ = self.0.write_all(&m);
    }

    /// (option, reply type, data)
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).expect("an option reply");
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        (option, kind, data)
    }

    /// Whether the server hung up without sending anything more.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }

    /// NBD_OPT_GO (or INFO) for the default export: the reply types up to the last.
    fn go(&mut self, option: u32) -> Vec<u32> {
        self.option(option, &[0, 0, 0, 0, 0, 0]);
        let mut kinds = Vec::new();
        loop {
            let (o, kind, _) = self.reply();
            assert_eq!(o, option);
            kinds.push(kind);
            if kind != wire::REP_INFO {
                return kinds;
            }
        }
    }
}

/// Connects and takes the greeting; returns the stream for the options.
fn greet(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    // Fixed newstyle, no zeroes.
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c
}

/// NBD_OPT_STARTTLS, acknowledged, and the plain stream to start TLS on.
fn starttls(port: u16) -> TcpStream {
    let mut h = Haggle(greet(port));
    h.option(wire::OPT_STARTTLS, &[]);
    assert_eq!(h.reply(), (wire::OPT_STARTTLS, wire::REP_ACK, vec![]));
    h.0
}

/// A TLS client of our own, with the PSK `alice:PSK_KEY`.
fn psk_connector(key: &str) -> openssl::ssl::SslConnector {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let key: Vec<u8> = (0..key.len() / 2)
        .map(|i| u8::from_str_radix(&key[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_psk_client_callback(move |_, _, identity, psk| {
        identity[..6].copy_from_slice(b"alice\0");
        psk[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    b.build()
}

#[test]
fn a_tls_only_server_tells_plain_clients_nothing() {
    let tmp = new_dir();
    let dir = tmp.path();
    let psk = make_psk(dir, PSK_KEY);
    let file = psk.join("keys.psk");
    let file = file.to_str().unwrap();
    create_qed(dir, "img.qed", "4M");
    let mut s = Served::start(
        dir,
        false,
        &[
            "-t",
            "-e",
            "4",
            "-x",
            "secret",
            "-D",
            "hidden",
            "--tls-psk",
            file,
        ],
        "img.qed",
    );
    let port = s.port();

    // Real plain clients: refused, with TLS named.
    let plain = format!("nbd://127.0.0.1:{port}/secret");
    refused(dir, QEMU_IMG, &["info", &plain], &["TLS"]);
    let out = run(dir, "nbdinfo", &["--list", &plain]);
    assert!(
        !out.status.success(),
        "{}",
        describe("nbdinfo", &["--list", &plain], &out)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("secret"));

    // By hand: every option before STARTTLS but ABORT gets ERR_TLS_REQD, and nothing
    // about the export leaks.
    let mut h = Haggle(greet(port));
    for option in [wire::OPT_LIST, wire::OPT_STRUCTURED_REPLY, 0x7fff_0001] {
        h.option(option, &[]);
        let (o, kind, data) = h.reply();
        assert_eq!((o, kind), (option, wire::REP_ERR_TLS_REQD));
        assert!(!String::from_utf8_lossy(&data).contains("secret"));
    }
    assert_eq!(h.go(wire::OPT_INFO), vec![wire::REP_ERR_TLS_REQD]);
    assert_eq!(h.go(wire::OPT_GO), vec![wire::REP_ERR_TLS_REQD]);
    // STARTTLS with data is malformed; the haggling goes on.
    h.option(wire::OPT_STARTTLS, b"x");
    assert_eq!(h.reply().1, wire::REP_ERR_INVALID);
    h.option(wire::OPT_ABORT, &[]);
    assert_eq!(h.reply(), (wire::OPT_ABORT, wire::REP_ACK, vec![]));
    // EXPORT_NAME has no error reply: the server hangs up, sending nothing.
    let mut h = Haggle(greet(port));
    h.option(wire::OPT_EXPORT_NAME, b"secret");
    assert!(h.closed(), "EXPORT_NAME before TLS");
    s.assert_alive();

    // Inside TLS the haggling starts again: the export is listed; a second STARTTLS is
    // refused as the protocol says, and the session goes on.
    let tls = psk_connector(PSK_KEY)
        .connect("localhost", starttls(port))
        .expect("TLS with the right key");
    let mut h = Haggle(tls);
    h.option(wire::OPT_LIST, &[]);
    let (_, kind, data) = h.reply();
    assert_eq!(kind, wire::REP_SERVER);
    assert!(String::from_utf8_lossy(&data).contains("secret"));
    assert_eq!(h.reply().1, wire::REP_ACK);
    h.option(wire::OPT_STARTTLS, &[]);
    assert_eq!(h.reply().1, wire::REP_ERR_INVALID);
    h.option(
        wire::OPT_GO,
        &[0, 0, 0, 6, b's', b'e', b'c', b'r', b'e', b't', 0, 0],
    );
    loop {
        let (_, kind, _) = h.reply();
        if kind != wire::REP_INFO {
            assert_eq!(kind, wire::REP_ACK);
            break;
        }
    }
    // A read in transmission: simple reply, 512 zeros.
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    h.0.write_all(&req).unwrap();
    let mut reply = [0u8; 16 + 512];
    h.0.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0; 4], "no error");
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 7);
    assert!(reply[16..].iter().all(|&b| b == 0));
    drop(h);
    s.assert_alive();
    s.stop();
}

#[test]
fn failed_tls_handshakes_end_only_their_connection() {
    let tmp = new_dir();
    let dir = tmp.path();
    let psk = make_psk(dir, PSK_KEY);
    let wrong = make_psk(dir, "00112233445566778899aabbccddeeff");
    let file = psk.join("keys.psk");
    let file = file.to_str().unwrap();
    create_qed(dir, "img.qed", "4M");
    let mut s = Served::start(dir, false, &["-t", "-e", "8", "--tls-psk", file], "img.qed");
    let port = s.port();
    let failed = "TLS handshake failed";
    let good = |s: &Served| {
        qemu_io_tls(dir, &psk_object(&psk, "alice"), s, &["read -P 0 0 64k"]);
    };
    good(&s);

    // A wrong key, and an unknown user, through qemu.
    let opts = qemu_opts(&s);
    let wrong_obj = psk_object(&wrong, "alice");
    refused(
        dir,
        QEMU_IO,
        &[
            "--object",
            &wrong_obj,
            "--image-opts",
            &opts,
            "-c",
            "read 0 512",
        ],
        &["TLS", "tls"],
    );
    s.wait_log(failed, 1);
    let carol = make_psk(dir, "carol");
    std::fs::write(carol.join("keys.psk"), format!("carol:{PSK_KEY}\n")).unwrap();
    let carol_obj = psk_object(&carol, "carol");
    refused(
        dir,
        QEMU_IO,
        &[
            "--object",
            &carol_obj,
            "--image-opts",
            &opts,
            "-c",
            "read 0 512",
        ],
        &["TLS", "tls"],
    );
    s.wait_log(failed, 2);
    // Through libnbd too.
    let uri = nbds_uri(
        &s,
        Some("alice"),
        &format!("tls-psk-file={}", wrong.join("keys.psk").display()),
    );
    refused(dir, "nbdinfo", &[&uri], &["TLS", "tls", "handshake"]);
    s.wait_log(failed, 3);
    // Through our own client.
    assert!(psk_connector("ffff")
        .connect("localhost", starttls(port))
        .is_err());
    s.wait_log(failed, 4);

    // STARTTLS, then garbage instead of a ClientHello.
    let mut c = starttls(port);
    c.write_all(&[0x5a; 300]).unwrap();
    assert!(Haggle(&mut c).closed(), "garbage after STARTTLS");
    s.wait_log(failed, 5);
    // STARTTLS, then the client leaves mid-handshake.
    let mut c = starttls(port);
    c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    drop(c);
    s.wait_log(failed, 6);
    // Every failure is one line naming the peer.
    let lines: Vec<String> = s
        .log()
        .lines()
        .filter(|l| l.contains(failed))
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 6, "{}", s.log());
    for l in &lines {
        assert!(l.starts_with("qed serve: 127.0.0.1:"), "{l}");
    }
    s.assert_alive();
    good(&s);
    s.stop();
}

#[test]
fn certificates_from_another_ca_or_none_are_refused() {
    let tmp = new_dir();
    let dir = tmp.path();
    let ca = make_x509(dir, "ca");
    let other = make_x509(dir, "other");
    // A client with the right CA (it trusts the server) but no certificate of its own.
    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    // A client that trusts the server but whose certificate another CA signed.
    let mixed = dir.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join(f), mixed.join(f)).unwrap();
    }
    create_qed(dir, "img.qed", "4M");
    let certs = ca.to_str().unwrap();
    let mut s = Served::start(
        dir,
        false,
        &[
            "-t",
            "-e",
            "4",
            "--tls-certificates",
            certs,
            "--tls-verify-peer",
        ],
        "img.qed",
    );
    let opts = qemu_opts(&s);
    let failed = "TLS handshake failed";
    let broken = ["TLS", "tls", "handshake", "certificate", "socket"];
    // No certificate: qemu and libnbd. In TLS 1.3 a client may learn of the refusal
    // only at its next write, as a broken connection.
    let obj = x509_object(&bare);
    refused(
        dir,
        QEMU_IO,
        &["--object", &obj, "--image-opts", &opts, "-c", "read 0 512"],
        &broken,
    );
    s.wait_log(failed, 1);
    let uri = nbds_uri(&s, None, &format!("tls-certificates={}", bare.display()));
    refused(dir, "nbdinfo", &[&uri], &broken);
    s.wait_log(failed, 2);
    // Another CA's certificate (qemu checks its own before it connects: libnbd and our
    // own client present it).
    let obj = x509_object(&mixed);
    refused(
        dir,
        QEMU_IO,
        &["--object", &obj, "--image-opts", &opts, "-c", "read 0 512"],
        &["certificate"],
    );
    let uri = nbds_uri(&s, None, &format!("tls-certificates={}", mixed.display()));
    refused(dir, "nbdinfo", &[&uri], &broken);
    s.wait_log(failed, 3);
    {
        use openssl::ssl::{SslConnector, SslFiletype, SslMethod};
        let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
        b.set_ca_file(ca.join("ca-cert.pem")).unwrap();
        b.set_certificate_file(other.join("client-cert.pem"), SslFiletype::PEM)
            .unwrap();
        b.set_private_key_file(other.join("client-key.pem"), SslFiletype::PEM)
            .unwrap();
        let c = b.build().connect("localhost", starttls(s.port()));
        if let Ok(c) = c {
            let mut h = Haggle(c);
            h.option(wire::OPT_LIST, &[]);
            assert!(h.closed(), "a certificate from another CA");
        }
    }
    s.wait_log(failed, 4);
    // A client that trusts another CA refuses the server itself.
    let obj = x509_object(&other);
    refused(
        dir,
        QEMU_IO,
        &["--object", &obj, "--image-opts", &opts, "-c", "read 0 512"],
        &broken,
    );
    s.assert_alive();
    qemu_io_tls(dir, &x509_object(&ca), &s, &["read -P 0 0 64k"]);
    s.stop();
}

#[test]
fn tls_on_serves_both_and_off_refuses_starttls() {
    let tmp = new_dir();
    let dir = tmp.path();
    let psk = make_psk(dir, PSK_KEY);
    let file = psk.join("keys.psk");
    let file = file.to_str().unwrap();
    create_qed(dir, "img.qed", "4M");
    let s = Served::start(
        dir,
        false,
        &["-t", "-e", "4", "--tls=on", "--tls-psk", file],
        "img.qed",
    );
    assert!(s.log().contains("TLS offered"), "{}", s.log());
    let plain = format!("nbd://127.0.0.1:{}/", s.port());
    common::qemu::qemu_io(dir, "raw", &plain, false, &["write -P 0x11 0 64k"]);
    qemu_io_tls(dir, &psk_object(&psk, "alice"), &s, &["read -P 0x11 0 64k"]);
    s.stop();

    let s = Served::start(
        dir,
        false,
        &["-t", "--tls=off", "--tls-psk", file],
        "img.qed",
    );
    let mut h = Haggle(greet(s.port()));
    h.option(wire::OPT_STARTTLS, &[]);
    assert_eq!(h.reply().1, wire::REP_ERR_POLICY);
    h.option(wire::OPT_ABORT, &[]);
    drop(h);
    common::qemu::qemu_io(
        dir,
        "raw",
        &format!("nbd://127.0.0.1:{}/", s.port()),
        true,
        &["read -P 0x11 0 64k"],
    );
    s.stop();
}

#[test]
fn bad_credentials_are_refused_before_listening() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "4M");
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::write(dir.join("bad.psk"), "alice:nothex\n").unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--tls-certificates", "empty"], "server-cert.pem"),
        (&["--tls-psk", "bad.psk"], "line 1"),
        (&["--tls-psk", "missing.psk"], "missing.psk"),
        (&["--tls=require"], "--tls-certificates"),
    ];
    for (args, expect) in cases {
        let mut all = vec!["serve", "-p", "0"];
        all.extend_from_slice(args);
        all.push("img.qed");
        let out = run(dir, QED, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect),
            "{}",
            describe(QED, &all, &out)
        );
    }
}
