//! Read-only storage whose bytes live on a server: the object is fetched in chunks, on
//! demand, through a [`RangeSource`], and kept in a bounded cache of chunks.
//!
//! The split keeps what every protocol shares here (chunking, caching, coalescing,
//! readahead, parallel requests, the read-only refusals) and leaves a source only the
//! question of how to fetch one byte range exactly. Both sources are ranged GETs
//! ([`http`]); S3 ([`s3`]) differs only in how each request is addressed and signed and
//! how its refusals read.

mod http;
mod s3;

pub(crate) use http::is_http_url;
pub use http::HttpStorage;
pub(crate) use s3::is_s3_url;
pub use s3::{S3Config, S3Credentials, S3Storage};

use super::Storage;
use lru::LruCache;
use std::collections::HashSet;
use std::fmt::Debug;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// What a remote object was when it was opened: enough to tell, later or in another
/// process, whether the server still holds the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteIdentity {
    /// The object's length in bytes.
    pub size: u64,
    /// The ETag the server gave (weak ones included), if any.
    pub etag: Option<String>,
    /// The Last-Modified the server gave, if any; it identifies the object only where
    /// there is no ETag.
    pub last_modified: Option<String>,
}

impl RemoteIdentity {
    /// Whether `now` is the object this identity describes: the same size and the same
    /// ETag, or where there was no ETag the same Last-Modified. An identity with neither
    /// is checked by size only.
    pub fn matches(&self, now: &RemoteIdentity) -> bool {
        self.size == now.size
            && match (&self.etag, &self.last_modified) {
                (Some(tag), _) => now.etag.as_ref() == Some(tag),
                (None, Some(date)) => now.last_modified.as_ref() == Some(date),
                (None, None) => true,
            }
    }

    /// The identity as kept: the ETag, else Last-Modified, with the size.
    pub fn kept(&self) -> RemoteIdentity {
        RemoteIdentity {
            size: self.size,
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone().filter(|_| self.etag.is_none()),
        }
    }
}

impl std::fmt::Display for RemoteIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.etag, &self.last_modified) {
            (Some(tag), _) => write!(f, "ETag {tag}, {} bytes", self.size),
            (None, Some(date)) => write!(f, "Last-Modified {date}, {} bytes", self.size),
            (None, None) => write!(f, "{} bytes, no ETag or Last-Modified", self.size),
        }
    }
}

/// Where the library tells its user about remote reads that are in trouble but not
/// failed yet (a server that stopped answering, and is retried until the deadline). The
/// library never prints: a program that wants these messages sets a function here.
#[derive(Clone, Default)]
pub struct RemoteReport(Option<Arc<ReportFn>>);

/// What a [`RemoteReport`] calls.
type ReportFn = dyn Fn(&str) + Send + Sync;

impl RemoteReport {
    /// Reports each message to `f`. It is called from the reading thread, once when a
    /// server stops answering and once when it answers again, never per retry.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    pub(crate) fn say(&self, message: &str) {
        if let Some(f) = &self.0 {
            f(message)
        }
    }
}

impl Debug for RemoteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "RemoteReport(set)"
        } else {
            "RemoteReport(none)"
        })
    }
}

impl PartialEq for RemoteReport {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for RemoteReport {}

/// How remote bases (http, https and s3 names) are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Longest one request may take, from connecting to the last byte of its body.
    pub request_timeout: Duration,
    /// Longest connecting to the server may take.
    pub connect_timeout: Duration,
    /// Longest one read may take, retries included; past it the read fails. It counts
    /// from when the server stopped answering if that was earlier (another reader's
    /// failed attempt): readers that start during an outage do not each wait it anew.
    pub deadline: Duration,
    /// Requests one read may have in flight at once (and connections kept open).
    pub connections: usize,
    /// Bytes fetched per chunk: reads are widened to whole chunks, which are cached.
    /// A power of two from 64 KiB to 16 MiB.
    pub chunk_size: u32,
    /// Upper bound on memory used for cached chunks, in bytes.
    pub cache_bytes: usize,
    /// Bytes fetched ahead of a read that continues the previous one (0: none).
    pub readahead: u64,
    /// Where messages about a server being retried go (nowhere by default).
    pub report: RemoteReport,
}

/// Smallest chunk: a QED cluster is at least 4 KiB, and a smaller request costs a round
/// trip for little data.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk, which bounds the buffer one request needs.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// Longest timeout or deadline accepted.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Most bytes one request asks for: adjacent chunks are fetched together up to this.
const MAX_REQUEST_BYTES: u64 = 8 << 20;

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(120),
            connections: 4,
            chunk_size: 64 << 10,
            cache_bytes: 64 << 20,
            readahead: 2 << 20,
            report: RemoteReport::default(),
        }
    }
}

impl RemoteOptions {
    /// Refuses settings that cannot work, naming the setting.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(format!(
                "chunk size {} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if self.connections == 0 || self.connections > 64 {
            return Err(format!("{} connections: use 1 to 64", self.connections));
        }
        if self.request_timeout.is_zero() || self.deadline.is_zero() {
            return Err("the request timeout and the deadline must be above zero".into());
        }
        // Far beyond any sensible wait, and far from where instants overflow.
        for (what, d) in [
            ("request timeout", self.request_timeout),
            ("connect timeout", self.connect_timeout),
            ("deadline", self.deadline),
        ] {
            if d > MAX_WAIT {
                return Err(format!(
                    "a {what} of {} s is more than a day: use at most {} s",
                    d.as_secs(),
                    MAX_WAIT.as_secs()
                ));
            }
        }
        Ok(())
    }
}

/// Implements [`Storage`] for a type whose `inner` is a [`RemoteStorage`].
macro_rules! delegate_storage {
    ($t:ty) => {
        impl $crate::storage::Storage for $t {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
                self.inner.read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
                self.inner.write_at(buf, offset)
            }
            fn flush(&self) -> std::io::Result<()> {
                self.inner.flush()
            }
            fn len(&self) -> std::io::Result<u64> {
                self.inner.len()
            }
            fn set_len(&self, len: u64) -> std::io::Result<()> {
                self.inner.set_len(len)
            }
            fn extend(&self, from: u64, to: u64) -> std::io::Result<u64> {
                self.inner.extend(from, to)
            }
            fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
                self.inner.zero_range(offset, len)
            }
            fn remote_identity(&self) -> Option<$crate::storage::RemoteIdentity> {
                Some($crate::storage::remote::RangeSource::identity(
                    self.inner.source(),
                ))
            }
        }
    };
}
use delegate_storage;

/// Chunks by index.
type Chunks = Vec<(u64, Arc<[u8]>)>;

/// One protocol's way to fetch bytes of a remote object that does not change.
pub(crate) trait RangeSource: Send + Sync + Debug {
    /// The object's name, for messages.
    fn name(&self) -> &str;
    /// The object's length, as found when it was opened.
    fn size(&self) -> u64;
    /// What the object was when it was opened.
    fn identity(&self) -> RemoteIdentity;
    /// Fills `buf` with the bytes at `offset`, all of them inside the object; exactly
    /// these bytes or an error naming the object.
    fn fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// The chunks at hand, and those some reader is fetching: a chunk crosses the wire once
/// however many readers want it at the same time.
#[derive(Debug)]
struct Cache {
    chunks: LruCache<u64, Arc<[u8]>>,
    /// Most chunks kept.
    capacity: usize,
    in_flight: HashSet<u64>,
}

/// A remote object as read-only [`Storage`], read in cached chunks.
#[derive(Debug)]
pub(crate) struct RemoteStorage<S> {
    source: S,
    chunk: u64,
    connections: usize,
    readahead_chunks: u64,
    cache: Mutex<Cache>,
    /// Signalled whenever fetched chunks land in the cache (or a fetch gives up), for
    /// readers waiting on chunks another reader is fetching.
    landed: Condvar,
    /// Where the last read ended, to tell a sequential reader.
    last_end: AtomicU64,
}

impl<S: RangeSource> RemoteStorage<S> {
    pub(crate) fn new(source: S, opts: &RemoteOptions) -> Self {
        let chunk = u64::from(opts.chunk_size);
        let entries = (opts.cache_bytes / opts.chunk_size as usize).max(1);
        Self {
            source,
            chunk,
            connections: opts.connections.max(1),
            readahead_chunks: opts.readahead.div_ceil(chunk),
            cache: Mutex::new(Cache {
                // Unbounded to the map, bounded here: a bounded map reserves room for
                // every entry up front, which a large cache setting would make huge.
                chunks: LruCache::unbounded(),
                capacity: entries,
                in_flight: HashSet::new(),
            }),
            landed: Condvar::new(),
            last_end: AtomicU64::new(u64::MAX),
        }
    }

    pub(crate) fn source(&self) -> &S {
        &self.source
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes of chunk `index` span `[index * chunk, end)`.
    fn chunk_len(&self, index: u64) -> u64 {
        let start = index * self.chunk;
        (self.source.size() - start).min(self.chunk)
    }

    /// Fetches chunks `first..first + count` in one request.
    fn fetch_run(&self, first: u64, count: u64) -> io::Result<Chunks> {
        let start = first * self.chunk;
        let end = ((first + count) * self.chunk).min(self.source.size());
        let len = usize::try_from(end - start).map_err(io::Error::other)?;
        let mut buf = vec![0u8; len];
        self.source.fetch(&mut buf, start)?;
        Ok((0..count)
            .map(|i| {
                let from = (i * self.chunk) as usize;
                let to = (from + self.chunk_len(first + i) as usize).min(len);
                (first + i, Arc::from(&buf[from..to]))
            })
            .collect())
    }

    /// Fetches the runs, several at once when there are several, and caches what came.
    fn fetch_runs(&self, runs: &[(u64, u64)]) -> io::Result<Chunks> {
        let fetched: Vec<io::Result<Chunks>> = if runs.len() == 1 {
            vec![self.fetch_run(runs[0].0, runs[0].1)]
        } else {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let results = Mutex::new(Vec::with_capacity(runs.len()));
            std::thread::scope(|s| {
                for _ in 0..self.connections.min(runs.len()) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(first, count)) = runs.get(i) else {
                            break;
                        };
                        let r = self.fetch_run(first, count);
                        let failed = r.is_err();
                        results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                        if failed {
                            // The read fails anyway: start no more requests for it.
                            next.store(runs.len(), Ordering::Relaxed);
                        }
                    });
                }
            });
            results.into_inner().unwrap_or_else(|p| p.into_inner())
        };
        let mut chunks = Vec::new();
        let mut failed = None;
        for r in fetched {
            match r {
                Ok(c) => chunks.extend(c),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        let mut cache = self.cache();
        for (index, data) in &chunks {
            cache.chunks.put(*index, data.clone());
            while cache.chunks.len() > cache.capacity {
                cache.chunks.pop_lru();
            }
        }
        for &(first, count) in runs {
            for index in first..first + count {
                cache.in_flight.remove(&index);
            }
        }
        drop(cache);
        self.landed.notify_all();
        match failed {
            Some(e) => Err(e),
            None => Ok(chunks),
        }
    }

    /// Waits for chunk `index`, which another reader is fetching; fetches it itself if
    /// that reader gave up (or the chunk was evicted before this one saw it).
    fn wait_for(&self, index: u64) -> io::Result<Arc<[u8]>> {
        let mut cache = self.cache();
        loop {
            if let Some(data) = cache.chunks.get(&index) {
                return Ok(data.clone());
            }
            if !cache.in_flight.contains(&index) {
                cache.in_flight.insert(index);
                drop(cache);
                let chunks = self.fetch_runs(&[(index, 1)])?;
                return chunks.into_iter().next().map(|(_, d)| d).ok_or_else(|| {
                    io::Error::other(format!("{}: chunk missing", self.source.name()))
                });
            }
            cache = self.landed.wait(cache).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl<S: RangeSource> Storage for RemoteStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.source.size();
        let end = offset.saturating_add(buf.len() as u64);
        let inside = end.min(size).saturating_sub(offset) as usize;
        // Past the end of the object reads as zeros, without asking the server.
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        let first = offset / self.chunk;
        let last = (offset + inside as u64 - 1) / self.chunk;
        let last_chunk = (size - 1) / self.chunk;
        let sequential = self
            .last_end
            .swap(offset + inside as u64, Ordering::Relaxed)
            == offset;
        let fetch_last = if sequential {
            (last + self.readahead_chunks).min(last_chunk)
        } else {
            last
        };

        // Under one hold of the cache: what is at hand, what others are fetching, and
        // the missing chunks in adjacent runs (each run one request of bounded size),
        // marked as being fetched by this read.
        let per_request = (MAX_REQUEST_BYTES / self.chunk).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut awaited: Vec<u64> = Vec::new();
        let mut have: Vec<Option<Arc<[u8]>>> = {
            let mut cache = self.cache();
            let have: Vec<_> = (first..=fetch_last)
                .map(|i| cache.chunks.get(&i).cloned())
                .collect();
            for (i, slot) in have.iter().enumerate() {
                let index = first + i as u64;
                if slot.is_some() {
                    continue;
                }
                if cache.in_flight.contains(&index) {
                    // Readahead another reader is fetching is not waited for.
                    if index <= last {
                        awaited.push(index);
                    }
                    continue;
                }
                match runs.last_mut() {
                    Some((start, count)) if *start + *count == index && *count < per_request => {
                        *count += 1
                    }
                    _ => runs.push((index, 1)),
                }
            }
            // Readahead past the read must not cost a request of its own.
            if let Some(&(start, _)) = runs.last() {
                if start > last {
                    runs.pop();
                }
            }
            for &(start, count) in &runs {
                cache.in_flight.extend(start..start + count);
            }
            have
        };
        if !runs.is_empty() {
            for (index, data) in self.fetch_runs(&runs)? {
                have[(index - first) as usize] = Some(data);
            }
        }
        for index in awaited {
            have[(index - first) as usize] = Some(self.wait_for(index)?);
        }

        let mut pos = offset;
        let mut out = &mut buf[..inside];
        while !out.is_empty() {
            let index = pos / self.chunk;
            let data = have[(index - first) as usize].as_ref().ok_or_else(|| {
                io::Error::other(format!("{}: chunk missing", self.source.name()))
            })?;
            let from = (pos - index * self.chunk) as usize;
            let n = out.len().min(data.len().saturating_sub(from));
            if n == 0 {
                return Err(io::Error::other(format!(
                    "{}: chunk {index} is shorter than expected",
                    self.source.name()
                )));
            }
            out[..n].copy_from_slice(&data[from..from + n]);
            out = &mut out[n..];
            pos += n as u64;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only(self.source.name()))
    }

    fn flush(&self) -> io::Result<()> {
        // Nothing is ever written, so there is nothing to make durable.
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.source.size())
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only(self.source.name()))
    }

    fn extend(&self, _from: u64, _to: u64) -> io::Result<u64> {
        Err(read_only(self.source.name()))
    }

    fn zero_range(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only(self.source.name()))
    }
}

fn read_only(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ReadOnlyFilesystem,
        format!("{name}: a remote image is read-only; write to a local overlay on it instead"),
    )
}
