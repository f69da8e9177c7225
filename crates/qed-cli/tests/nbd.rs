//! `qed serve` against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy and fio,
//! plus a hand-written client that breaks the protocol on purpose.
//!
//! Every server runs as a child process of the test, so what is tested is the shipped
//! binary: its signal handling, its exit status and what it leaves in the image file.
//! A missing client tool fails these tests instead of skipping them: skipping would let
//! a machine without the tools report the NBD suite as passing.

use serde_json::Value;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::fio::{nbd_engine, Verified};
use common::qemu::{qemu_img_check, qemu_io};
use common::served::Served;
use common::{
    create_qed, describe, fails, need_check, new_dir, ok, run, test_bytes, QED, QEMU_IMG, QEMU_IO,
};

const NBDINFO: &str = "nbdinfo";
const NBDCOPY: &str = "nbdcopy";

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
const CLUSTER: u64 = 64 * K;

// ---------------------------------------------------------------------------------------
// Maps.

/// (start, length, data, zero) runs covering the image, adjacent equal runs merged.
type Runs = Vec<(u64, u64, bool, bool)>;

fn runs_of(what: &str, json_text: &str) -> Runs {
    let v: Value = serde_json::from_str(json_text)
        .unwrap_or_else(|e| panic!("{what} printed invalid JSON ({e}):\n{json_text}"));
    let mut out: Runs = Vec::new();
    for e in v.as_array().expect("a JSON array") {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        match out.last_mut() {
            Some(l) => {
                assert_eq!(l.0 + l.1, start, "{what}: extents are not contiguous");
                if (l.2, l.3) == (data, zero) {
                    l.1 += len;
                    continue;
                }
            }
            None => assert_eq!(start, 0, "{what}: map does not start at 0"),
        }
        out.push((start, len, data, zero));
    }
    out
}

/// `nbdinfo --map` lines as (offset, length, value).
fn nbdinfo_map(text: &str) -> Vec<(u64, u64, u32)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. qemu-io and qemu-img.

#[test]
fn qemu_io_and_qemu_img_over_unix_and_tcp() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "16M");

    let s = Served::start(dir, true, &["-t", "--discard=unmap"], "img.qed");
    qemu_io(
        dir,
        "raw",
        &s.uri(),
        false,
        &[
            "write -P 0xaa 0 1M",
            "read -P 0xaa 0 1M",
            // Without -u qemu sends NO_HOLE: real zeros get allocated.
            "write -z 4M 1M",
            "write -P 0xbb 6M 1M",
            // Zeroing allocated clusters keeps them allocated, zeroed in place.
            "write -z -u 6M 256k",
            "write -P 0xcc 9441280 8192",
            "read -P 0 4M 1M",
            "read -P 0 6M 256k",
            "read -P 0xbb 6553600 786432",
            "read -P 0 9M 4096",
            "read -P 0xcc 9441280 8192",
            "read -P 0 9449472 57344",
        ],
    );
    s.stop();

    let s = Served::start(dir, false, &["-t", "--discard=unmap"], "img.qed");
    qemu_io(
        dir,
        "raw",
        &s.uri(),
        false,
        &[
            "read -P 0xaa 0 1M",
            "read -P 0xbb 6553600 786432",
            // Unallocated with no backing file already reads as zeros: stays a hole.
            "write -z -u 5M 1M",
            "discard 6815744 262144",
            "read -P 0 6815744 262144",
            "read -P 0xbb 7077888 262144",
            "write -P 0xdd 12M 512k",
            "read -P 0xdd 12M 512k",
        ],
    );
    let over_nbd = ok(
        dir,
        QEMU_IMG,
        &["map", "-f", "raw", "--output=json", &s.uri()],
    );
    s.stop();

    assert!(!need_check(&dir.join("img.qed")));
    qemu_img_check(dir, "img.qed");
    // Everything written over NBD is in the file, read by QEMU's own QED driver.
    qemu_io(
        dir,
        "qed",
        "img.qed",
        true,
        &[
            "read -P 0xaa 0 1M",
            "read -P 0 1M 3M",
            "read -P 0 4M 2M",
            "read -P 0 6M 256k",
            "read -P 0xbb 6553600 262144",
            "read -P 0 6815744 262144",
            "read -P 0xbb 7077888 262144",
            "read -P 0 7M 2M",
            "read -P 0 9M 4096",
            "read -P 0xcc 9441280 8192",
            "read -P 0 9449472 3088384",
            "read -P 0xdd 12M 512k",
            "read -P 0 13107200 3670016",
        ],
    );

    // Over NBD qemu-img sees base:allocation only, so offsets and `present` differ from
    // the file's map; what must agree is which bytes are data and which read as zeros.
    let nbd = runs_of("qemu-img map over NBD", &over_nbd);
    let qemu_local = runs_of(
        "qemu-img map",
        &ok(
            dir,
            QEMU_IMG,
            &["map", "-f", "qed", "--output=json", "img.qed"],
        ),
    );
    let qed_local = runs_of(
        "qed map",
        &ok(dir, QED, &["map", "--output", "json", "img.qed"]),
    );
    let expected: Runs = vec![
        (0, M, true, false),
        (M, 3 * M, false, true),
        (4 * M, M, true, false),
        (5 * M, M, false, true),
        // Zeroed clusters stay allocated; discarded ones are parked at close.
        (6 * M, M, true, false),
        (7 * M, 2 * M, false, true),
        (9 * M, CLUSTER, true, false),
        (9 * M + CLUSTER, 3 * M - CLUSTER, false, true),
        (12 * M, 512 * K, true, false),
        (12 * M + 512 * K, 4 * M - 512 * K, false, true),
    ];
    assert_eq!(qemu_local, expected, "qemu-img map of the file");
    assert_eq!(qed_local, expected, "qed map of the file");
    // While served, the discarded clusters are free and read as zeros; the close parked
    // them back under their entries (punched), so the file maps them as data again.
    let mut served = expected.clone();
    served.splice(
        4..5,
        [
            (6 * M, 512 * K, true, false),
            (6 * M + 512 * K, 256 * K, false, true),
            (6 * M + 768 * K, 256 * K, true, false),
        ],
    );
    assert_eq!(nbd, served, "qemu-img map over NBD:\n{over_nbd}");
}

#[test]
fn qemu_img_convert_in_and_out() {
    let tmp = new_dir();
    let dir = tmp.path();
    let src = test_bytes(8 * M as usize, 0x5eed);
    std::fs::write(dir.join("src.raw"), &src).unwrap();
    create_qed(dir, "img.qed", "8M");

    let s = Served::start(dir, true, &["-t"], "img.qed");
    ok(
        dir,
        QEMU_IMG,
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            "src.raw",
            &s.uri(),
        ],
    );
    // Without --discard=unmap, trims are acknowledged and change nothing.
    qemu_io(dir, "raw", &s.uri(), false, &["discard 0 8M"]);
    ok(
        dir,
        QEMU_IMG,
        &["compare", "-f", "raw", "-F", "raw", "src.raw", &s.uri()],
    );
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "raw", "-O", "raw", &s.uri(), "out.raw"],
    );
    s.stop();

    assert!(std::fs::read(dir.join("out.raw")).unwrap() == src);
    ok(
        dir,
        QEMU_IMG,
        &["compare", "-f", "raw", "-F", "qed", "src.raw", "img.qed"],
    );
    assert!(!need_check(&dir.join("img.qed")));
    qemu_img_check(dir, "img.qed");
}

// ---------------------------------------------------------------------------------------
// 2. nbdinfo.

#[test]
fn nbdinfo_maps_list_and_unknown_export() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "base.qed", "4M");
    ok(dir, QED, &["io", "-c", "write -P 0x11 0 1M", "base.qed"]);
    ok(
        dir,
        QED,
        &["create", "-q", "-b", "base.qed", "-F", "qed", "top.qed"],
    );
    ok(
        dir,
        QED,
        &[
            "io",
            "-c",
            "write -P 0x22 512k 256k",
            "-c",
            "write -z 1M 1M",
            "-c",
            "write -P 0x33 3M 64k",
            "top.qed",
        ],
    );

    let s = Served::start(
        dir,
        false,
        &["-t", "-x", "disk", "-D", "test disk"],
        "top.qed",
    );
    let uri = s.uri_for("disk");

    let alloc = nbdinfo_map(&ok(dir, NBDINFO, &["--map", &uri]));
    assert_eq!(
        alloc,
        vec![
            // Backing data and local data alike are data.
            (0, M, 0),
            // A zero cluster over the backing file, then nothing at all: hole,zero.
            (M, 2 * M, 3),
            (3 * M, CLUSTER, 0),
            (3 * M + CLUSTER, M - CLUSTER, 3),
        ]
    );
    let depth = nbdinfo_map(&ok(dir, NBDINFO, &["--map=qemu:allocation-depth", &uri]));
    assert_eq!(
        depth,
        vec![
            (0, 512 * K, 2),
            (512 * K, 256 * K, 1),
            (768 * K, 256 * K, 2),
            (M, M, 1),
            (2 * M, M, 0),
            (3 * M, CLUSTER, 1),
            (3 * M + CLUSTER, M - CLUSTER, 0),
        ]
    );

    let list = ok(dir, NBDINFO, &["--list", &s.uri()]);
    assert!(list.contains("export=\"disk\":"), "{list}");
    assert!(list.contains("description: test disk"), "{list}");
    assert!(list.contains("export-size: 4194304"), "{list}");

    let err = fails(dir, NBDINFO, &[&s.uri_for("nosuch")]);
    assert!(err.contains("nosuch"), "{err}");
    // The refusal was an answer, not a crash.
    let size = ok(dir, NBDINFO, &["--size", &uri]);
    assert_eq!(size.trim(), "4194304");
    s.stop();
}

// ---------------------------------------------------------------------------------------
// 3. nbdcopy.

#[test]
fn nbdcopy_round_trip() {
    let tmp = new_dir();
    let dir = tmp.path();
    let src = test_bytes(16 * M as usize, 0xc0de);
    std::fs::write(dir.join("src.raw"), &src).unwrap();
    create_qed(dir, "img.qed", "16M");

    // nbdcopy opens four connections when the server allows multi-conn.
    let s = Served::start(dir, false, &["-t", "-e", "4"], "img.qed");
    assert!(ok(dir, NBDINFO, &[&s.uri()]).contains("can_multi_conn: true"));
    ok(dir, NBDCOPY, &["src.raw", &s.uri()]);
    ok(dir, NBDCOPY, &[&s.uri(), "out.raw"]);
    s.stop();
    // A server of one client at a time does not offer multi-conn, as qemu-nbd: nbdcopy
    // would otherwise wait forever for the connections it is never given.
    let s = Served::start(dir, false, &["-t"], "img.qed");
    assert!(ok(dir, NBDINFO, &[&s.uri()]).contains("can_multi_conn: false"));
    ok(dir, NBDCOPY, &[&s.uri(), "out1.raw"]);
    s.stop();
    assert!(std::fs::read(dir.join("out1.raw")).unwrap() == src);

    let out = std::fs::read(dir.join("out.raw")).unwrap();
    assert_eq!(out.len(), src.len());
    assert!(out == src, "nbdcopy round trip changed the bytes");
    ok(
        dir,
        QEMU_IMG,
        &["compare", "-f", "raw", "-F", "qed", "src.raw", "img.qed"],
    );
    qemu_img_check(dir, "img.qed");
}

// ---------------------------------------------------------------------------------------
// 4. fio.

#[test]
fn fio_verify_with_four_connections() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "32M");

    let fio = |uri: &str, verify_only: bool| {
        let run = Verified {
            name: "nbd",
            engine: nbd_engine(uri),
            jobs: 4,
            region: 8 * M,
            iodepth: 32,
        };
        run.run(dir, verify_only);
    };

    // Through the page cache, and with O_DIRECT (where requests go straight from the
    // connection's io_uring to the file, beside the read-modify-writes of unaligned ones).
    for cache in ["writeback", "none"] {
        let cache = format!("--cache={cache}");
        std::fs::remove_file(dir.join("img.qed")).unwrap();
        // fio's four jobs take the first 32M; the rest is for unaligned requests.
        create_qed(dir, "img.qed", "40M");
        let s = Served::start(dir, false, &["-t", "-e", "4", &cache], "img.qed");
        fio(&s.uri(), false);
        // Unaligned requests next to what fio wrote.
        qemu_io(
            dir,
            "raw",
            &s.uri(),
            false,
            &["write -P 0x77 33M 1000", "write -P 0x78 36863k 7k"],
        );
        s.stop();
        assert!(!need_check(&dir.join("img.qed")));
        qemu_img_check(dir, "img.qed");

        // What fio wrote survives a server restart.
        let s = Served::start(dir, true, &["-t", "-e", "4", &cache], "img.qed");
        fio(&s.uri(), true);
        qemu_io(
            dir,
            "raw",
            &s.uri(),
            true,
            &["read -P 0x77 33M 1000", "read -P 0x78 36863k 7k"],
        );
        s.stop();
    }
}

// ---------------------------------------------------------------------------------------
// A client that speaks the protocol by hand, so it can also break it.

mod wire {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
    pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

    pub const OPT_GO: u32 = 7;
    pub const OPT_SET_META_CONTEXT: u32 = 10;
    pub const OPT_EXTENDED_HEADERS: u32 = 11;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;
    pub const CHUNK_OFFSET_DATA: u16 = 1;
    pub const CHUNK_OFFSET_HOLE: u16 = 2;
    pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
    pub const FLAG_PAYLOAD_LEN: u16 = 1 << 5;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const REP_ACK: u32 = 1;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;
    pub const CHUNK_NONE: u16 = 0;
    pub const CHUNK_ERROR: u16 = (1 << 15) + 1;
    pub const FLAG_NO_HOLE: u16 = 1 << 1;
    pub const FLAG_FAST_ZERO: u16 = 1 << 4;
    pub const FLAG_READ_ONLY: u16 = 1 << 1;

    pub const EPERM: u32 = 1;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const ENOTSUP: u32 = 95;

    pub struct Client {
        pub s: TcpStream,
    }

    impl Client {
        pub fn connect(port: u16) -> Client {
            let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Client { s }
        }

        /// Reads the greeting and answers it (fixed newstyle, no zero padding).
        pub fn greet(port: u16) -> Client {
            let mut c = Client::connect(port);
            assert_eq!(c.u64(), NBDMAGIC);
            assert_eq!(c.u64(), IHAVEOPT);
            let flags = c.u16();
            assert_eq!(flags & 3, 3, "server handshake flags {flags:#x}");
            c.send(&3u32.to_be_bytes());
            c
        }

        /// Greets, optionally negotiates structured replies, and enters transmission
        /// with NBD_OPT_GO on the default export. Returns the export size and flags.
        pub fn open(port: u16, structured: bool) -> (Client, u64, u16) {
            let mut c = Client::greet(port);
            if structured {
                c.option(OPT_STRUCTURED_REPLY, &[]);
                let (opt, kind, _) = c.option_reply();
                assert_eq!((opt, kind), (OPT_STRUCTURED_REPLY, REP_ACK));
            }
            let (size, flags) = c.go("");
            (c, size, flags)
        }

        pub fn go(&mut self, name: &str) -> (u64, u16) {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&0u16.to_be_bytes());
            self.option(OPT_GO, &d);
            let mut export = None;
            loop {
                let (opt, kind, data) = self.option_reply();
                assert_eq!(opt, OPT_GO);
                match kind {
                    REP_INFO if data[..2] == [0, 0] => {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                        export = Some((size, flags));
                    }
                    REP_INFO => {}
                    REP_ACK => return export.expect("NBD_INFO_EXPORT before the ACK"),
                    k => panic!("NBD_OPT_GO failed: reply {k:#x}"),
                }
            }
        }

        pub fn send(&mut self, b: &[u8]) {
            self.s.write_all(b).expect("send to the server");
        }

        pub fn option(&mut self, opt: u32, data: &[u8]) {
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&opt.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            self.send(&m);
        }

        /// (option, reply type, data)
        pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
            assert_eq!(self.u64(), REPLY_MAGIC);
            let opt = self.u32();
            let kind = self.u32();
            let len = self.u32();
            (opt, kind, self.bytes(len as usize))
        }

        pub fn header(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
            let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&flags.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&cookie.to_be_bytes());
            m.extend_from_slice(&offset.to_be_bytes());
            m.extend_from_slice(&len.to_be_bytes());
            m
        }

        pub fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32) {
            self.send(&Self::header(kind, 0, cookie, offset, len));
        }

        pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
            let mut m = Self::header(CMD_WRITE, 0, cookie, offset, data.len() as u32);
            m.extend_from_slice(data);
            self.send(&m);
        }

        /// A simple reply's (error, cookie).
        pub fn simple_reply(&mut self) -> (u32, u64) {
            assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
            let error = self.u32();
            (error, self.u64())
        }

        /// A read with simple replies: its data, or the error.
        pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
            self.request(CMD_READ, cookie, offset, len);
            let (error, c) = self.simple_reply();
            assert_eq!(c, cookie);
            if error != 0 {
                return Err(error);
            }
            Ok(self.bytes(len as usize))
        }

        /// One structured reply chunk: (flags, type, cookie, payload).
        pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
            assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
            let flags = self.u16();
            let kind = self.u16();
            let cookie = self.u64();
            let len = self.u32();
            (flags, kind, cookie, self.bytes(len as usize))
        }

        /// Asks for `base:allocation`; returns its id.
        pub fn set_allocation_context(&mut self) -> u32 {
            let query = b"base:allocation";
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(query.len() as u32).to_be_bytes());
            d.extend_from_slice(query);
            self.option(OPT_SET_META_CONTEXT, &d);
            let (opt, kind, data) = self.option_reply();
            assert_eq!((opt, kind), (OPT_SET_META_CONTEXT, REP_META_CONTEXT));
            let id = u32::from_be_bytes(data[..4].try_into().unwrap());
            assert_eq!(self.option_reply().1, REP_ACK);
            id
        }

        /// Greets, negotiates extended headers and `base:allocation`, and enters
        /// transmission. Returns the export size and the context id.
        pub fn open_extended(port: u16) -> (Client, u64, u32) {
            let mut c = Client::greet(port);
            c.option(OPT_EXTENDED_HEADERS, &[]);
            let (opt, kind, _) = c.option_reply();
            assert_eq!((opt, kind), (OPT_EXTENDED_HEADERS, REP_ACK));
            let id = c.set_allocation_context();
            let (size, _) = c.go("");
            (c, size, id)
        }

        /// An extended (32-byte) request header.
        pub fn ext_header(kind: u16, flags: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
            let mut m = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&flags.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&cookie.to_be_bytes());
            m.extend_from_slice(&offset.to_be_bytes());
            m.extend_from_slice(&len.to_be_bytes());
            m
        }

        /// One extended reply chunk: (flags, type, cookie, offset, payload). A length
        /// beyond any reply this server sends fails the test before anything is
        /// allocated for it.
        pub fn ext_chunk(&mut self) -> (u16, u16, u64, u64, Vec<u8>) {
            assert_eq!(self.u32(), EXTENDED_REPLY_MAGIC);
            let flags = self.u16();
            let kind = self.u16();
            let cookie = self.u64();
            let offset = self.u64();
            let len = self.u64();
            assert!(len <= 64 << 20, "reply chunk of {len} bytes");
            (flags, kind, cookie, offset, self.bytes(len as usize))
        }

        /// The error of a chunk's payload, if it is an error chunk.
        pub fn chunk_error(kind: u16, payload: &[u8]) -> Option<u32> {
            (kind & (1 << 15) != 0).then(|| u32::from_be_bytes(payload[..4].try_into().unwrap()))
        }

        pub fn disconnect(mut self) {
            self.request(CMD_DISC, 0, 0, 0);
        }

        /// Whether the server closed the connection: end of file or a reset, as opposed
        /// to more data or silence.
        pub fn closed_by_server(&mut self) -> bool {
            let mut b = [0u8; 1];
            match self.s.read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => match e.kind() {
                    ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => true,
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => false,
                    _ => panic!("reading from the server: {e}"),
                },
            }
        }

        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            let mut b = vec![0u8; n];
            self.s.read_exact(&mut b).expect("read from the server");
            b
        }

        pub fn u16(&mut self) -> u16 {
            u16::from_be_bytes(self.bytes(2).try_into().unwrap())
        }

        pub fn u32(&mut self) -> u32 {
            u32::from_be_bytes(self.bytes(4).try_into().unwrap())
        }

        pub fn u64(&mut self) -> u64 {
            u64::from_be_bytes(self.bytes(8).try_into().unwrap())
        }
    }
}

use wire::Client;

/// The server is alive and serves a fresh client: handshake, write, read back.
fn assert_serving(s: &mut Served, after: &str) {
    s.assert_alive();
    let (mut c, size, _) = Client::open(s.port(), false);
    assert_eq!(size, 4 * M, "after {after}");
    let data = vec![0x42u8; 4096];
    c.write(7, 3 * M, &data);
    assert_eq!(c.simple_reply(), (0, 7), "write after {after}");
    assert_eq!(c.read(8, 3 * M, 4096), Ok(data), "read after {after}");
    c.disconnect();
}

// ---------------------------------------------------------------------------------------
// 5. Read-only export.

#[test]
fn read_only_export_refuses_writes() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "4M");
    ok(dir, QED, &["io", "-c", "write -P 0x5a 0 1M", "img.qed"]);
    let before = std::fs::read(dir.join("img.qed")).unwrap();

    let s = Served::start(dir, false, &["-t", "-r"], "img.qed");
    ok(dir, NBDINFO, &["--is", "read-only", &s.uri()]);
    qemu_io(
        dir,
        "raw",
        &s.uri(),
        true,
        &["read -P 0x5a 0 1M", "read -P 0 1M 3M"],
    );
    // QEMU honours the read-only flag on its side: it will not open the export for
    // writing, nor send a write on a read-only open.
    fails(
        dir,
        QEMU_IO,
        &["-f", "raw", "-c", "write -P 1 0 4k", &s.uri()],
    );
    let out = fails(
        dir,
        QEMU_IO,
        &["-f", "raw", "-r", "-c", "write -P 1 0 4k", &s.uri()],
    );
    assert!(out.contains("read-only"), "{out}");

    // So the server's own refusal is seen through a client that sends writes anyway.
    let (mut c, size, flags) = Client::open(s.port(), false);
    assert_eq!(size, 4 * M);
    assert_ne!(flags & wire::FLAG_READ_ONLY, 0);
    c.write(1, 0, &[0xffu8; 4096]);
    assert_eq!(c.simple_reply(), (wire::EPERM, 1), "NBD_CMD_WRITE");
    c.request(wire::CMD_WRITE_ZEROES, 2, 0, 65536);
    assert_eq!(c.simple_reply(), (wire::EPERM, 2), "NBD_CMD_WRITE_ZEROES");
    c.request(wire::CMD_TRIM, 3, 0, 65536);
    assert_eq!(c.simple_reply(), (wire::EPERM, 3), "NBD_CMD_TRIM");
    assert_eq!(c.read(4, 0, 4096), Ok(vec![0x5a; 4096]));
    c.disconnect();
    s.stop();

    assert!(
        std::fs::read(dir.join("img.qed")).unwrap() == before,
        "a read-only export changed the file"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Protocol abuse.

#[test]
fn malformed_clients_never_stop_the_server() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "4M");
    let mut s = Served::start(dir, false, &["-t", "-e", "2"], "img.qed");
    let port = s.port();
    assert_serving(&mut s, "start");

    // Garbage instead of the client flags.
    let mut c = Client::connect(port);
    c.bytes(18);
    c.send(&[0xa5; 64]);
    assert!(c.closed_by_server(), "garbage client flags");
    assert_serving(&mut s, "garbage client flags");

    // Garbage instead of an option.
    let mut c = Client::greet(port);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.closed_by_server(), "garbage option");
    assert_serving(&mut s, "garbage option");

    // An unknown option is refused and the haggling goes on.
    let mut c = Client::greet(port);
    c.option(0x7fff_0001, b"whatever");
    let (opt, kind, _) = c.option_reply();
    assert_eq!((opt, kind), (0x7fff_0001, wire::REP_ERR_UNSUP));
    c.go("");
    assert_eq!(c.read(1, 0, 512), Ok(vec![0; 512]));
    c.disconnect();

    // An option too long to accept but short enough to skip: NBD_REP_ERR_TOO_BIG.
    let mut c = Client::greet(port);
    c.option(0x7fff_0002, &vec![0x11; 100_000]);
    let (opt, kind, _) = c.option_reply();
    assert_eq!((opt, kind), (0x7fff_0002, wire::REP_ERR_TOO_BIG));
    c.go("");
    c.disconnect();

    // An option claiming ~4 GiB: dropped at once, not read.
    let mut c = Client::greet(port);
    let mut m = wire::IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    m.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    c.send(&m);
    assert!(c.closed_by_server(), "oversized option");
    assert_serving(&mut s, "oversized option");

    // A truncated request header, then the client leaves.
    let (mut c, _, _) = Client::open(port, false);
    c.send(&Client::header(wire::CMD_READ, 0, 1, 0, 512)[..10]);
    drop(c);
    assert_serving(&mut s, "truncated request");

    // A wrong request magic.
    let (mut c, _, _) = Client::open(port, false);
    let mut h = Client::header(wire::CMD_READ, 0, 1, 0, 512);
    h[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.send(&h);
    assert!(c.closed_by_server(), "wrong request magic");
    assert_serving(&mut s, "wrong request magic");

    // Garbage in transmission.
    let (mut c, _, _) = Client::open(port, false);
    c.send(&[0x5a; 100]);
    assert!(c.closed_by_server(), "garbage request");
    assert_serving(&mut s, "garbage request");

    // A write longer than the 32 MiB maximum payload: the server will not swallow it;
    // it says why, then hangs up.
    let (mut c, _, _) = Client::open(port, false);
    c.send(&Client::header(wire::CMD_WRITE, 0, 1, 0, (32 << 20) + 1));
    assert_eq!(c.simple_reply(), (wire::EINVAL, 1), "oversized write");
    assert!(c.closed_by_server(), "oversized write");
    assert_serving(&mut s, "oversized write");

    // Reads past the end, and an unknown command, are errors the connection survives.
    let (mut c, size, _) = Client::open(port, false);
    assert_eq!(c.read(1, size - 512, 1024), Err(wire::EINVAL));
    assert_eq!(c.read(2, size, 1), Err(wire::EINVAL));
    assert_eq!(c.read(3, u64::MAX - 100, 512), Err(wire::EINVAL));
    c.request(99, 4, 0, 512);
    assert_eq!(c.simple_reply(), (wire::EINVAL, 4), "unknown command");
    assert_eq!(c.read(5, size - 512, 512), Ok(vec![0; 512]));
    c.disconnect();

    // The same with structured replies: an error chunk carrying EINVAL.
    let (mut c, size, _) = Client::open(port, true);
    c.request(wire::CMD_READ, 9, size - 512, 1024);
    let (flags, kind, cookie, payload) = c.chunk();
    assert_eq!((flags & 1, kind, cookie), (1, wire::CHUNK_ERROR, 9));
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        wire::EINVAL
    );
    c.request(77, 10, 0, 0);
    assert_eq!(c.simple_reply(), (wire::EINVAL, 10), "unknown command");
    c.disconnect();

    // Writes past the end are refused after their payload is taken, so the stream stays
    // in step; a payload of exactly 32 MiB is within the limit and is taken too.
    let (mut c, size, _) = Client::open(port, false);
    c.write(1, size - 512, &[0x77; 1024]);
    assert_eq!(c.simple_reply(), (wire::ENOSPC, 1), "write past the end");
    c.write(2, 0, &vec![0x77; 32 << 20]);
    assert_eq!(
        c.simple_reply(),
        (wire::ENOSPC, 2),
        "32 MiB write past the end"
    );
    c.request(wire::CMD_WRITE_ZEROES, 3, size, 512);
    assert_eq!(c.simple_reply(), (wire::ENOSPC, 3), "zeroes past the end");
    c.request(wire::CMD_TRIM, 4, size - 512, 1024);
    assert_eq!(c.simple_reply(), (wire::EINVAL, 4), "trim past the end");
    // Block status needs a metadata context, which this client never selected.
    c.request(wire::CMD_BLOCK_STATUS, 5, 0, 512);
    assert_eq!(c.simple_reply(), (wire::EINVAL, 5), "block status");
    assert_eq!(c.read(6, size - 512, 512), Ok(vec![0; 512]));
    c.disconnect();

    // NBD_OPT_EXPORT_NAME cannot be refused with an error: the server hangs up.
    let mut c = Client::greet(port);
    c.option(wire::OPT_EXPORT_NAME, b"nosuch");
    assert!(c.closed_by_server(), "unknown export name");
    assert_serving(&mut s, "an unknown export name");

    // NBD_CMD_DISC behind pipelined writes: every write is done and answered first.
    let (mut c, _, _) = Client::open(port, false);
    for i in 0..16u64 {
        c.write(i, 2 * M + i * 4096, &[i as u8 + 1; 4096]);
    }
    c.request(wire::CMD_DISC, 99, 0, 0);
    let mut answered: Vec<u64> = (0..16)
        .map(|_| c.simple_reply())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, (0..16).collect::<Vec<u64>>());
    assert!(c.closed_by_server(), "no hang-up after NBD_CMD_DISC");
    let (mut c, _, _) = Client::open(port, false);
    for i in 0..16u64 {
        assert_eq!(
            c.read(i, 2 * M + i * 4096, 4096),
            Ok(vec![i as u8 + 1; 4096])
        );
    }
    c.disconnect();

    // A client that leaves in the middle of a write's payload: nothing is written.
    let (mut c, _, _) = Client::open(port, false);
    let mut m = Client::header(wire::CMD_WRITE, 0, 1, M, M as u32);
    m.extend_from_slice(&[0x99; 1000]);
    c.send(&m);
    drop(c);
    assert_serving(&mut s, "a half-sent write");
    let (mut c, _, _) = Client::open(port, false);
    assert_eq!(
        c.read(2, M, 4096),
        Ok(vec![0; 4096]),
        "a half-sent write landed"
    );
    c.disconnect();

    // A client that leaves with requests in flight and replies unread.
    let (mut c, _, _) = Client::open(port, false);
    for i in 0..32 {
        c.request(wire::CMD_READ, i, 0, 1 << 20);
    }
    drop(c);
    assert_serving(&mut s, "a client leaving with requests in flight");

    s.stop();
    qemu_img_check(dir, "img.qed");
}

/// Requests are put together from whatever pieces the socket brings: a header split
/// anywhere, a write's payload a little at a time with pauses, several requests in one
/// piece. A client that leaves in the middle of a payload costs nobody else anything.
#[test]
fn requests_in_pieces_are_put_back_together() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "4M");
    let mut s = Served::start(dir, false, &["-t"], "img.qed");
    let port = s.port();
    let (mut c, _, _) = Client::open(port, false);
    let data = test_bytes(200 << 10, 7);
    let mut m = Client::header(wire::CMD_WRITE, 0, 1, 8192, data.len() as u32);
    m.extend_from_slice(&data);
    let mut at = 0;
    for len in [3, 20, 6, 1, 4096, 9_999, 65_536].into_iter().cycle() {
        let end = (at + len).min(m.len());
        c.send(&m[at..end]);
        at = end;
        if at == m.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    assert_eq!(c.simple_reply(), (0, 1), "a write sent in pieces");
    let h = Client::header(wire::CMD_READ, 0, 2, 8192, data.len() as u32);
    c.send(&h[..5]);
    std::thread::sleep(Duration::from_millis(20));
    c.send(&h[5..]);
    assert_eq!(c.simple_reply(), (0, 2));
    assert!(c.bytes(data.len()) == data, "the data read back differs");
    // Three requests in one piece.
    let mut three = Vec::new();
    for cookie in 3..6u64 {
        three.extend(Client::header(
            wire::CMD_READ,
            0,
            cookie,
            cookie * 4096,
            4096,
        ));
    }
    c.send(&three);
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let (error, cookie) = c.simple_reply();
        assert_eq!(error, 0);
        let got = c.bytes(4096);
        let off = (cookie * 4096 - 8192) as usize;
        assert!(got == data[off..off + 4096], "read {cookie} differs");
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, vec![3, 4, 5]);
    c.disconnect();

    // A write's header and half its payload, then the client leaves.
    let (mut c, _, _) = Client::open(port, false);
    let mut m = Client::header(wire::CMD_WRITE, 0, 1, 0, 64 << 10);
    m.extend_from_slice(&[0x33; 32 << 10]);
    c.send(&m);
    std::thread::sleep(Duration::from_millis(20));
    drop(c);
    assert_serving(&mut s, "a client that left in the middle of a payload");
    let (mut c, _, _) = Client::open(port, false);
    assert_eq!(
        c.read(1, 0, 4096),
        Ok(vec![0; 4096]),
        "half a write was written"
    );
    c.disconnect();
}

#[test]
fn protocol_corners() {
    let tmp = new_dir();
    let dir = tmp.path();
    std::fs::write(dir.join("base.raw"), vec![0x3c; 64 * M as usize]).unwrap();
    ok(
        dir,
        QED,
        &["create", "-q", "-b", "base.raw", "-F", "raw", "top.qed"],
    );
    let len_before = std::fs::metadata(dir.join("top.qed")).unwrap().len();
    let s = Served::start(dir, false, &["-t", "-e", "2"], "top.qed");
    let port = s.port();

    // NBD_OPT_EXPORT_NAME has no error reply: an oversized one is answered by hanging up,
    // with no option reply first.
    let mut c = Client::greet(port);
    c.option(wire::OPT_EXPORT_NAME, &vec![b'x'; 100_000]);
    assert!(c.closed_by_server(), "oversized NBD_OPT_EXPORT_NAME");

    let (mut c, size, _) = Client::open(port, true);
    assert_eq!(size, 64 * M);
    // A read of nothing: one NONE chunk that ends the reply (a data chunk cannot be empty).
    c.request(wire::CMD_READ, 1, 4096, 0);
    assert_eq!(c.chunk(), (1, wire::CHUNK_NONE, 1, Vec::new()));
    // A read over the 32 MiB maximum inside the export: EINVAL (EOVERFLOW is for DF).
    c.request(wire::CMD_READ, 2, 0, 33 << 20);
    let (flags, kind, cookie, payload) = c.chunk();
    assert_eq!((flags & 1, kind, cookie), (1, wire::CHUNK_ERROR, 2));
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        wire::EINVAL
    );
    // FAST_ZERO on part of a cluster over backing data would copy the rest of the
    // cluster from the backing file: refused at once, nothing allocated.
    let fast = wire::FLAG_FAST_ZERO;
    c.send(&Client::header(wire::CMD_WRITE_ZEROES, fast, 3, 100, 1000));
    assert_eq!(c.simple_reply(), (wire::ENOTSUP, 3), "partial fast zero");
    let hole = fast | wire::FLAG_NO_HOLE;
    c.send(&Client::header(wire::CMD_WRITE_ZEROES, hole, 4, 0, 65536));
    assert_eq!(
        c.simple_reply(),
        (wire::ENOTSUP, 4),
        "fast zero without holes"
    );
    assert_eq!(
        std::fs::metadata(dir.join("top.qed")).unwrap().len(),
        len_before,
        "a refused fast zero allocated space"
    );
    // Whole clusters become zero clusters: metadata only, so fast.
    c.send(&Client::header(
        wire::CMD_WRITE_ZEROES,
        fast,
        5,
        M,
        M as u32,
    ));
    assert_eq!(c.simple_reply(), (0, 5), "whole-cluster fast zero");
    c.disconnect();

    let (mut c, _, _) = Client::open(port, false);
    assert_eq!(c.read(6, 0, 4096), Ok(vec![0x3c; 4096]));
    assert_eq!(c.read(7, M, 4096), Ok(vec![0; 4096]));
    assert_eq!(c.read(8, 33 << 20, 33 << 20), Err(wire::EINVAL));
    c.disconnect();
    s.stop();
    qemu_img_check(dir, "top.qed");
}

#[test]
fn stalled_handshake_does_not_block_others() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "4M");
    let mut s = Served::start(dir, false, &["-t", "-e", "3"], "img.qed");

    let mut stalled = Client::connect(s.port());
    stalled
        .s
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stalled.bytes(18);
    let since = Instant::now();
    // Another client sends an option a byte at a time: every byte is in time for a
    // read, but the handshake as a whole is not.
    let port = s.port();
    let trickler = std::thread::spawn(move || {
        let mut c = Client::greet(port);
        let mut m = wire::IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&wire::OPT_GO.to_be_bytes());
        m.extend_from_slice(&1000u32.to_be_bytes());
        c.send(&m);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(500));
            if c.s.write_all(&[0]).is_err() {
                break;
            }
        }
        start.elapsed()
    });

    // The third slot serves clients one after another while the first two sit.
    for i in 0..3 {
        let t = Instant::now();
        assert_serving(&mut s, &format!("client {i} next to a stalled handshake"));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    // The handshake timeout (10 s) frees the stalled slot.
    assert!(
        stalled.closed_by_server(),
        "the stalled client was never dropped"
    );
    let waited = since.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(15),
        "stalled client dropped after {waited:?}"
    );
    let trickled = trickler.join().unwrap();
    assert!(
        trickled < Duration::from_secs(16),
        "a client trickling an option was dropped only after {trickled:?}"
    );
    assert_serving(&mut s, "the stalled client was dropped");
    s.stop();
}

#[test]
fn a_client_that_never_reads_replies_blocks_no_one() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "4M");
    ok(dir, QED, &["io", "-c", "write -P 0x6b 0 1M", "img.qed"]);
    let mut s = Served::start(dir, false, &["-t", "-e", "2"], "img.qed");

    // Far more reply data than the socket buffers hold, none of it ever read.
    let (mut rogue, _, _) = Client::open(s.port(), false);
    for i in 0..256 {
        rogue.request(wire::CMD_READ, i, 0, M as u32);
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    assert_serving(&mut s, "a client stopped reading its replies");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );

    // Shutdown cannot wait forever for replies nobody reads.
    s.signal("TERM");
    let st = s.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "qed serve exited with {st}");
    assert!(!need_check(&dir.join("img.qed")));
    qemu_img_check(dir, "img.qed");
    drop(rogue);
}

// ---------------------------------------------------------------------------------------
// 7. Signals.

#[test]
fn signals_stop_the_server_cleanly_with_requests_in_flight() {
    for sig in ["TERM", "INT"] {
        let tmp = new_dir();
        let dir = tmp.path();
        create_qed(dir, "img.qed", "64M");
        let pid_file = dir.join("serve.pid");
        let pid_arg = pid_file.to_str().unwrap();
        let mut s = Served::start(
            dir,
            false,
            &["-t", "-e", "2", "--pid-file", pid_arg],
            "img.qed",
        );
        let written = std::fs::read_to_string(&pid_file).expect("the pid file exists");
        assert_eq!(written.trim(), s.pid().to_string());

        const WRITES: u64 = 256;
        const LEN: usize = 256 * K as usize;
        let pattern = |i: u64| (i % 250) as u8 + 1;
        // A client stuck in the handshake must not hold the shutdown up.
        let mut stalled = Client::connect(s.port());
        stalled.bytes(18);
        let (c, _, _) = Client::open(s.port(), false);
        let mut sender = Client {
            s: c.s.try_clone().unwrap(),
        };
        let mut receiver = c;
        let feeder = std::thread::spawn(move || {
            for i in 0..WRITES {
                let mut m = Client::header(wire::CMD_WRITE, 0, i, i * LEN as u64, LEN as u32);
                m.extend_from_slice(&vec![pattern(i); LEN]);
                // The server stops reading once signalled; the rest is simply refused.
                if sender.s.write_all(&m).is_err() {
                    break;
                }
                // A burst to have many in flight, then paced, so requests are still
                // arriving whenever the signal lands.
                if i >= WRITES / 2 {
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
        });
        // Signal once some writes are answered, with more still on their way.
        let first = receiver.simple_reply();
        assert_eq!(first.0, 0);
        // Allocating writes mark the image, so the clean bit afterwards means something.
        assert!(need_check(&dir.join("img.qed")), "NEED_CHECK is not set");
        s.signal(sig);
        let signalled = Instant::now();
        let mut acked = vec![first.1];
        loop {
            let mut b = [0u8; 16];
            match receiver.s.read_exact(&mut b) {
                Ok(()) => {
                    assert_eq!(b[..4], wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
                    assert_eq!(b[4..8], [0; 4], "a write failed during shutdown");
                    acked.push(u64::from_be_bytes(b[8..].try_into().unwrap()));
                }
                Err(_) => break,
            }
        }
        let st = s.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "SIG{sig}: qed serve exited with {st}");
        assert!(
            signalled.elapsed() < Duration::from_secs(4),
            "SIG{sig}: exit took {:?}",
            signalled.elapsed()
        );
        // The feeder was still sending: the server stopped taking requests.
        assert!(
            acked.len() < WRITES as usize,
            "SIG{sig}: every write was taken"
        );
        assert!(stalled.closed_by_server());
        feeder.join().unwrap();
        assert!(!pid_file.exists(), "SIG{sig}: the pid file is left behind");

        assert!(
            !need_check(&dir.join("img.qed")),
            "SIG{sig}: NEED_CHECK is set"
        );
        qemu_img_check(dir, "img.qed");
        let cmds: Vec<String> = acked
            .iter()
            .map(|&i| format!("read -P {} {} {LEN}", pattern(i), i * LEN as u64))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(dir, "qed", "img.qed", true, &cmds);
    }
}

// ---------------------------------------------------------------------------------------
// 8. Parallel connections.

#[test]
fn parallel_connections_all_land() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "img.qed", "32M");
    let s = Served::start(dir, true, &["-t", "-e", "4"], "img.qed");

    // Interleaved 1M stripes, so neighbouring clusters and shared L2 tables are
    // allocated by different connections at the same time.
    let stripes = |i: u64| (0..8).map(move |j| ((j * 4 + i) * M, 0x10 + i as u8));
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            let mut args = vec!["-f".to_string(), "raw".into()];
            for (off, p) in stripes(i) {
                args.extend(["-c".into(), format!("write -P {p} {off} 1M")]);
            }
            for (off, p) in stripes(i) {
                args.extend(["-c".into(), format!("read -P {p} {off} 1M")]);
            }
            args.push(s.uri());
            let child = Command::new(QEMU_IO)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run qemu-io: {e} (apt-get install qemu-utils)"));
            (args, child)
        })
        .collect();
    for (args, child) in clients {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{}",
            describe(QEMU_IO, &args, &out)
        );
    }
    s.stop();

    assert!(!need_check(&dir.join("img.qed")));
    qemu_img_check(dir, "img.qed");
    let cmds: Vec<String> = (0..4)
        .flat_map(stripes)
        .map(|(off, p)| format!("read -P {p} {off} 1M"))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, "qed", "img.qed", true, &cmds);
}

// ---------------------------------------------------------------------------------------
// Extended headers (NBD_OPT_EXTENDED_HEADERS): 64-bit lengths.

const G: u64 = 1 << 30;

/// The (length, flags) descriptors of a block status reply over extended headers, and
/// asserts the reply is one final BLOCK_STATUS_EXT chunk for context `id`.
fn ext_block_status(
    c: &mut Client,
    id: u32,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<(u64, u64)> {
    c.send(&Client::ext_header(
        wire::CMD_BLOCK_STATUS,
        0,
        cookie,
        offset,
        len,
    ));
    let (flags, kind, got, at, p) = c.ext_chunk();
    assert_eq!(
        (flags, kind, got, at),
        (1, wire::CHUNK_BLOCK_STATUS_EXT, cookie, offset)
    );
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), id);
    let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    assert_eq!(
        p.len(),
        8 + 16 * count,
        "descriptor count matches the length"
    );
    p[8..]
        .chunks(16)
        .map(|d| {
            (
                u64::from_be_bytes(d[..8].try_into().unwrap()),
                u64::from_be_bytes(d[8..].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn extended_headers_with_qemu_zero_and_map_beyond_4g_in_one_request() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "big.qed", "8G");
    qemu_io(
        dir,
        "qed",
        "big.qed",
        false,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x33 1G 1M",
            "write -P 0x22 7G 1M",
        ],
    );
    let s = Served::start(dir, false, &["-t", "-e", "4"], "big.qed");
    let port = s.port().to_string();

    let list = ok(dir, "qemu-nbd", &["--list", "-b", "127.0.0.1", "-p", &port]);
    assert!(list.contains("transaction size: 64-bit"), "{list}");

    // qemu's client negotiates extended headers and sends the 5 GiB zeroing whole.
    let uri = s.uri();
    let args = [
        "-f",
        "raw",
        "--trace",
        "nbd_send_request",
        "--trace",
        "nbd_receive_option_reply",
        "-c",
        "write -z -n -u 512M 5G",
        "-c",
        "read -P 0 1G 1M",
        "-c",
        "read -P 0x11 0 1M",
        "-c",
        "read -P 0x22 7G 1M",
        &uri,
    ];
    let out = run(dir, QEMU_IO, &args);
    let (stdout, trace) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && !stdout.contains("Pattern verification failed"),
        "{}",
        describe(QEMU_IO, &args, &out)
    );
    assert!(
        trace.contains("(extended headers), type 1 (ack)"),
        "extended headers not agreed:\n{trace}"
    );
    assert!(
        trace.contains(".from = 536870912, .len = 5368709120,") && trace.contains("(write zeroes)"),
        "the zeroing was not one request:\n{trace}"
    );
    assert!(stdout.contains("wrote 5368709120/5368709120"), "{stdout}");

    // Block status over the whole 8 GiB in one request: the hole between 1 MiB and
    // 7 GiB is one descriptor longer than 4 GiB.
    let (mut c, size, id) = Client::open_extended(s.port());
    assert_eq!(size, 8 * G);
    let map = ext_block_status(&mut c, id, 1, 0, 8 * G);
    assert!(
        map.iter().any(|&(len, flags)| len > 4 * G && flags == 3),
        "{map:?}"
    );
    assert_eq!(map.first(), Some(&(M, 0)), "{map:?}");
    assert_eq!(map.iter().map(|d| d.0).sum::<u64>(), 8 * G, "{map:?}");
    c.disconnect();

    // A client without extended headers (libnbd 1.14's nbdinfo asks for none) sees the
    // same map in 32-bit extents.
    let info = ok(dir, NBDINFO, &[&uri]);
    assert!(info.contains("using structured packets"), "{info}");
    let compact = nbdinfo_map(&ok(dir, NBDINFO, &["--map", &uri]));
    let ranges: Vec<(u64, u64)> = compact.iter().map(|&(o, l, _)| (o, l)).collect();
    assert_eq!(ranges.first(), Some(&(0, M)), "{compact:?}");
    assert_eq!(
        compact.last().map(|&(o, l, _)| o + l),
        Some(8 * G),
        "{compact:?}"
    );
    assert!(
        compact.iter().any(|&(o, _, v)| o == 7 * G && v == 0),
        "{compact:?}"
    );
    s.stop();
    qemu_img_check(dir, "big.qed");
}

#[test]
fn extended_requests_and_replies_on_the_wire() {
    let tmp = new_dir();
    let dir = tmp.path();
    create_qed(dir, "big.qed", "6G");
    let s = Served::start(dir, false, &["-t"], "big.qed");

    // Duplicates and downgrades are refused; EXPORT_NAME after it is a hang-up.
    let mut c = Client::greet(s.port());
    c.option(wire::OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(c.option_reply().1, wire::REP_ERR_INVALID);
    c.option(wire::OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply().1, wire::REP_ACK);
    c.option(wire::OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply().1, wire::REP_ERR_INVALID);
    c.option(wire::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, wire::REP_ERR_EXT_HEADER_REQD);
    c.option(wire::OPT_EXPORT_NAME, &[]);
    assert!(c.closed_by_server());

    let (mut c, size, id) = Client::open_extended(s.port());
    assert_eq!(size, 6 * G);
    // A write says its payload length; the reply is an extended NONE chunk that
    // repeats the offset.
    let data = test_bytes(128 * K as usize, 9);
    let mut m = Client::ext_header(
        wire::CMD_WRITE,
        wire::FLAG_PAYLOAD_LEN,
        5,
        5 * G,
        data.len() as u64,
    );
    m.extend_from_slice(&data);
    c.send(&m);
    assert_eq!(c.ext_chunk(), (1, wire::CHUNK_NONE, 5, 5 * G, vec![]));
    // Reads come back as extended data (and hole) chunks.
    c.send(&Client::ext_header(
        wire::CMD_READ,
        0,
        6,
        5 * G,
        2 * data.len() as u64,
    ));
    let mut back = Vec::new();
    loop {
        let (flags, kind, cookie, offset, p) = c.ext_chunk();
        assert_eq!((cookie, offset), (6, 5 * G));
        match kind {
            wire::CHUNK_OFFSET_DATA => back.extend_from_slice(&p[8..]),
            wire::CHUNK_OFFSET_HOLE => {
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap());
                back.resize(back.len() + n as usize, 0);
            }
            k => panic!("chunk type {k}"),
        }
        if flags & 1 != 0 {
            break;
        }
    }
    assert_eq!(&back[..data.len()], &data[..]);
    assert!(back[data.len()..].iter().all(|&b| b == 0));
    assert_eq!(back.len(), 2 * data.len());

    // Zeroing 5 GiB whole, then its status in one descriptor.
    c.send(&Client::ext_header(wire::CMD_WRITE_ZEROES, 0, 7, 0, 5 * G));
    assert_eq!(c.ext_chunk(), (1, wire::CHUNK_NONE, 7, 0, vec![]));
    let map = ext_block_status(&mut c, id, 8, 0, 5 * G);
    assert_eq!(map, vec![(5 * G, 3)]);
    // Trim past 4 GiB too, and a zero write past the end is refused with ENOSPC.
    c.send(&Client::ext_header(wire::CMD_TRIM, 0, 9, G, 4 * G + 512));
    assert_eq!(c.ext_chunk(), (1, wire::CHUNK_NONE, 9, G, vec![]));
    c.send(&Client::ext_header(
        wire::CMD_WRITE_ZEROES,
        0,
        10,
        G,
        5 * G + 1,
    ));
    let (flags, kind, cookie, _, p) = c.ext_chunk();
    assert_eq!((flags, cookie), (1, 10));
    assert_eq!(Client::chunk_error(kind, &p), Some(wire::ENOSPC));

    // A read longer than the payload limit is refused, and the connection goes on.
    c.send(&Client::ext_header(wire::CMD_READ, 0, 11, 0, 5 * G));
    let (_, kind, cookie, _, p) = c.ext_chunk();
    assert_eq!(
        (cookie, Client::chunk_error(kind, &p)),
        (11, Some(wire::EINVAL))
    );
    // A payload where the command takes none is read and refused.
    let mut m = Client::ext_header(wire::CMD_TRIM, wire::FLAG_PAYLOAD_LEN, 12, 0, 100);
    m.extend_from_slice(&[0xee; 100]);
    c.send(&m);
    let (_, kind, cookie, _, p) = c.ext_chunk();
    assert_eq!(
        (cookie, Client::chunk_error(kind, &p)),
        (12, Some(wire::EINVAL))
    );
    c.send(&Client::ext_header(wire::CMD_READ, 0, 13, 5 * G, 4096));
    let (flags, kind, cookie, _, p) = c.ext_chunk();
    assert_eq!((flags, kind, cookie), (1, wire::CHUNK_OFFSET_DATA, 13));
    assert_eq!(&p[8..], &data[..4096]);
    // A payload over the limit cannot be skipped: refused, then the client is dropped.
    c.send(&Client::ext_header(
        wire::CMD_WRITE,
        wire::FLAG_PAYLOAD_LEN,
        14,
        0,
        5 * G,
    ));
    let (_, kind, cookie, _, p) = c.ext_chunk();
    assert_eq!(
        (cookie, Client::chunk_error(kind, &p)),
        (14, Some(wire::EINVAL))
    );
    assert!(c.closed_by_server());

    // A compact header after extended headers were agreed is a broken client.
    let (mut c, _, _) = Client::open_extended(s.port());
    c.send(&Client::header(wire::CMD_READ, 0, 1, 0, 4096));
    c.send(&[0u8; 4]);
    assert!(c.closed_by_server());

    // Without them, the same server answers compact requests as before.
    let (mut c, _, _) = Client::open(s.port(), false);
    assert_eq!(c.read(1, 5 * G, 4096), Ok(data[..4096].to_vec()));
    c.disconnect();
    s.stop();
    qemu_img_check(dir, "big.qed");
}
