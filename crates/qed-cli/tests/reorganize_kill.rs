//! Kills during online compaction and defragmentation: `qed serve --discard=unmap
//! --control` serves an image whose data is scattered and partly discarded; fio writes
//! over NBD (`verify=crc32c`, `do_verify=0`: random 4 KiB writes at depth 8 on eight
//! connections, each flushing every 2, 16, 128 or 512 writes); a compaction or a
//! defragmentation is started through the control socket; and the server is killed with
//! SIGKILL at a random moment of the job. Then:
//!
//! - `qemu-img check` and `qed check` find no corruption (leaks are what a kill leaves,
//!   and both must count the same);
//! - `qed check -r all` succeeds and leaves the image clean, as `qemu-img check` finds;
//! - every write flushed before the kill reads back through QEMU's own QED driver, and
//!   nothing else changed.
//!
//! **Which writes were flushed.** fio knows which of its writes completed, not which a
//! flush covered: a verify pass from its saved state would demand every completed
//! write, where the engine promises only flushed ones (L2 entries are written back at
//! flushes, see "Write ordering" in docs/design.md). So fio talks to the server through
//! a relay in this test, which passes every byte on unchanged and records, per
//! connection, each write (its offset and a hash of each sector of its data), when the
//! server's reply to it arrived, and when each flush was passed on and whether it
//! succeeded. By the NBD protocol a successful flush covers every write the server
//! replied to before it received the flush: a write whose reply the relay saw before
//! it passed a successful flush on was flushed. After the kill each sector must then
//! hold one of the writes to it that the newest flushed one does not supersede (one the
//! server replied to before it received that one is older), or, when no write to it was
//! flushed, also what it held before the run. Sectors fio did not write must hold
//! exactly what they held before. Only a connection's own flushes count, though the
//! server offers multi-conn: that demands less than the server promises, never more.
//!
//! Each test runs one job to its end first (and kills the server right after), which
//! measures how long a job takes; each kill after it comes at a uniformly random moment
//! of that time, which the kills keep correcting. The RNG is seeded. Runs start from
//! copies of one template, each compaction afresh (the repair after a kill compacts
//! too), defragmentations every third run, the others on what the last kill and repair
//! left. Each run first discards a scattered eighth of the clusters through NBD, so that
//! the job also meets clusters freed in the running server, not only leaks.
//!
//! `QED_REORGANIZE_KILLS=N` sets the kills per job type (default 20);
//! `QED_REORGANIZE_SEED=N` picks other random moments, writes and discards.

use serde_json::Value;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;

use common::served::Served;
use common::{describe, ok, run, FIO, QED, QEMU_IMG, QEMU_IO};

const M: u64 = 1 << 20;
const G: u64 = 1 << 30;
/// 64 KiB clusters and 4-cluster tables (QEMU's defaults): one L2 table maps 2 GiB.
/// (With 16 KiB clusters, QEMU's check would count a leak that is not there in a file
/// of a few hundred MiB: its rounding, see docs/design.md.)
const CLUSTER: u64 = 64 << 10;
const TABLE_SPAN: u64 = 2 * G;
/// The guest's data lies in slices, one in the span of each of several L2 tables, so
/// that the jobs move tables too (one table would sit at the front of the file for
/// good).
const SLICES: u64 = 8;
const SLICE: u64 = 64 * M;
/// The bytes of all slices: what the test keeps of the guest.
const DATA: u64 = SLICES * SLICE;
const VIRTUAL_SIZE: u64 = SLICES * TABLE_SPAN;
const SECTOR: usize = 512;
/// The signal `Child::kill` sends on Unix.
const SIGKILL: i32 = 9;
/// fio's jobs (one NBD connection each), one per slice.
const FIO_JOBS: u64 = SLICES;

/// The guest offset of byte `i` of the slices.
fn guest(i: u64) -> u64 {
    i / SLICE * TABLE_SPAN + i % SLICE
}

/// Where guest offset `off` is in the slices, if it is in one.
fn in_slices(off: u64) -> Option<u64> {
    (off % TABLE_SPAN < SLICE).then_some(off / TABLE_SPAN * SLICE + off % TABLE_SPAN)
}

// ---------------------------------------------------------------------------------------
// The images.

/// splitmix64.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0) % n
    }
}

/// A directory in memory when the system has one: a process kill does not lose the page
/// cache, so a disk adds nothing but time.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qed-reorganize-kill")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

/// Runs `qed io` on `image` with `cmds`, a few thousand at a time.
fn qed_io(dir: &Path, image: &str, cmds: &[String]) {
    for chunk in cmds.chunks(2000) {
        let mut args = vec!["io".to_string()];
        for c in chunk {
            args.extend(["-c".to_string(), c.clone()]);
        }
        args.push(image.to_string());
        ok(dir, QED, &args);
    }
}

/// Writes `template.qed`: the slices full of distinct bytes (the file holds them in guest
/// order, each slice after its table), every other cluster discarded, compacted offline
/// (which moves the last slices' clusters into the holes, out of guest order and away
/// from their tables), then a scattered third of the rest discarded. So a compaction has
/// holes to fill and tables to move down, and a defragmentation has clusters out of
/// order and tables to gather. Returns what the slices read.
fn make_template(dir: &Path) -> Vec<u8> {
    let mut bytes = vec![0u8; DATA as usize];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(i as u64 ^ 0x7e57).to_le_bytes());
    }
    let pattern = std::fs::File::create(dir.join("pattern.raw")).unwrap();
    pattern.set_len(VIRTUAL_SIZE).unwrap();
    for (k, slice) in bytes.chunks(SLICE as usize).enumerate() {
        pattern
            .write_all_at(slice, guest(k as u64 * SLICE))
            .unwrap();
    }
    drop(pattern);
    ok(
        dir,
        QEMU_IMG,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qed",
            "-o",
            "cluster_size=64k,table_size=4",
            "pattern.raw",
            "template.qed",
        ],
    );
    std::fs::remove_file(dir.join("pattern.raw")).unwrap();
    let clusters = DATA / CLUSTER;
    let discard = |which: &dyn Fn(u64) -> bool, bytes: &mut Vec<u8>| {
        let picked: Vec<u64> = (0..clusters).filter(|&c| which(c)).collect();
        let cmds: Vec<String> = picked
            .iter()
            .map(|c| format!("discard {} {CLUSTER}", guest(c * CLUSTER)))
            .collect();
        qed_io(dir, "template.qed", &cmds);
        for c in picked {
            bytes[(c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize].fill(0);
        }
    };
    discard(&|c| c % 2 == 1, &mut bytes);
    ok(dir, QED, &["compact", "template.qed"]);
    discard(&|c| c % 2 == 0 && mix(c) % 3 == 0, &mut bytes);
    // What was discarded offline stays in the file as leaks, which the jobs find as
    // holes; the template must be otherwise consistent.
    let out = run(dir, QEMU_IMG, &["check", "-f", "qed", "template.qed"]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        describe(QEMU_IMG, &["check", "template.qed"], &out)
    );
    bytes
}

/// The slices as QEMU reads them; asserts that QEMU finds no data outside them.
fn read_with_qemu(dir: &Path, image: &str, what: &str) -> Vec<u8> {
    let map: Value = serde_json::from_str(&ok(
        dir,
        QEMU_IMG,
        &["map", "-f", "qed", "--output=json", image],
    ))
    .unwrap();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert!(
            e["data"] == false || start % TABLE_SPAN + len <= SLICE,
            "{what}: data outside the slices: {e}"
        );
    }
    ok(
        dir,
        QEMU_IMG,
        &["convert", "-f", "qed", "-O", "raw", image, "contents.raw"],
    );
    let raw = std::fs::File::open(dir.join("contents.raw")).unwrap();
    assert_eq!(raw.metadata().unwrap().len(), VIRTUAL_SIZE);
    let mut bytes = vec![0u8; DATA as usize];
    for (k, slice) in bytes.chunks_mut(SLICE as usize).enumerate() {
        raw.read_exact_at(slice, guest(k as u64 * SLICE)).unwrap();
    }
    std::fs::remove_file(dir.join("contents.raw")).unwrap();
    bytes
}

// ---------------------------------------------------------------------------------------
// The relay between fio and the server.

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR: u32 = 1 << 31;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// What a sector is compared by: the relay keeps only this of each write's data
/// (SipHash with fixed keys, the same for the relay and the check).
fn sector_hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// One write as the relay saw it. Times are ticks of the relay's clock, one for every
/// event of every connection, taken in the order the events happened.
#[derive(Debug)]
struct WriteSeen {
    offset: u64,
    /// A hash of each sector of its data.
    sectors: Vec<u64>,
    /// Passed on to the server.
    sent: u64,
    /// The server's reply arrived.
    replied: Option<u64>,
    ok: bool,
}

#[derive(Debug)]
struct FlushSeen {
    /// Passed on to the server.
    sent: u64,
    /// The server replied without an error.
    ok: bool,
}

/// A request waiting for its reply.
#[derive(Debug)]
enum Pending {
    Write(usize),
    Flush(usize),
    /// A read, with its length (a simple reply carries that many bytes of data).
    Read(u32),
    Other,
}

/// What the relay saw on one connection.
#[derive(Debug, Default)]
struct ConnLog {
    writes: Vec<WriteSeen>,
    flushes: Vec<FlushSeen>,
    pending: HashMap<u64, Pending>,
    /// Cookies whose structured reply carried an error chunk.
    failed: Vec<u64>,
}

impl ConnLog {
    /// When the last flush that succeeded was passed on (0 if none did): every write
    /// replied to before it is durable.
    fn flushed_until(&self) -> u64 {
        self.flushes
            .iter()
            .filter(|f| f.ok)
            .map(|f| f.sent)
            .max()
            .unwrap_or(0)
    }

    fn complete(&mut self, cookie: u64, ok: bool, now: u64) {
        match self.pending.remove(&cookie) {
            Some(Pending::Write(i)) => {
                let w = &mut self.writes[i];
                w.replied = Some(now);
                w.ok = ok;
            }
            Some(Pending::Flush(i)) => self.flushes[i].ok = ok,
            Some(Pending::Read(_) | Pending::Other) => {}
            None => panic!("a reply to cookie {cookie:#x}, which no request carries"),
        }
    }
}

type Shared<T> = Arc<Mutex<T>>;

/// Listens on a Unix socket and relays each connection to the server's, recording
/// writes, replies and flushes.
struct Relay {
    path: PathBuf,
    clock: Arc<AtomicU64>,
    conns: Shared<Vec<Shared<ConnLog>>>,
    threads: Shared<Vec<JoinHandle<()>>>,
    /// What went wrong in the relay other than the server's end (which is expected).
    errors: Shared<Vec<String>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// The relay's clock.
fn tick(clock: &AtomicU64) -> u64 {
    clock.fetch_add(1, Ordering::SeqCst) + 1
}

/// The end of a connection: the server was killed, or the client left.
fn ended(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected
    )
}

fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_vec(r: &mut impl Read, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

impl Relay {
    fn start(path: PathBuf, upstream: PathBuf) -> Relay {
        let listener = UnixListener::bind(&path).unwrap();
        let clock = Arc::new(AtomicU64::new(0));
        let conns: Shared<Vec<Shared<ConnLog>>> = Shared::default();
        let threads: Shared<Vec<JoinHandle<()>>> = Shared::default();
        let errors: Shared<Vec<String>> = Shared::default();
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (clock, conns, threads, errors, stop) = (
                clock.clone(),
                conns.clone(),
                threads.clone(),
                errors.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let client = client.unwrap();
                    let log = Shared::<ConnLog>::default();
                    conns.lock().unwrap().push(log.clone());
                    let (clock, errors, upstream) =
                        (clock.clone(), errors.clone(), upstream.clone());
                    threads.lock().unwrap().push(std::thread::spawn(move || {
                        let server = match UnixStream::connect(&upstream) {
                            Ok(s) => s,
                            Err(e) => {
                                errors.lock().unwrap().push(format!("connecting: {e}"));
                                return;
                            }
                        };
                        if let Err(e) = relay(client, server, &log, &clock) {
                            if !ended(&e) {
                                errors.lock().unwrap().push(e.to_string());
                            }
                        }
                    }));
                }
            })
        };
        Relay {
            path,
            clock,
            conns,
            threads,
            errors,
            stop,
            accept: Some(accept),
        }
    }

    fn now(&self) -> u64 {
        tick(&self.clock)
    }

    /// Writes seen so far, and flushes that succeeded, per connection.
    fn progress(&self) -> Vec<(usize, usize)> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                let c = c.lock().unwrap();
                (c.writes.len(), c.flushes.iter().filter(|f| f.ok).count())
            })
            .collect()
    }

    /// Stops listening, waits for every connection to end, and returns their logs.
    fn finish(mut self) -> Vec<ConnLog> {
        self.stop.store(true, Ordering::SeqCst);
        drop(UnixStream::connect(&self.path));
        self.accept.take().unwrap().join().unwrap();
        for t in std::mem::take(&mut *self.threads.lock().unwrap()) {
            t.join().expect("a relay thread panicked");
        }
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "the relay failed: {errors:?}");
        std::mem::take(&mut *self.conns.lock().unwrap())
            .into_iter()
            .map(|c| std::mem::take(&mut *c.lock().unwrap()))
            .collect()
    }
}

/// Relays one connection: the handshake in lockstep (the client waits for each option's
/// replies), then requests one way and replies the other, each on its own thread.
fn relay(
    client: UnixStream,
    server: UnixStream,
    log: &Shared<ConnLog>,
    clock: &Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client.try_clone()?;
    let mut from_server = BufReader::new(server.try_clone()?);
    let mut to_server = server.try_clone()?;
    let bad = |what: String| std::io::Error::new(ErrorKind::InvalidData, what);

    // NBDMAGIC, IHAVEOPT, handshake flags; then the client's flags.
    let greeting: [u8; 18] = read_array(&mut from_server)?;
    to_client.write_all(&greeting)?;
    let flags: [u8; 4] = read_array(&mut from_client)?;
    to_server.write_all(&flags)?;
    loop {
        let head: [u8; 16] = read_array(&mut from_client)?;
        if be64(&head[0..8]) != IHAVEOPT {
            return Err(bad(format!("an option without IHAVEOPT: {head:02x?}")));
        }
        let (opt, len) = (be32(&head[8..12]), be32(&head[12..16]));
        if matches!(opt, OPT_EXPORT_NAME | OPT_STARTTLS) {
            return Err(bad(format!(
                "option {opt}, which the relay does not follow"
            )));
        }
        let data = read_vec(&mut from_client, len as usize)?;
        to_server.write_all(&head)?;
        to_server.write_all(&data)?;
        if opt == OPT_ABORT {
            return Ok(());
        }
        let last = loop {
            let head: [u8; 20] = read_array(&mut from_server)?;
            let (kind, len) = (be32(&head[12..16]), be32(&head[16..20]));
            let data = read_vec(&mut from_server, len as usize)?;
            to_client.write_all(&head)?;
            to_client.write_all(&data)?;
            if kind == REP_ACK || kind & REP_ERR != 0 {
                break kind;
            }
        };
        if opt == OPT_GO && last == REP_ACK {
            break;
        }
    }

    let replies = {
        let (log, clock) = (log.clone(), clock.clone());
        let (client, server) = (client.try_clone()?, server.try_clone()?);
        std::thread::spawn(move || {
            let r = relay_replies(&mut from_server, &mut to_client, &log, &clock);
            // The server is gone (or the client left): end both sides, so that fio
            // sees the failure instead of waiting.
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = server.shutdown(std::net::Shutdown::Both);
            r
        })
    };
    let r = relay_requests(&mut from_client, &mut to_server, log, clock);
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = server.shutdown(std::net::Shutdown::Both);
    let r2 = replies.join().expect("the reply relay panicked");
    r.and(r2)
}

fn relay_requests(
    from_client: &mut impl Read,
    to_server: &mut UnixStream,
    log: &Shared<ConnLog>,
    clock: &AtomicU64,
) -> std::io::Result<()> {
    let mut to_server = BufWriter::new(to_server);
    loop {
        let head: [u8; 28] = read_array(from_client)?;
        if be32(&head[0..4]) != REQUEST_MAGIC {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("a request without its magic: {head:02x?}"),
            ));
        }
        let kind = be16(&head[6..8]);
        let (cookie, offset, len) = (be64(&head[8..16]), be64(&head[16..24]), be32(&head[24..28]));
        let data = if kind == CMD_WRITE {
            read_vec(from_client, len as usize)?
        } else {
            Vec::new()
        };
        {
            // Recorded before it is passed on: a reply recorded earlier arrived before
            // the server could see this request.
            let mut log = log.lock().unwrap();
            let now = tick(clock);
            let pending = match kind {
                CMD_WRITE => {
                    assert!(
                        offset % SECTOR as u64 == 0 && data.len() % SECTOR == 0,
                        "a write of {len} bytes at {offset:#x}: the check follows whole sectors"
                    );
                    log.writes.push(WriteSeen {
                        offset,
                        sectors: data.chunks(SECTOR).map(sector_hash).collect(),
                        sent: now,
                        replied: None,
                        ok: false,
                    });
                    Pending::Write(log.writes.len() - 1)
                }
                CMD_FLUSH => {
                    log.flushes.push(FlushSeen {
                        sent: now,
                        ok: false,
                    });
                    Pending::Flush(log.flushes.len() - 1)
                }
                CMD_READ => Pending::Read(len),
                _ => Pending::Other,
            };
            if kind != CMD_DISC {
                log.pending.insert(cookie, pending);
            }
        }
        to_server.write_all(&head)?;
        to_server.write_all(&data)?;
        to_server.flush()?;
        if kind == CMD_DISC {
            return Ok(());
        }
    }
}

fn relay_replies(
    from_server: &mut impl Read,
    to_client: &mut UnixStream,
    log: &Shared<ConnLog>,
    clock: &AtomicU64,
) -> std::io::Result<()> {
    loop {
        let magic: [u8; 4] = read_array(from_server)?;
        let mut out = magic.to_vec();
        match be32(&magic) {
            SIMPLE_REPLY_MAGIC => {
                let rest: [u8; 12] = read_array(from_server)?;
                out.extend_from_slice(&rest);
                let (error, cookie) = (be32(&rest[0..4]), be64(&rest[4..12]));
                let mut log = log.lock().unwrap();
                if let (Some(Pending::Read(len)), 0) = (log.pending.get(&cookie), error) {
                    out.extend(read_vec(from_server, *len as usize)?);
                }
                let now = tick(clock);
                log.complete(cookie, error == 0, now);
            }
            STRUCTURED_REPLY_MAGIC => {
                let rest: [u8; 16] = read_array(from_server)?;
                out.extend_from_slice(&rest);
                let (flags, kind) = (be16(&rest[0..2]), be16(&rest[2..4]));
                let (cookie, len) = (be64(&rest[4..12]), be32(&rest[12..16]));
                out.extend(read_vec(from_server, len as usize)?);
                let mut log = log.lock().unwrap();
                if kind & REPLY_TYPE_ERROR_BIT != 0 {
                    log.failed.push(cookie);
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    let failed = log.failed.contains(&cookie);
                    log.failed.retain(|&c| c != cookie);
                    let now = tick(clock);
                    log.complete(cookie, !failed, now);
                }
            }
            other => {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("a reply with magic {other:#x}"),
                ))
            }
        }
        to_client.write_all(&out)?;
    }
}

// ---------------------------------------------------------------------------------------
// The server and its control socket.

/// A control connection: QMP-shaped JSON lines.
struct Control {
    out: UnixStream,
    lines: BufReader<UnixStream>,
}

impl Control {
    fn connect(path: &Path) -> Control {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Control {
            out: s.try_clone().unwrap(),
            lines: BufReader::new(s),
        };
        c.read();
        assert_eq!(
            c.ask(r#"{"execute":"qmp_capabilities"}"#)["return"],
            serde_json::json!({})
        );
        c
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("control line ({e}): {line:?}"))
    }

    fn ask(&mut self, line: &str) -> Value {
        self.out.write_all(format!("{line}\n").as_bytes()).unwrap();
        self.read()
    }

    /// The one job, as `query-jobs` lists it.
    fn job(&mut self) -> Value {
        let r = self.ask(r#"{"execute":"query-jobs"}"#);
        let jobs = r["return"].as_array().unwrap_or_else(|| panic!("{r}"));
        assert_eq!(jobs.len(), 1, "{r}");
        jobs[0].clone()
    }
}

// ---------------------------------------------------------------------------------------
// The runs.

/// Counts, for the summary and for the assertions that the runs did what they meant to.
#[derive(Default, Debug)]
struct Stats {
    runs: u64,
    /// Kills that came while the job was running.
    killed_running: u64,
    /// The job's progress at those kills, as a share of its total, summed (percent).
    progress_at_kill: u64,
    /// Kills that left NEED_CHECK set.
    need_check: u64,
    leaks_before_repair: u64,
    /// Leaks the repair could only punch (see docs/design.md).
    unfillable_leaks: u64,
    writes: u64,
    writes_during_job: u64,
    flushes: u64,
    /// Sectors whose last flushed write was found (itself or a later write).
    durable_sectors: u64,
    /// Sectors holding a write no flush covered.
    unflushed_sectors: u64,
    /// Sectors fio wrote that hold what they held before the run (no flushed write).
    unchanged_sectors: u64,
}

/// `qemu-img check --output=json`; asserts no corruption and no check errors; returns
/// the leaks and the exit code.
fn qemu_img_check(dir: &Path, what: &str) -> (u64, i32) {
    let args = ["check", "-f", "qed", "--output=json", "img.qed"];
    let out = run(dir, QEMU_IMG, &args);
    let q: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{what}: {}", describe(QEMU_IMG, &args, &out)));
    let count = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0);
    assert!(
        count("corruptions") == 0 && count("check-errors") == 0,
        "{what}: {}",
        describe(QEMU_IMG, &args, &out)
    );
    (count("leaks"), out.status.code().unwrap_or(-1))
}

/// `qed check --output=json` (with `repair`, `-r all`); returns its JSON and exit code.
fn qed_check(dir: &Path, repair: bool, what: &str) -> (Value, i32, String) {
    let mut args = vec!["check", "--output=json"];
    if repair {
        args.extend(["-r", "all"]);
    }
    args.push("img.qed");
    let out = run(dir, QED, &args);
    let q: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{what}: {}", describe(QED, &args, &out)));
    (
        q,
        out.status.code().unwrap_or(-1),
        describe(QED, &args, &out),
    )
}

/// Checks the image QEMU reads (`after`) against what it held before the run (`before`)
/// and what the relay saw (`conns`), sector by sector, as the module's comment says.
fn verify(before: &[u8], after: &[u8], conns: &[ConnLog], what: &str, stats: &mut Stats) {
    // Whether each write was flushed: replied to, without an error, before a flush that
    // succeeded was passed on, on its connection.
    let durable: Vec<Vec<bool>> = conns
        .iter()
        .map(|c| {
            let until = c.flushed_until();
            c.writes
                .iter()
                .map(|w| w.ok && w.replied.is_some_and(|r| r < until))
                .collect()
        })
        .collect();
    // Per sector, the writes covering it: (connection, write, sector within the write).
    let mut written: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); DATA as usize / SECTOR];
    for (c, log) in conns.iter().enumerate() {
        for (i, w) in log.writes.iter().enumerate() {
            let end = w.offset + (w.sectors.len() * SECTOR) as u64 - 1;
            let (Some(at), Some(_)) = (in_slices(w.offset), in_slices(end)) else {
                panic!("{what}: fio wrote at {:#x}, outside the slices", w.offset);
            };
            let first = at as usize / SECTOR;
            for k in 0..w.sectors.len() {
                written[first + k].push((c, i, k));
            }
        }
    }
    let write = |&(c, i, _): &(usize, usize, usize)| &conns[c].writes[i];
    for (s, ws) in written.iter().enumerate() {
        let range = s * SECTOR..(s + 1) * SECTOR;
        let (got, old) = (&after[range.clone()], &before[range]);
        if ws.is_empty() {
            assert!(
                got == old,
                "{what}: guest offset {:#x}, which no write of the run touched, changed",
                guest((s * SECTOR) as u64)
            );
            continue;
        }
        // The newest flushed write: one the server replied to before it received that
        // one is older, and must not show.
        let newest = ws
            .iter()
            .filter(|e| durable[e.0][e.1])
            .map(|e| write(e).sent)
            .max();
        let current = |e: &&(usize, usize, usize)| {
            newest.is_none_or(|n| write(e).replied.is_none_or(|r| r > n))
        };
        let h = sector_hash(got);
        let found = ws
            .iter()
            .filter(current)
            .any(|e| write(e).sectors[e.2] == h);
        match (found, newest) {
            (true, Some(_)) => stats.durable_sectors += 1,
            (true, None) => stats.unflushed_sectors += 1,
            (false, None) if got == old => stats.unchanged_sectors += 1,
            _ => {
                let at = guest((s * SECTOR) as u64);
                let older = ws.iter().any(|e| write(e).sectors[e.2] == h);
                panic!(
                    "{what}: guest offset {at:#x} (cluster {}) holds {}; {} writes covered it, \
                     the newest flushed one passed on at {newest:?}",
                    at / CLUSTER,
                    if older {
                        "a write older than a flushed one"
                    } else if got == old {
                        "what it held before the run: a flushed write was lost"
                    } else {
                        "bytes of no write of the run, nor what it held before"
                    },
                    ws.len()
                );
            }
        }
    }
}

/// fio on the relay's socket until the server dies (the runtime is only a bound): a job
/// per slice, each writing random 4 KiB blocks with crc32c verify headers and flushing
/// every `fsync[job]` writes.
fn start_fio(dir: &Path, relay: &Path, fsync: &[u64], seed: u64) -> Child {
    let out = std::fs::File::create(dir.join("fio.out")).unwrap();
    let mut cmd = Command::new(FIO);
    // Options before the first --name apply to every job.
    cmd.arg("--ioengine=nbd")
        .arg(format!("--uri=nbd+unix:///?socket={}", relay.display()))
        .args(["--rw=randwrite", "--bs=4k", "--iodepth=8"])
        .args(["--verify=crc32c", "--do_verify=0"])
        .arg(format!("--randseed={seed}"))
        .args(["--time_based", "--runtime=120"]);
    for (k, n) in fsync.iter().enumerate() {
        cmd.arg(format!("--name=slice{k}"))
            .arg(format!("--offset={}", guest(k as u64 * SLICE)))
            .arg(format!("--size={SLICE}"))
            .arg(format!("--fsync={n}"));
    }
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run fio: {e}{}", common::install_hint(FIO)))
}

/// When to kill the server after starting the job.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// As soon as the job has concluded.
    Concluded,
    After(Duration),
}

/// What a run found.
struct RunEnd {
    /// What the guest reads now.
    contents: Vec<u8>,
    /// How long the job ran, for [`KillAt::Concluded`].
    ran: Option<Duration>,
    /// Whether the job was still running at the kill, and its progress then.
    running: bool,
    done: u64,
    total: u64,
}

/// One run on `dir/img.qed`, whose guest reads `before`: discards through NBD, fio,
/// the job, the kill, the checks and the verification.
fn run_once(
    dir: &Path,
    kind: &str,
    mut before: Vec<u8>,
    kill_at: KillAt,
    rng: &mut Rng,
    what: &str,
    stats: &mut Stats,
) -> RunEnd {
    let mut clock = Instant::now();
    let mut phases = Vec::new();
    let mut phase = |name: &'static str| {
        phases.push((name, clock.elapsed()));
        clock = Instant::now();
    };
    let server = Served::with_control(dir, &["-e", "32", "--discard=unmap"], "img.qed");
    let nbd = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", nbd.display());

    // Free a scattered eighth of the clusters in the running server, durably; the job
    // finds them in the free set.
    let mut cmds = Vec::new();
    for c in 0..DATA / CLUSTER {
        if rng.below(8) == 0 {
            let at = guest(c * CLUSTER);
            cmds.extend(["-c".to_string(), format!("discard {at} {CLUSTER}")]);
            before[(c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize].fill(0);
        }
    }
    cmds.extend(["-c".to_string(), "flush".to_string()]);
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    args.extend(cmds);
    args.push(uri);
    ok(dir, QEMU_IO, &args);
    phase("discards");

    let relay_path = dir.join("relay.sock");
    let _ = std::fs::remove_file(&relay_path);
    let relay = Relay::start(relay_path.clone(), nbd);
    // Connections that flush often, and some that flush so rarely that what the job
    // swapped in memory waits long for the next flush to write it back.
    let fsync: Vec<u64> = (0..FIO_JOBS)
        .map(|_| [2, 16, 128, 512][rng.below(4) as usize])
        .collect();
    let mut fio = start_fio(dir, &relay_path, &fsync, 1 + rng.below(1 << 30));

    // Writes on every connection, and flushed ones on most, before the job starts
    // moving them.
    let t = Instant::now();
    loop {
        let p = relay.progress();
        // fio also opens a connection per job that only asks for the size.
        let writing = p.iter().filter(|&&(w, _)| w >= 256).count() as u64;
        let flushed = p.iter().filter(|&&(_, f)| f >= 1).count() as u64;
        if writing == FIO_JOBS && flushed >= FIO_JOBS / 2 {
            break;
        }
        if let Some(st) = fio.try_wait().unwrap() {
            panic!(
                "{what}: fio ended ({st}):\n{}",
                std::fs::read_to_string(dir.join("fio.out")).unwrap_or_default()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: fio is too slow: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    phase("fio's first writes");
    let mut ctl = Control::connect(&dir.join("ctl.sock"));
    let job_start = relay.now();
    let r = ctl.ask(&format!(r#"{{"execute":"{kind}"}}"#));
    assert!(r["return"]["id"].is_string(), "{what}: {r}");
    let started = Instant::now();
    let mut ran = None;
    let job = match kill_at {
        KillAt::Concluded => loop {
            let j = ctl.job();
            if j["status"] == "concluded" {
                ran = Some(started.elapsed());
                break j;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{what}: {j}");
            std::thread::sleep(Duration::from_millis(2));
        },
        KillAt::After(d) => {
            std::thread::sleep(d);
            ctl.job()
        }
    };
    let mut server = server;
    let st = server.kill();
    assert_eq!(
        st.signal(),
        Some(SIGKILL),
        "{what}: qed serve ended on its own ({st}):\n{}",
        server.log()
    );
    assert!(
        job.get("error").is_none(),
        "{what}: the job failed: {job}\n{}",
        server.log()
    );
    let (done, total) = (
        job["current-progress"].as_u64().unwrap(),
        job["total-progress"].as_u64().unwrap(),
    );
    let what = format!(
        "{what} (killed with the job {} at {done}/{total})",
        job["status"]
    );
    phase("job");
    if job["status"] == "running" {
        stats.killed_running += 1;
        stats.progress_at_kill += done * 100 / total.max(1);
    }

    // fio must notice that the server is gone, and was writing all along.
    let fio_status = common::exited_within(&mut fio, Duration::from_secs(30));
    if fio_status.is_none() {
        let _ = fio.kill();
        let _ = fio.wait();
    }
    let fio_out = std::fs::read_to_string(dir.join("fio.out")).unwrap_or_default();
    assert!(
        fio_status.is_some_and(|s| !s.success()),
        "{what}: fio did not fail with the server gone ({fio_status:?}):\n{fio_out}"
    );
    let conns = relay.finish();
    phase("fio's end");
    stats.runs += 1;
    stats.writes += conns.iter().map(|c| c.writes.len() as u64).sum::<u64>();
    stats.writes_during_job += conns
        .iter()
        .flat_map(|c| &c.writes)
        .filter(|w| w.sent > job_start)
        .count() as u64;
    stats.flushes += conns.iter().map(|c| c.flushes.len() as u64).sum::<u64>();

    // Before the repair: leaks only.
    let img = dir.join("img.qed");
    if common::need_check(&img) {
        stats.need_check += 1;
    }
    let (leaks, _) = qemu_img_check(dir, &format!("{what}, before the repair"));
    stats.leaks_before_repair += leaks;
    let (q, code, described) = qed_check(dir, false, &what);
    assert!(
        matches!(code, 0 | 3) && q["corruptions"].as_u64().unwrap_or(0) == 0,
        "{what}: qed check found more than leaks before the repair: {described}"
    );
    assert_eq!(
        q["leaks"].as_u64().unwrap_or(0),
        leaks,
        "{what}: qed check and qemu-img check count different leaks: {described}"
    );

    // The repair, and a clean image after it.
    let (q, code, described) = qed_check(dir, true, &what);
    let left = q["leaks"].as_u64().unwrap_or(0);
    assert!(
        code == if left == 0 { 0 } else { 3 }
            && q["corruptions-fixed"].as_u64().unwrap_or(0) == 0
            && q["corruptions"].as_u64().unwrap_or(0) == 0,
        "{what}: {described}"
    );
    if left > 0 {
        // Only the case docs/design.md names may stay: leaked clusters below an L2
        // table, with no hole below big enough for the table, punched out but still
        // unreferenced. A second repair finds exactly those and can only punch them.
        let args = ["check", "-r", "all", "img.qed"];
        let out = run(dir, QED, &args);
        let text = String::from_utf8_lossy(&out.stdout);
        let punched = text
            .lines()
            .find(|l| l.contains(" leaked clusters could not be filled"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        assert_eq!(
            punched,
            Some(left),
            "{what}: {} leaks left after the repair, not all of them unfillable: {}",
            left,
            describe(QED, &args, &out)
        );
        stats.unfillable_leaks += left;
    }
    assert!(
        !common::need_check(&img),
        "{what}: the repair left NEED_CHECK set"
    );
    let (leaks, code) = qemu_img_check(dir, &format!("{what}, after the repair"));
    assert!(
        leaks == left && code == if left == 0 { 0 } else { 3 },
        "{what}: qemu-img check after the repair: {leaks} leaks (ours: {left}), exit {code}"
    );

    phase("checks");
    let after = read_with_qemu(dir, "img.qed", &what);
    phase("reading");
    verify(&before, &after, &conns, &what, stats);
    phase("verifying");
    eprintln!("{what}: {phases:?}");
    RunEnd {
        contents: after,
        ran,
        running: job["status"] == "running",
        done,
        total,
    }
}

/// A number from the environment, or `default`.
fn env_number(name: &str, default: u64) -> u64 {
    qed_testkit::settings::env_u64(name).unwrap_or(default)
}

/// Kills of `kind`'s jobs, on a fresh image every `per_image` kills.
fn kills_during(kind: &str, per_image: u64, seed: u64) {
    let start = Instant::now();
    let tmp = scratch_dir();
    let dir = tmp.path();
    let template = make_template(dir);
    let setting = env_number("QED_REORGANIZE_SEED", 0);
    let seed = seed + 1000 * setting;
    // Printed first, so that a failed run shows it: the setting, as it is passed back.
    println!("{kind}: QED_REORGANIZE_SEED={setting}");
    let mut rng = Rng(seed);
    let mut stats = Stats::default();

    let fresh = || {
        std::fs::copy(dir.join("template.qed"), dir.join("img.qed")).unwrap();
        template.clone()
    };
    // The first run lets the job finish, which says how long a job takes here.
    let end = run_once(
        dir,
        kind,
        fresh(),
        KillAt::Concluded,
        &mut rng,
        &format!("{kind}, run to its end"),
        &mut stats,
    );
    let ran = end.ran.unwrap();
    let mut contents = end.contents;
    // Kills come at a uniformly random moment of most of how long a job is thought to
    // take, which each kill corrects: one after the job's end says it is shorter, one
    // in its middle extrapolates from its progress. A machine busy with other work
    // changes how long a job takes, and most kills must still come while it runs.
    let mut estimate = ran.as_micros() as u64;
    let kills = env_number("QED_REORGANIZE_KILLS", 20);
    for k in 1..=kills {
        if (k - 1) % per_image == 0 {
            contents = fresh();
        }
        let at = rng.below(estimate * 9 / 10 + 1);
        let what = format!("{kind}, kill {k} of {kills}, {at} µs into the job");
        let end = run_once(
            dir,
            kind,
            contents,
            KillAt::After(Duration::from_micros(at)),
            &mut rng,
            &what,
            &mut stats,
        );
        let seen = match (end.running, end.done) {
            (false, _) => at,
            (true, 0) => estimate,
            (true, done) => at.saturating_mul(end.total) / done,
        };
        estimate = ((estimate + seen) / 2).max(1000);
        contents = end.contents;
    }
    println!(
        "{kind} (QED_REORGANIZE_SEED={setting}): a whole job took {ran:?}; {stats:?}; {:?} in all",
        start.elapsed()
    );
    // The runs must have tested what they claim to.
    assert!(
        stats.killed_running * 2 >= kills,
        "{kind}: most kills came after the job ended: {stats:?}"
    );
    assert!(
        stats.durable_sectors > 0 && stats.writes_during_job > 0,
        "{kind}: nothing flushed, or nothing written while the job ran: {stats:?}"
    );
}

#[test]
fn kills_during_online_compaction_under_fio() {
    // The repair after a kill compacts too (it moves clusters into leaked space), which
    // would leave the next compaction little to do: every run starts afresh.
    kills_during("compact", 1, 1);
}

#[test]
fn kills_during_online_defragmentation_under_fio() {
    kills_during("defrag", 3, 2);
}
