//! The host cache: chunks of remote objects kept on local disk and shared by every
//! process on the host, so that a base read by many overlays crosses the network once.
//!
//! Layout, under the cache's directory:
//!
//! ```text
//! CACHEDIR.TAG            marks the directory as a cache for backup tools
//! usage                   bytes stored since the last prune (8 bytes), and its locks
//! objects/ID/meta         what the object is (URL, ETag or Last-Modified, size, chunk)
//! objects/ID/claims       byte N locked while a process fetches chunk N
//! objects/ID/c-INDEX      one chunk: a header (index, length, digests) and its bytes
//! objects/ID/tmp-...      a chunk being written, never read
//! ```
//!
//! `ID` is a digest of the object's address *and* its version (ETag, else
//! Last-Modified) and size, and of the chunk size: a chunk of an older version is never
//! looked up for a newer one. A chunk becomes visible only by a rename once whole, and
//! is trusted only when its header matches and its checksum (XXH3-128) checks, so a
//! process killed mid-write, or a crash that lost part of a file, leaves nothing another
//! process believes. The checksum guards against accidents, not against someone who can
//! write the directory: such a one could as well write a matching digest of any kind.
//! Claims are OFD locks: whoever holds a chunk's byte fetches it, the others wait for its
//! claim to be let go, and a killed fetcher releases its claim with its last
//! descriptor. The cache is bounded: stores are counted in `usage`, and past the bound
//! one process prunes the least recently used chunks (reads refresh a chunk's time). A
//! process reading a chunk while it is pruned keeps reading it: the file goes when its
//! last descriptor does. Nothing here fails a read: a cache that cannot be written is
//! left, with one warning, and reads go to the network.

use super::options::{HostCacheOptions, RemoteReport};
use crate::storage::lock::{byte_locked_elsewhere, try_lock_byte, unlock_byte};
use crate::storage::DirectSpan;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use twox_hash::XxHash3_128;

/// Bytes before a chunk's data in its file: the part that names the chunk
/// ([`NAMED`] bytes), its checksum (16), and 16 bytes of zeros.
const HEADER: usize = 64;
const NAMED: usize = 32;
const MAGIC: &[u8; 8] = b"QEDCHNK\x02";
/// The byte of `claims` every process with the object open holds shared, so that a
/// prune knows which objects are in use. Far above any chunk's index.
const IN_USE_BYTE: u64 = 1 << 62;
/// The bytes of `usage` that guard its counter, and that one pruner holds.
const COUNTER_LOCK: u64 = 64;
const PRUNE_LOCK: u64 = 65;
/// A prune starts once the cache holds this share of its bound, and leaves
/// [`PRUNE_TO_PERCENT`], so that stores rarely find the cache full and the next prune is
/// not one store away.
const PRUNE_AT_PERCENT: u64 = 90;
const PRUNE_TO_PERCENT: u64 = 75;
/// A chunk read this long after its last refresh has its time refreshed: the order of
/// eviction needs no finer grain, and each refresh is a write.
const TOUCH_AFTER: Duration = Duration::from_secs(30);
/// Temporary files older than this are left by dead processes.
const STALE_TMP: Duration = Duration::from_secs(600);
/// The first and the longest pause between two looks at a chunk another process is
/// fetching. A fetch takes a millisecond on loopback and tens over a real link, and every
/// look is a wakeup: in a boot storm, shorter pauses spent the CPU the fetchers and the
/// guests need (the pauses once started at 50 µs and stopped at 500 µs, and waiting
/// took most of the waiters' CPU time).
const FIRST_POLL: Duration = Duration::from_micros(500);
const MAX_POLL: Duration = Duration::from_micros(5000);

/// Whether the one warning about an unusable cache was given, for the whole process.
static WARNED: AtomicBool = AtomicBool::new(false);

/// The chunks of a remote object that were fetched, by index.
pub(crate) type Chunks = Vec<(u64, Arc<[u8]>)>;

/// One object's part of the host cache, open for a process's reads.
#[derive(Debug)]
pub(crate) struct ObjectCache {
    root: PathBuf,
    dir: PathBuf,
    /// Of the object's key; every chunk header carries its first bytes.
    digest: [u8; 32],
    chunk: u64,
    size: u64,
    claims: File,
    usage: File,
    max_bytes: u64,
    /// Cleared when a store failed: the rest of this process's reads skip the disk.
    storing: AtomicBool,
    /// Set while this process prunes.
    pruning: Arc<AtomicBool>,
    /// How long to wait for another process's fetch before fetching anyway.
    wait_limit: Duration,
    report: RemoteReport,
    tmp_seq: AtomicU64,
    /// Chunk files this process has checked, by index, with the inode and mtime they
    /// had: a chunk read again here (a working set larger than the memory cache) is not
    /// hashed again while its file is the same, unchanged one. Files are only replaced
    /// whole, by rename (another inode), and a write in place changes the mtime.
    /// Bounded: past [`MAX_VERIFIED`] entries, chunks are checked every time.
    verified: std::sync::Mutex<std::collections::HashMap<u64, (u64, i64, i64)>>,
    /// Checked chunk files this process read from lately, open: a slot per
    /// `index % slots`, each locked alone, so that readers of different chunks do
    /// not wait for each other.
    files: Vec<std::sync::Mutex<Option<OpenChunk>>>,
}

/// Most chunks remembered as checked: tens of MiB at most.
const MAX_VERIFIED: usize = 1 << 20;
/// Most chunk files one object keeps open for [`ObjectCache::read_checked`]; fewer when
/// the process may open fewer files (a quarter of its limit).
const MAX_OPEN_FILES: usize = 8192;

/// How many chunk files an object may keep open in this process.
fn open_file_slots() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass, nothing else.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    usize::try_from(soft / 4)
        .unwrap_or(MAX_OPEN_FILES)
        .clamp(16, MAX_OPEN_FILES)
}

/// What tells one chunk file from another, or from itself changed: inode and mtime.
fn file_id(meta: &fs::Metadata) -> (u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (meta.ino(), meta.mtime(), meta.mtime_nsec())
}

/// A checked chunk file kept open.
#[derive(Debug)]
struct OpenChunk {
    index: u64,
    file: Arc<File>,
    /// When its time was last refreshed.
    touched: Instant,
}

/// A chunk this process fetches, claimed from the others until dropped.
struct Claim<'a> {
    cache: &'a ObjectCache,
    index: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let _ = unlock_byte(self.cache.claims.as_raw_fd(), self.index);
    }
}

/// Says once per process that the cache is not used, and why.
fn warn_once(report: &RemoteReport, dir: &Path, why: &dyn std::fmt::Display) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        report.say(&format!(
            "the host cache in {} cannot be used ({why}); reading from the network only",
            dir.display()
        ));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the `meta` file of an object says, one `field: value` line each.
fn meta_text(name: &str, key: &str, size: u64, chunk: u64) -> String {
    let clean = |s: &str| s.replace(['\n', '\r'], " | ");
    format!(
        "qed host cache object 1\nname: {}\nkey: {}\nsize: {size}\nchunk: {chunk}\n",
        clean(name),
        clean(key)
    )
}

impl ObjectCache {
    /// Opens (creating what is missing) the part of the cache at `opts` for the object
    /// `key` names (address, version and size), read in chunks of `chunk` bytes. `name`
    /// is how the user named it. `None`, after one warning, when the directory cannot be
    /// used.
    pub(crate) fn open(
        opts: &HostCacheOptions,
        name: &str,
        key: &str,
        size: u64,
        chunk: u64,
        wait_limit: Duration,
        report: &RemoteReport,
    ) -> Option<Self> {
        let digest: [u8; 32] = Sha256::digest(format!("{key}\n{chunk}").as_bytes()).into();
        let root = opts.dir.clone();
        let dir = root
            .join("objects")
            .join(format!("{}-{}k", &hex(&digest)[..32], chunk >> 10));
        let opened = (|| -> io::Result<(File, File)> {
            fs::create_dir_all(&dir)?;
            let tag = root.join("CACHEDIR.TAG");
            if !tag.exists() {
                let _ = fs::write(
                    &tag,
                    "Signature: 8a477f597d28d172789f06886806bc55\n\
                     # This is the qed host cache of remote images' chunks.\n",
                );
            }
            let meta = dir.join("meta");
            if !meta.exists() {
                let tmp = dir.join(format!("tmp-meta-{}", std::process::id()));
                fs::write(&tmp, meta_text(name, key, size, chunk))?;
                fs::rename(&tmp, &meta)?;
            }
            let open_rw = |p: PathBuf| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(p)
            };
            let claims = open_rw(dir.join("claims"))?;
            let usage = open_rw(root.join("usage"))?;
            // Shared by every process reading the object: a prune leaves its directory.
            lock_shared(&claims, IN_USE_BYTE)?;
            Ok((claims, usage))
        })();
        match opened {
            Ok((claims, usage)) => Some(Self {
                root,
                dir,
                digest,
                chunk,
                size,
                claims,
                usage,
                max_bytes: opts.max_bytes,
                storing: AtomicBool::new(true),
                pruning: Arc::new(AtomicBool::new(false)),
                wait_limit,
                report: report.clone(),
                tmp_seq: AtomicU64::new(0),
                verified: std::sync::Mutex::new(std::collections::HashMap::new()),
                files: (0..open_file_slots())
                    .map(|_| std::sync::Mutex::new(None))
                    .collect(),
            }),
            Err(e) => {
                warn_once(report, &opts.dir, &e);
                None
            }
        }
    }

    fn chunk_len(&self, index: u64) -> u64 {
        self.size.saturating_sub(index * self.chunk).min(self.chunk)
    }

    fn chunk_path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("c-{index:012x}"))
    }

    /// The header a chunk's file starts with.
    /// The header of chunk `index` holding `data`.
    fn header(&self, index: u64, data: &[u8]) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..NAMED].copy_from_slice(&self.name_part(index, data.len()));
        // A fast checksum: every process checks every chunk it takes from disk once, and
        // a boot storm's processes do so at the pace of the fetches.
        h[NAMED..NAMED + 16].copy_from_slice(&XxHash3_128::oneshot(data).to_le_bytes());
        h
    }

    /// The part of chunk `index`'s header that says which chunk it is: magic, index,
    /// length and the object's digest.
    fn name_part(&self, index: u64, len: usize) -> [u8; NAMED] {
        let mut h = [0u8; NAMED];
        h[..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&index.to_le_bytes());
        h[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        h[24..32].copy_from_slice(&self.digest[..8]);
        h
    }

    /// Whether chunk `index` is on disk, stored by another process (or this one), and
    /// sound: its header names it and its checksum holds (checked once in this process,
    /// while the file stays the same one). This process then reads it in place
    /// ([`ObjectCache::read_checked`]); it is not copied into memory, which in a boot storm
    /// would cost every process a copy of every chunk. A damaged file is removed.
    fn look_on_disk(&self, index: u64) -> bool {
        let path = self.chunk_path(index);
        let Ok(f) = File::open(&path) else {
            return false;
        };
        let len = self.chunk_len(index) as usize;
        let Ok(meta) = f.metadata() else {
            return false;
        };
        let mut head = [0u8; HEADER];
        let sound = meta.len() == (HEADER + len) as u64
            && f.read_exact_at(&mut head, 0).is_ok()
            && head[..NAMED] == self.name_part(index, len)
            && (self.was_verified(index, file_id(&meta))
                || CHECK_BUF.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    buf.resize(len, 0);
                    f.read_exact_at(&mut buf[..len], HEADER as u64).is_ok()
                        && head[NAMED..NAMED + 16]
                            == XxHash3_128::oneshot(&buf[..len]).to_le_bytes()
                }));
        if !sound {
            // Torn by a crash or damaged: it would only be refused again.
            let _ = fs::remove_file(&path);
            return false;
        }
        self.used(index, &f, &meta);
        let file = Arc::new(f);
        *self.slot(index).lock().unwrap_or_else(|p| p.into_inner()) = Some(OpenChunk {
            index,
            file,
            touched: Instant::now(),
        });
        true
    }

    /// Chunk `index` from disk, if another process (or this one) stored it and it
    /// checks: the bytes, for tests to look at.
    #[cfg(test)]
    fn load(&self, index: u64) -> Option<Arc<[u8]>> {
        let path = self.chunk_path(index);
        let f = File::open(&path).ok()?;
        let len = self.chunk_len(index) as usize;
        let meta = f.metadata().ok()?;
        let mut head = [0u8; HEADER];
        let mut data = Arc::<[u8]>::new_uninit_slice(len);
        for b in Arc::get_mut(&mut data)?.iter_mut() {
            b.write(0);
        }
        // SAFETY: every byte was written just above.
        let mut data: Arc<[u8]> = unsafe { data.assume_init() };
        let buf = Arc::get_mut(&mut data)?;
        let sound = meta.len() == (HEADER + len) as u64
            && f.read_exact_at(&mut head, 0).is_ok()
            && f.read_exact_at(buf, HEADER as u64).is_ok()
            && (self.was_verified(index, file_id(&meta)) || head == self.header(index, buf));
        if !sound {
            // Torn by a crash or damaged: it would only be refused again.
            let _ = fs::remove_file(&path);
            return None;
        }
        self.used(index, &f, &meta);
        Some(data)
    }

    /// Reads `out.len()` bytes at `within` of chunk `index` straight from its file,
    /// when this process has checked that file already ([`ObjectCache::load`]): a read
    /// of a working set larger than the memory cache costs a read of what it asks, as a
    /// local base would, not a copy of its whole chunk. `false` when it cannot.
    ///
    /// The checked files are kept open: a chunk file is never written in place, only
    /// replaced by a rename (the open one keeps its bytes, the same ones), so an open
    /// file checked once stays right.
    pub(crate) fn read_checked(&self, index: u64, within: u64, out: &mut [u8]) -> bool {
        match self.checked_file(index, within, out.len() as u64) {
            Some(file) => file.read_exact_at(out, HEADER as u64 + within).is_ok(),
            None => false,
        }
    }

    /// Where the `len` bytes at `within` of chunk `index` are in its file, for a caller
    /// that reads them itself (io_uring), on the terms of [`ObjectCache::read_checked`].
    pub(crate) fn span_checked(&self, index: u64, within: u64, len: u64) -> Option<DirectSpan> {
        let file = self.checked_file(index, within, len)?;
        Some(DirectSpan {
            fd: file.as_raw_fd(),
            offset: HEADER as u64 + within,
            align: 1,
            keep: Some(file),
        })
    }

    /// The open, checked file of chunk `index`, if this process has checked it, and the
    /// range `within..within + len` is inside the chunk; refreshes its time now and then.
    fn checked_file(&self, index: u64, within: u64, len: u64) -> Option<Arc<File>> {
        if within + len > self.chunk_len(index) {
            return None;
        }
        let now = Instant::now();
        let slot = self.slot(index);
        let cached = {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_mut() {
                Some(open) if open.index == index => {
                    let stale = now.duration_since(open.touched) > TOUCH_AFTER;
                    if stale {
                        open.touched = now;
                    }
                    Some((open.file.clone(), stale))
                }
                _ => None,
            }
        };
        match cached {
            Some((file, stale)) => {
                if stale {
                    let _ = file.set_modified(SystemTime::now());
                }
                Some(file)
            }
            None => {
                // A chunk never checked here (not on disk, or only in memory when stores
                // failed) costs no failed open on every read.
                if !self.verified_index(index) {
                    return None;
                }
                let f = File::open(self.chunk_path(index)).ok()?;
                let meta = f.metadata().ok()?;
                // Not this process's checked file: the whole chunk is checked first.
                if !self.was_verified(index, file_id(&meta)) {
                    return None;
                }
                let file = Arc::new(f);
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(OpenChunk {
                    index,
                    file: file.clone(),
                    touched: now,
                });
                Some(file)
            }
        }
    }

    fn slot(&self, index: u64) -> &std::sync::Mutex<Option<OpenChunk>> {
        &self.files[(index % self.files.len() as u64) as usize]
    }

    /// Refreshes the time of chunk `index`'s file `f` (found as `meta`) when it is old
    /// enough to matter to eviction, and remembers the file as checked.
    fn used(&self, index: u64, f: &File, meta: &fs::Metadata) {
        let stale = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_none_or(|age| age > TOUCH_AFTER);
        if stale && f.set_modified(SystemTime::now()).is_ok() {
            if let Ok(now) = f.metadata() {
                self.verified(index, file_id(&now));
            }
        } else {
            self.verified(index, file_id(meta));
        }
    }

    fn verified_index(&self, index: u64) -> bool {
        let map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(&index)
    }

    fn was_verified(&self, index: u64, file_id: (u64, i64, i64)) -> bool {
        let map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&index) == Some(&file_id)
    }

    fn verified(&self, index: u64, file_id: (u64, i64, i64)) {
        let mut map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() < MAX_VERIFIED || map.contains_key(&index) {
            map.insert(index, file_id);
        }
    }

    /// Claims chunk `index` for this process to fetch; `None` when another process
    /// holds it. A file system without locks gives every claim: each process then
    /// fetches for itself, as without the cache.
    fn claim(&self, index: u64) -> Option<Claim<'_>> {
        match try_lock_byte(self.claims.as_raw_fd(), index) {
            Ok(false) => None,
            _ => Some(Claim { cache: self, index }),
        }
    }

    /// Writes chunk `index` for every process; a failure turns storing off, once.
    pub(crate) fn store(&self, index: u64, data: &[u8]) {
        if !self.storing.load(Ordering::Relaxed) || !self.reserve((HEADER + data.len()) as u64) {
            return;
        }
        let tmp = self.dir.join(format!(
            "tmp-{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(&self.header(index, data))?;
            f.write_all(data)?;
            drop(f);
            fs::rename(&tmp, self.chunk_path(index))
        })();
        match written {
            Ok(()) => {}
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                self.storing.store(false, Ordering::Relaxed);
                warn_once(&self.report, &self.root, &e);
            }
        }
    }

    /// Counts `n` bytes about to be stored in the shared counter, if they fit in the
    /// bound; `false` (the chunk is not stored: the bound is kept whatever the timing)
    /// when they do not, or when the counter cannot be had. Past [`PRUNE_AT_PERCENT`]
    /// of the bound, starts a prune in the background, so that stores rarely find the
    /// cache full.
    fn reserve(&self, n: u64) -> bool {
        let counted = with_byte_lock(&self.usage, COUNTER_LOCK, || {
            let mut b = [0u8; 8];
            let was = match self.usage.read_exact_at(&mut b, 0) {
                Ok(()) => u64::from_le_bytes(b),
                Err(_) => 0,
            };
            let now = was.saturating_add(n);
            if now > self.max_bytes {
                return Ok((false, was));
            }
            self.usage.write_all_at(&now.to_le_bytes(), 0)?;
            Ok((true, now))
        });
        let Some((fits, total)) = counted else {
            return false;
        };
        if total.saturating_add(n) > self.max_bytes / 100 * PRUNE_AT_PERCENT {
            self.start_prune();
        }
        fits
    }

    /// Prunes in a thread of its own, unless this process is pruning already: walking
    /// the cache takes a while, and the read that tipped it over does not wait.
    fn start_prune(&self) {
        if !self.pruning.swap(true, Ordering::AcqRel) {
            let root = self.root.clone();
            let max = self.max_bytes;
            let pruning = self.pruning.clone();
            let spawned = std::thread::Builder::new()
                .name("qed-cache-prune".into())
                .spawn(move || {
                    let _ = prune_host_cache(&root, max);
                    pruning.store(false, Ordering::Release);
                });
            // A prune cut short when the process ends leaves the cache smaller, never
            // past its bound (stores are counted before they are made): not waited for.
            if spawned.is_err() {
                self.pruning.store(false, Ordering::Release);
            }
        }
    }

    /// Chunks `first..first + count`: fetched with `wire` (which fetches adjacent
    /// chunks in one request) and stored where this process claims them, waited for
    /// where another is fetching them, and from disk where another process stored them.
    /// Chunks on disk that this process may read in place from now on
    /// ([`ObjectCache::read_checked`]) are left out: copying them into memory would cost
    /// every process of a boot storm a copy of every chunk.
    pub(crate) fn fetch_through(
        &self,
        first: u64,
        count: u64,
        wire: &dyn Fn(u64, u64) -> io::Result<Chunks>,
    ) -> io::Result<Chunks> {
        let mut got: Chunks = Vec::with_capacity(count as usize);
        let mut mine: Vec<Claim<'_>> = Vec::new();
        let mut busy = Vec::new();
        for index in first..first + count {
            if self.look_on_disk(index) {
                continue;
            }
            match self.claim(index) {
                // Another process may have finished it between the look and the claim.
                Some(claim) => {
                    if !self.look_on_disk(index) {
                        mine.push(claim);
                    }
                }
                None => busy.push(index),
            }
        }
        let mut i = 0;
        while i < mine.len() {
            let start = mine[i].index;
            let mut n = 1;
            while i + (n as usize) < mine.len() && mine[i + n as usize].index == start + n {
                n += 1;
            }
            for (index, data) in wire(start, n)? {
                self.store(index, &data);
                got.push((index, data));
            }
            i += n as usize;
        }
        drop(mine);
        for index in busy {
            if let Some(d) = self.await_chunk(index, wire)? {
                got.push((index, d));
            }
        }
        got.sort_unstable_by_key(|(index, _)| *index);
        Ok(got)
    }

    /// Chunk `index`, which another process is fetching: on disk once it is stored
    /// (`None` when adopted there, see [`ObjectCache::fetch_through`]), or fetched here
    /// if that process let go of it without storing it (it failed or died) or takes
    /// longer than the wait limit.
    fn await_chunk(
        &self,
        index: u64,
        wire: &dyn Fn(u64, u64) -> io::Result<Chunks>,
    ) -> io::Result<Option<Arc<[u8]>>> {
        let started = Instant::now();
        let mut pause = FIRST_POLL;
        let claim = loop {
            // While the fetcher holds its claim, a look at the lock is all a poll costs.
            if !matches!(
                byte_locked_elsewhere(self.claims.as_raw_fd(), index),
                Ok(true)
            ) {
                if self.look_on_disk(index) {
                    return Ok(None);
                }
                if let Some(claim) = self.claim(index) {
                    if self.look_on_disk(index) {
                        return Ok(None);
                    }
                    break Some(claim);
                }
            }
            if started.elapsed() > self.wait_limit {
                break None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL);
        };
        let fetched = wire(index, 1)?;
        let data = fetched
            .into_iter()
            .find(|(i, _)| *i == index)
            .map(|(_, d)| d)
            .ok_or_else(|| io::Error::other(format!("chunk {index} missing from a fetch")))?;
        if claim.is_some() {
            self.store(index, &data);
        }
        Ok(Some(data))
    }
}

thread_local! {
    /// Where a chunk is read to be checked: one per thread, reused, as large as a chunk.
    static CHECK_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes a shared lock on `byte` of `f`, without waiting (nobody holds these bytes
/// exclusively for longer than a look).
fn lock_shared(f: &File, byte: u64) -> io::Result<()> {
    crate::storage::lock::try_share_byte(f.as_raw_fd(), byte).map(|_| ())
}

/// Runs `f` holding the exclusive lock on `byte` of `file`, waiting a little for it;
/// `None` if it could not be had (the caller skips what it guards).
fn with_byte_lock<T>(file: &File, byte: u64, f: impl FnOnce() -> io::Result<T>) -> Option<T> {
    let fd = file.as_raw_fd();
    let started = Instant::now();
    loop {
        match try_lock_byte(fd, byte) {
            Ok(true) => break,
            Ok(false) if started.elapsed() < Duration::from_millis(200) => {
                std::thread::sleep(Duration::from_micros(100))
            }
            _ => return None,
        }
    }
    let r = f().ok();
    let _ = unlock_byte(fd, byte);
    r
}

/// What the cache holds, for `qed cache info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCacheInfo {
    /// The cache's directory.
    pub dir: PathBuf,
    /// Bytes of chunk files (headers included).
    pub bytes: u64,
    /// Chunk files.
    pub chunks: u64,
    /// The objects, most recently used first.
    pub objects: Vec<CachedObject>,
}

/// One object in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedObject {
    /// How it was named when first cached (a URL).
    pub name: String,
    /// Its address, version and size, as its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// The chunk size it is cached in.
    pub chunk_size: u64,
    /// Bytes of its chunk files.
    pub bytes: u64,
    /// Its chunk files.
    pub chunks: u64,
    /// When one of its chunks was last read or stored.
    pub last_used: Option<SystemTime>,
    /// Whether a process has it open now.
    pub in_use: bool,
}

/// A chunk file, as a prune weighs it.
struct ChunkFile {
    path: PathBuf,
    bytes: u64,
    used: SystemTime,
}

/// Every object directory, with its chunk files (stale temporary files are removed on
/// the way).
fn survey(root: &Path) -> io::Result<Vec<(PathBuf, Vec<ChunkFile>)>> {
    let objects = root.join("objects");
    let entries = match fs::read_dir(&objects) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let dir = entry?.path();
        if !dir.is_dir() {
            continue;
        }
        let mut chunks = Vec::new();
        let Ok(files) = fs::read_dir(&dir) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name();
            let name = name.to_string_lossy();
            let Ok(meta) = f.metadata() else { continue };
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if name.starts_with("c-") {
                chunks.push(ChunkFile {
                    path: f.path(),
                    bytes: meta.len(),
                    used,
                });
            } else if name.starts_with("tmp-") && used.elapsed().is_ok_and(|age| age > STALE_TMP) {
                let _ = fs::remove_file(f.path());
            }
        }
        out.push((dir, chunks));
    }
    Ok(out)
}

/// Whether a process has the object in `dir` open.
fn in_use(dir: &Path) -> bool {
    let Ok(f) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("claims"))
    else {
        return false;
    };
    !matches!(try_lock_byte(f.as_raw_fd(), IN_USE_BYTE), Ok(true))
}

/// What `qed cache info` shows.
pub fn host_cache_info(dir: &Path) -> io::Result<HostCacheInfo> {
    let mut info = HostCacheInfo {
        dir: dir.to_path_buf(),
        bytes: 0,
        chunks: 0,
        objects: Vec::new(),
    };
    for (obj, chunks) in survey(dir)? {
        let meta = fs::read_to_string(obj.join("meta")).unwrap_or_default();
        let field = |name: &str| {
            meta.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .unwrap_or("")
                .to_string()
        };
        let bytes: u64 = chunks.iter().map(|c| c.bytes).sum();
        info.bytes += bytes;
        info.chunks += chunks.len() as u64;
        info.objects.push(CachedObject {
            name: field("name"),
            key: field("key"),
            size: field("size").parse().unwrap_or(0),
            chunk_size: field("chunk").parse().unwrap_or(0),
            bytes,
            chunks: chunks.len() as u64,
            last_used: chunks.iter().map(|c| c.used).max(),
            in_use: in_use(&obj),
        });
    }
    info.objects
        .sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.name.cmp(&b.name)));
    Ok(info)
}

/// What a prune did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneReport {
    /// Chunk files removed, and their bytes.
    pub removed_chunks: u64,
    /// Bytes removed.
    pub removed_bytes: u64,
    /// Bytes left.
    pub kept_bytes: u64,
}

/// Removes the least recently used chunks until the cache holds at most
/// [`PRUNE_TO_PERCENT`] of `max_bytes` (all of them for a bound of zero), and the
/// directories of objects left empty that no process has open. One process prunes at
/// a time; a prune that finds another under way returns at once with nothing removed.
pub fn prune_host_cache(dir: &Path, max_bytes: u64) -> io::Result<PruneReport> {
    let mut report = PruneReport {
        removed_chunks: 0,
        removed_bytes: 0,
        kept_bytes: 0,
    };
    let usage = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("usage"))
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(e),
    };
    if !try_lock_byte(usage.as_raw_fd(), PRUNE_LOCK)? {
        return Ok(report);
    }
    let result = (|| {
        let objects = survey(dir)?;
        let mut all: Vec<&ChunkFile> = objects.iter().flat_map(|(_, c)| c).collect();
        let mut total: u64 = all.iter().map(|c| c.bytes).sum();
        let goal = max_bytes / 100 * PRUNE_TO_PERCENT;
        all.sort_by_key(|c| c.used);
        for c in all {
            if total <= goal {
                break;
            }
            if fs::remove_file(&c.path).is_ok() {
                total -= c.bytes;
                report.removed_chunks += 1;
                report.removed_bytes += c.bytes;
            }
        }
        for (obj, _) in &objects {
            let empty = fs::read_dir(obj)
                .map(|mut d| {
                    !d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("c-")))
                })
                .unwrap_or(false);
            if empty && !in_use(obj) {
                let _ = fs::remove_dir_all(obj);
            }
        }
        report.kept_bytes = total;
        // What stores added while this ran is lost to the count; the next prune finds it.
        with_byte_lock(&usage, COUNTER_LOCK, || {
            usage.write_all_at(&total.to_le_bytes(), 0)
        });
        Ok(report)
    })();
    let _ = unlock_byte(usage.as_raw_fd(), PRUNE_LOCK);
    result
}

/// Removes every chunk (`qed cache clear`): a prune to nothing.
pub fn clear_host_cache(dir: &Path) -> io::Result<PruneReport> {
    prune_host_cache(dir, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn options(vars: &[(&str, &str)]) -> Option<HostCacheOptions> {
        HostCacheOptions::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn the_directory_follows_the_environment() {
        let dir = |vars: &[(&str, &str)]| options(vars).map(|o| o.dir);
        assert_eq!(
            dir(&[
                ("QED_CACHE_DIR", "/c"),
                ("XDG_CACHE_HOME", "/x"),
                ("HOME", "/h")
            ]),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(dir(&[("QED_CACHE_DIR", "none"), ("HOME", "/h")]), None);
        assert_eq!(
            dir(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]),
            Some(PathBuf::from("/x/qed"))
        );
        assert_eq!(
            dir(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")]),
            Some(PathBuf::from("/h/.cache/qed"))
        );
        assert_eq!(dir(&[]), None);
    }

    fn object(dir: &Path, key: &str, size: u64, max: u64) -> ObjectCache {
        let opts = HostCacheOptions {
            dir: dir.to_path_buf(),
            max_bytes: max,
        };
        ObjectCache::open(
            &opts,
            "http://x/base",
            key,
            size,
            64 << 10,
            Duration::from_secs(5),
            &RemoteReport::default(),
        )
        .expect("open the cache")
    }

    fn chunk(index: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u64 * 7 + index) as u8).collect()
    }

    /// What a server of 64 KiB test chunks answers.
    fn served(first: u64, count: u64) -> Chunks {
        (first..first + count)
            .map(|i| (i, Arc::from(chunk(i, 64 << 10))))
            .collect()
    }

    #[test]
    fn chunks_are_shared_by_key_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let size = (64 << 10) * 3 + 100;
        let a = object(tmp.path(), "k1", size, 1 << 30);
        let b = object(tmp.path(), "k1", size, 1 << 30);
        let other = object(tmp.path(), "k2", size, 1 << 30);
        a.store(3, &chunk(3, 100));
        assert_eq!(&*b.load(3).expect("shared"), &chunk(3, 100)[..]);
        assert!(other.load(3).is_none(), "another version never sees it");
        // A damaged chunk is not trusted, and goes.
        let path = b.chunk_path(3);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 5] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(b.load(3).is_none());
        assert!(!path.exists());
        // A short one too (a crash that lost its end).
        a.store(0, &chunk(0, 64 << 10));
        let path = a.chunk_path(0);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(a.load(0).is_none());
    }

    #[test]
    fn a_claimed_chunk_is_fetched_once() {
        let tmp = tempfile::tempdir().unwrap();
        let size = (64 << 10) * 8;
        let a = object(tmp.path(), "k", size, 1 << 30);
        let b = object(tmp.path(), "k", size, 1 << 30);
        let fetched = std::sync::Mutex::new(Vec::new());
        let wire = |first: u64, count: u64| -> io::Result<Chunks> {
            fetched.lock().unwrap().push((first, count));
            std::thread::sleep(Duration::from_millis(50));
            Ok(served(first, count))
        };
        std::thread::scope(|s| {
            let ta = s.spawn(|| a.fetch_through(0, 8, &wire).unwrap());
            std::thread::sleep(Duration::from_millis(10));
            let tb = s.spawn(|| b.fetch_through(2, 4, &wire).unwrap());
            let (ga, gb) = (ta.join().unwrap(), tb.join().unwrap());
            assert_eq!(ga.len(), 8);
            for (i, d) in &ga {
                assert_eq!(&d[..], &chunk(*i, 64 << 10)[..]);
            }
            assert!(
                gb.is_empty(),
                "what the other stored is read in place, not copied"
            );
            for i in 2..6 {
                let mut out = vec![0u8; 64 << 10];
                assert!(b.read_checked(i, 0, &mut out), "chunk {i} adopted");
                assert_eq!(out, chunk(i, 64 << 10));
            }
        });
        assert_eq!(*fetched.lock().unwrap(), vec![(0, 8)]);
    }

    #[test]
    fn a_damaged_chunk_is_refused_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let a = object(tmp.path(), "k", 4 << 20, 1 << 30);
        a.store(1, &chunk(1, 64 << 10));
        let b = object(tmp.path(), "k", 4 << 20, 1 << 30);
        assert!(b.look_on_disk(1), "a sound chunk is taken");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(a.chunk_path(1))
            .unwrap();
        f.write_all_at(&[0xff], HEADER as u64 + 100).unwrap();
        let c = object(tmp.path(), "k", 4 << 20, 1 << 30);
        assert!(!c.look_on_disk(1), "a damaged one is refused");
        assert!(!a.chunk_path(1).exists(), "and removed");
    }

    #[test]
    fn a_failed_fetch_lets_the_waiter_fetch() {
        let tmp = tempfile::tempdir().unwrap();
        let a = object(tmp.path(), "k", 64 << 10, 1 << 30);
        let b = object(tmp.path(), "k", 64 << 10, 1 << 30);
        let claim = a.claim(0).expect("claim");
        let good = |first: u64, count: u64| -> io::Result<Chunks> { Ok(served(first, count)) };
        std::thread::scope(|s| {
            let t = s.spawn(|| b.fetch_through(0, 1, &good).unwrap());
            std::thread::sleep(Duration::from_millis(30));
            // The claimant gives up without storing (its fetch failed, or it died).
            drop(claim);
            assert_eq!(&t.join().unwrap()[0].1[..], &chunk(0, 64 << 10)[..]);
        });
        assert!(a.load(0).is_some(), "the waiter stored it");
    }

    #[test]
    fn a_prune_keeps_the_bound_and_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let size = (64 << 10) * 16;
        let per = (HEADER + (64 << 10)) as u64;
        let a = object(tmp.path(), "k", size, 1 << 40);
        for i in 0..16 {
            a.store(i, &chunk(i, 64 << 10));
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i);
            File::options()
                .write(true)
                .open(a.chunk_path(i))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let r = prune_host_cache(tmp.path(), per * 10).unwrap();
        assert!(r.kept_bytes <= per * 10 * PRUNE_TO_PERCENT / 100);
        assert_eq!(r.removed_chunks, 16 - r.kept_bytes / per);
        for i in 0..16 {
            let kept = a.chunk_path(i).exists();
            assert_eq!(kept, i >= r.removed_chunks, "chunk {i}");
        }
        let info = host_cache_info(tmp.path()).unwrap();
        assert_eq!(info.bytes, r.kept_bytes);
        assert_eq!(info.objects.len(), 1);
        assert!(info.objects[0].in_use);
        assert_eq!(info.objects[0].name, "http://x/base");
        drop(a);
        let r = clear_host_cache(tmp.path()).unwrap();
        assert_eq!(r.kept_bytes, 0);
        let info = host_cache_info(tmp.path()).unwrap();
        assert!(
            info.objects.is_empty(),
            "an object no one uses goes with its chunks"
        );
    }
}
