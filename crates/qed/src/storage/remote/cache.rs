//! The chunk cache: a [`RangeSource`] as read-only [`Storage`], fetched in chunks on
//! demand (coalesced, read ahead, several requests at once) and kept in a bounded cache.

use super::host_cache::{Chunks, ObjectCache};
use super::options::RemoteOptions;
use super::RangeSource;
use crate::storage::{DirectSpan, Storage};
use lru::LruCache;
use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Most bytes one request asks for: adjacent chunks are fetched together up to this.
const MAX_REQUEST_BYTES: u64 = 8 << 20;

/// Fewest bytes one readahead request asks for (unless the window is smaller): below it
/// a request costs more in round trips than its bytes are worth.
const MIN_PREFETCH_BYTES: u64 = 1 << 20;

/// Sequential readers told apart at once: a stream's workers, an export's clients.
const MAX_STREAMS: usize = 8;
/// Largest share of the cache one stream's readahead window may take.
const WINDOW_SHARE: usize = 4;
/// Largest share of the cache all readahead not yet read may take, so that what is
/// prefetched is never evicted before it is read.
const AHEAD_SHARE: usize = 2;

/// A sequential reader, told by where its last read ended.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Where its last read started and ended: a read from `last..=next` continues it.
    last: u64,
    next: u64,
    /// Chunks read ahead of `next`, doubled on each read that continues the stream.
    window: u64,
    /// Chunks below this index are fetched or asked for.
    issued: u64,
    /// When it was last read, in reads of the storage, to forget the oldest stream.
    used: u64,
}

/// The chunks at hand, and those some reader is fetching: a chunk crosses the wire once
/// however many readers want it at the same time.
#[derive(Debug)]
struct Cache {
    chunks: LruCache<u64, Arc<[u8]>>,
    /// Most chunks kept, prefetches in flight included.
    capacity: usize,
    in_flight: HashSet<u64>,
    streams: Vec<Stream>,
    /// Reads so far, the clock of [`Stream::used`].
    reads: u64,
    /// Runs of readahead waiting for a prefetching thread.
    queue: VecDeque<(u64, u64)>,
    /// Chunks the prefetching threads are fetching now.
    prefetching: usize,
    /// Prefetching threads started.
    threads: usize,
    /// Set when the storage is dropped: prefetching threads stop.
    stop: bool,
    /// The process the prefetching threads run in, as [`forks`] counts: a forked child
    /// (a daemon that opened its image first) has none of them.
    forks: u32,
}

/// Forks this process's line has been through: a counter a child bumps, so that each read
/// can tell a child from its parent without a system call (getpid is one, and reads
/// ask under the cache's lock).
fn forks() -> u32 {
    static FORKS: AtomicU32 = AtomicU32::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    extern "C" fn in_child() {
        FORKS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: registers a handler that only bumps an atomic, which is safe in a child.
    HOOK.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(in_child));
    });
    FORKS.load(Ordering::Relaxed)
}

impl Cache {
    /// Forgets, in a forked child, the fetches and threads of the parent, which never
    /// land here: readers fetch what they need, and prefetching starts afresh.
    fn after_fork(&mut self) {
        let now = forks();
        if self.forks != now {
            self.forks = now;
            self.in_flight.clear();
            self.queue.clear();
            self.streams.clear();
            self.prefetching = 0;
            self.threads = 0;
        }
    }

    /// Whether chunk `index` is readahead some stream has not read yet.
    fn ahead(&self, index: u64, chunk: u64) -> bool {
        self.streams
            .iter()
            .any(|s| s.next / chunk <= index && index < s.issued)
    }

    /// Chunks of readahead asked for and not read yet, over every stream.
    fn outstanding(&self, chunk: u64) -> u64 {
        self.streams
            .iter()
            .map(|s| s.issued.saturating_sub(s.next.div_ceil(chunk)))
            .sum()
    }

    /// Evicts down to the capacity, less what prefetches in flight will bring; readahead
    /// not read yet is kept (it is bounded to a share of the cache), so that no fetched
    /// chunk is thrown away before its reader came.
    fn trim(&mut self, chunk: u64) {
        let limit = self.capacity.saturating_sub(self.prefetching).max(1);
        let mut spared = 0;
        while self.chunks.len() > limit && spared < self.chunks.len() {
            let Some((index, data)) = self.chunks.pop_lru() else {
                break;
            };
            if self.ahead(index, chunk) {
                self.chunks.put(index, data);
                spared += 1;
            }
        }
    }
}

/// A remote object as read-only [`Storage`], read in cached chunks, with sequential
/// readers' next chunks prefetched in the background.
///
/// The state lives in an [`Inner`] shared with the prefetching threads; dropping the
/// storage tells them to stop (one in a request ends with it).
#[derive(Debug)]
pub(crate) struct RemoteStorage<S: RangeSource + 'static> {
    inner: Arc<Inner<S>>,
}

#[derive(Debug)]
struct Inner<S> {
    source: S,
    chunk: u64,
    connections: usize,
    /// The first window of a sequential reader, and the largest, in chunks (0: no
    /// readahead).
    readahead_chunks: u64,
    max_window: u64,
    /// Most readahead not read yet, over every stream, in chunks.
    max_ahead: u64,
    cache: Mutex<Cache>,
    /// Signalled whenever fetched chunks land in the cache (or a fetch gives up), for
    /// readers waiting on chunks another reader is fetching.
    landed: Condvar,
    /// Signalled when readahead is queued or the storage is dropped, for the
    /// prefetching threads.
    work: Condvar,
    /// The object's chunks on disk, shared with the other processes of the host.
    host: Option<ObjectCache>,
}

impl<S: RangeSource + 'static> RemoteStorage<S> {
    pub(crate) fn new(source: S, opts: &RemoteOptions) -> Self {
        let chunk = u64::from(opts.chunk_size);
        let entries = (opts.cache_bytes / opts.chunk_size as usize).max(1);
        let host = match (&opts.host_cache, source.cache_key()) {
            (Some(host), Some(key)) if source.size() > 0 => ObjectCache::open(
                host,
                source.name(),
                &key,
                source.size(),
                chunk,
                opts.request_timeout,
                &opts.report,
            ),
            _ => None,
        };
        let readahead_chunks = opts.readahead.div_ceil(chunk);
        let max_window = if readahead_chunks == 0 {
            0
        } else {
            (opts.readahead_max.div_ceil(chunk))
                .min((entries / WINDOW_SHARE) as u64)
                .max(readahead_chunks.min((entries / WINDOW_SHARE) as u64))
        };
        Self {
            inner: Arc::new(Inner {
                source,
                chunk,
                connections: opts.connections.max(1),
                readahead_chunks: readahead_chunks.min(max_window),
                max_window,
                max_ahead: (entries / AHEAD_SHARE) as u64,
                cache: Mutex::new(Cache {
                    // Unbounded to the map, bounded here: a bounded map reserves room for
                    // every entry up front, which a large cache setting would make huge.
                    chunks: LruCache::unbounded(),
                    capacity: entries,
                    in_flight: HashSet::new(),
                    streams: Vec::new(),
                    reads: 0,
                    queue: VecDeque::new(),
                    prefetching: 0,
                    threads: 0,
                    stop: false,
                    forks: forks(),
                }),
                landed: Condvar::new(),
                work: Condvar::new(),
                host,
            }),
        }
    }

    pub(crate) fn source(&self) -> &S {
        &self.inner.source
    }
}

impl<S: RangeSource + 'static> Drop for RemoteStorage<S> {
    fn drop(&mut self) {
        self.inner.cache().stop = true;
        self.inner.work.notify_all();
    }
}

impl<S: RangeSource> Inner<S> {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes of chunk `index` span `[index * chunk, end)`.
    fn chunk_len(&self, index: u64) -> u64 {
        let start = index * self.chunk;
        (self.source.size() - start).min(self.chunk)
    }

    /// Chunks `first..first + count`: through the host cache when there is one (which
    /// reads what another process fetched, and fetches the rest), else from the source.
    fn fetch_run(&self, first: u64, count: u64) -> io::Result<Chunks> {
        match &self.host {
            Some(host) => host.fetch_through(first, count, &|f, c| self.fetch_from_source(f, c)),
            None => self.fetch_from_source(first, count),
        }
    }

    /// Fetches chunks `first..first + count` from the source, in one request.
    fn fetch_from_source(&self, first: u64, count: u64) -> io::Result<Chunks> {
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

    /// Caches fetched chunks and clears the runs from those in flight.
    fn land(&self, chunks: &Chunks, runs: &[(u64, u64)], prefetched: usize) {
        let mut cache = self.cache();
        cache.prefetching = cache.prefetching.saturating_sub(prefetched);
        for (index, data) in chunks {
            cache.chunks.put(*index, data.clone());
        }
        cache.trim(self.chunk);
        for &(first, count) in runs {
            for index in first..first + count {
                cache.in_flight.remove(&index);
            }
        }
        drop(cache);
        self.landed.notify_all();
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
        self.land(&chunks, runs, 0);
        match failed {
            Some(e) => Err(e),
            None => Ok(chunks),
        }
    }

    /// Waits for chunk `index`, which another reader is fetching; fetches it itself if
    /// that reader gave up (or the chunk was evicted before this one saw it). `None`
    /// when the chunk is to be read from the host cache's file.
    fn wait_for(&self, index: u64) -> io::Result<Option<Arc<[u8]>>> {
        let mut cache = self.cache();
        loop {
            if let Some(data) = cache.chunks.get(&index) {
                return Ok(Some(data.clone()));
            }
            if !cache.in_flight.contains(&index) {
                cache.in_flight.insert(index);
                drop(cache);
                let chunks = self.fetch_runs(&[(index, 1)])?;
                return Ok(chunks.into_iter().next().map(|(_, d)| d));
            }
            cache = self.landed.wait(cache).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What one read is made of: a slot for each chunk from `first` (the read's, then any
/// readahead), filled from the cache at once and from the wire after. A slot left empty
/// after [`Inner::gather`] is a chunk to read from the host cache's file.
struct Plan {
    first: u64,
    have: Vec<Option<Arc<[u8]>>>,
    /// Missing chunks in adjacent runs (each run one request of bounded size), marked in
    /// the cache as being fetched by this read.
    runs: Vec<(u64, u64)>,
    /// Chunks of the read that another reader is fetching.
    awaited: Vec<u64>,
}

impl<S: RangeSource + 'static> Inner<S> {
    /// Plans a read of `len` bytes (at least one, all inside the object) at `offset`:
    /// what is at hand, what others are fetching, and what this read fetches, decided
    /// under one hold of the cache. A read that continues a stream queues the stream's
    /// next window for the prefetching threads, so that its reader finds it at hand.
    fn plan(self: &Arc<Self>, offset: u64, len: u64) -> Plan {
        let first = offset / self.chunk;
        let last = (offset + len - 1) / self.chunk;
        let per_request = (MAX_REQUEST_BYTES / self.chunk).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut awaited: Vec<u64> = Vec::new();
        let mut cache = self.cache();
        cache.after_fork();
        let have: Vec<_> = (first..=last)
            .map(|i| cache.chunks.get(&i).cloned())
            .collect();
        for (i, slot) in have.iter().enumerate() {
            let index = first + i as u64;
            if slot.is_some() {
                continue;
            }
            if cache.in_flight.contains(&index) {
                awaited.push(index);
                continue;
            }
            match runs.last_mut() {
                Some((start, count)) if *start + *count == index && *count < per_request => {
                    *count += 1
                }
                _ => runs.push((index, 1)),
            }
        }
        for &(start, count) in &runs {
            cache.in_flight.extend(start..start + count);
        }
        if self.max_window > 0 {
            self.read_ahead(&mut cache, offset, offset + len);
        }
        Plan {
            first,
            have,
            runs,
            awaited,
        }
    }

    /// Notes a read of `start..end` in the streams; when it continues one, doubles that
    /// stream's window and queues what of the window is not asked for yet.
    fn read_ahead(self: &Arc<Self>, cache: &mut Cache, start: u64, end: u64) {
        cache.reads += 1;
        let now = cache.reads;
        let chunk = self.chunk;
        let Some(at) = cache
            .streams
            .iter()
            // A read again of where the last one started is no step forward.
            .position(|s| (s.last < start || start == s.next) && start <= s.next)
        else {
            // A new reader: sequential only once it reads on.
            if cache.streams.len() >= MAX_STREAMS {
                let oldest = (0..cache.streams.len())
                    .min_by_key(|&i| cache.streams[i].used)
                    .unwrap_or(0);
                cache.streams.swap_remove(oldest);
            }
            cache.streams.push(Stream {
                last: start,
                next: end,
                window: self.readahead_chunks / 2,
                issued: end.div_ceil(chunk),
                used: now,
            });
            return;
        };
        let s = &mut cache.streams[at];
        s.last = start;
        s.next = s.next.max(end);
        s.used = now;
        s.window = (s.window * 2).clamp(self.readahead_chunks.max(1), self.max_window);
        let last_chunk = (self.source.size() - 1) / chunk;
        let from = s.issued.max(s.next.div_ceil(chunk));
        let mut to = (s.next.div_ceil(chunk) + s.window).min(last_chunk + 1);
        let window = s.window;
        // Readahead not read yet stays within its share of the cache: the streams read
        // longest ago give up theirs first, then this one asks for less.
        let mut over =
            (cache.outstanding(chunk) + to.saturating_sub(from)).saturating_sub(self.max_ahead);
        while over > 0 && cache.streams.len() > 1 {
            let Some(oldest) = (0..cache.streams.len())
                .filter(|&i| i != at)
                .min_by_key(|&i| cache.streams[i].used)
            else {
                break;
            };
            cache.streams.swap_remove(oldest);
            over =
                (cache.outstanding(chunk) + to.saturating_sub(from)).saturating_sub(self.max_ahead);
        }
        let Some(s) = cache
            .streams
            .iter_mut()
            .find(|s| s.used == now && s.last == start)
        else {
            return;
        };
        to = to.saturating_sub(over).max(from);
        if to <= from {
            return;
        }
        s.issued = to;
        // Requests of a part of the window each, so that several are in flight at once
        // and the first of them lands early.
        let per_request = (window / self.connections as u64).clamp(
            (MIN_PREFETCH_BYTES / chunk).max(1),
            (MAX_REQUEST_BYTES / chunk).max(1),
        );
        let mut first = from;
        while first < to {
            let count = per_request.min(to - first);
            cache.queue.push_back((first, count));
            first += count;
        }
        let wanted = self.connections.min(cache.queue.len());
        while cache.threads < wanted {
            let inner = self.clone();
            let spawned = std::thread::Builder::new()
                .name("qed-prefetch".into())
                .spawn(move || inner.prefetcher());
            if spawned.is_err() {
                // Readers fetch what they need themselves.
                break;
            }
            cache.threads += 1;
        }
        self.work.notify_all();
    }

    /// A prefetching thread: fetches queued readahead until the storage is dropped.
    /// What fails is dropped: its reader fetches it itself, and reports the error if
    /// it is one.
    fn prefetcher(&self) {
        let mut cache = self.cache();
        loop {
            if cache.stop {
                cache.threads -= 1;
                return;
            }
            let Some((first, count)) = cache.queue.pop_front() else {
                cache = self.work.wait(cache).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            // What readers fetched or asked for since it was queued is left to them.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for index in first..first + count {
                if cache.chunks.contains(&index) || cache.in_flight.contains(&index) {
                    continue;
                }
                match runs.last_mut() {
                    Some((start, n)) if *start + *n == index => *n += 1,
                    _ => runs.push((index, 1)),
                }
            }
            let n: u64 = runs.iter().map(|r| r.1).sum();
            for &(start, count) in &runs {
                cache.in_flight.extend(start..start + count);
            }
            cache.prefetching += n as usize;
            drop(cache);
            let mut chunks = Vec::new();
            for &(start, count) in &runs {
                if let Ok(c) = self.fetch_run(start, count) {
                    chunks.extend(c);
                }
            }
            self.land(&chunks, &runs, n as usize);
            cache = self.cache();
        }
    }

    /// Fetches the plan's runs and waits for the chunks others are fetching.
    fn gather(&self, plan: &mut Plan) -> io::Result<()> {
        if !plan.runs.is_empty() {
            for (index, data) in self.fetch_runs(&plan.runs)? {
                plan.have[(index - plan.first) as usize] = Some(data);
            }
        }
        for &index in &plan.awaited {
            plan.have[(index - plan.first) as usize] = self.wait_for(index)?;
        }
        Ok(())
    }

    /// Reads `out` at `offset` from the host cache's file of its chunk, when the read is
    /// inside one chunk whose file this process has checked before: a working set larger
    /// than the memory cache then reads as a local file does, from the page cache, for
    /// what a copy out of memory would cost.
    fn read_from_disk(&self, out: &mut [u8], offset: u64) -> bool {
        let Some(host) = &self.host else {
            return false;
        };
        let index = offset / self.chunk;
        if (offset + out.len() as u64 - 1) / self.chunk != index {
            return false;
        }
        // Not counted as a sequential reader's step: what is on disk needs no readahead.
        host.read_checked(index, offset - index * self.chunk, out)
    }

    /// Copies the read's bytes, from `offset`, out of the gathered chunks into `out`.
    fn assemble(&self, plan: &Plan, mut out: &mut [u8], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        while !out.is_empty() {
            let index = pos / self.chunk;
            let from = (pos - index * self.chunk) as usize;
            let fetched;
            let data = match &plan.have[(index - plan.first) as usize] {
                Some(data) => data,
                None => {
                    let n = out
                        .len()
                        .min((self.chunk_len(index) as usize).saturating_sub(from));
                    if let Some(host) = &self.host {
                        if n > 0 && host.read_checked(index, from as u64, &mut out[..n]) {
                            out = &mut out[n..];
                            pos += n as u64;
                            continue;
                        }
                    }
                    // Gone from disk since (pruned, and its slot taken by another
                    // chunk): from the source, as without the host cache.
                    fetched = self.fetch_from_source(index, 1)?;
                    &fetched
                        .first()
                        .ok_or_else(|| {
                            io::Error::other(format!("{}: chunk missing", self.source.name()))
                        })?
                        .1
                }
            };
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
}

impl<S: RangeSource> Inner<S> {
    /// Where the `len` bytes at `offset` are in the host cache's file of their chunk,
    /// when they lie in one chunk whose file this process has checked: reads of a warm
    /// base then go into the caller's io_uring as a local base's do.
    fn checked_span(&self, offset: u64, len: u64) -> Option<DirectSpan> {
        let host = self.host.as_ref()?;
        let index = offset / self.chunk;
        if len == 0
            || offset.checked_add(len)? > self.source.size()
            || (offset + len - 1) / self.chunk != index
        {
            return None;
        }
        host.span_checked(index, offset - index * self.chunk, len)
    }
}

impl<S: RangeSource + 'static> Storage for RemoteStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner = &self.inner;
        let size = inner.source.size();
        let end = offset.saturating_add(buf.len() as u64);
        let inside = end.min(size).saturating_sub(offset) as usize;
        // Past the end of the object reads as zeros, without asking the server.
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        if inner.read_from_disk(&mut buf[..inside], offset) {
            return Ok(());
        }
        let mut plan = inner.plan(offset, inside as u64);
        inner.gather(&mut plan)?;
        inner.assemble(&plan, &mut buf[..inside], offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only(self.inner.source.name()))
    }

    fn flush(&self) -> io::Result<()> {
        // Nothing is ever written, so there is nothing to make durable.
        Ok(())
    }

    fn direct_span(&self, offset: u64, len: u64) -> Option<DirectSpan> {
        self.inner.checked_span(offset, len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.inner.source.size())
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only(self.inner.source.name()))
    }

    fn extend(&self, _from: u64, _to: u64) -> io::Result<u64> {
        Err(read_only(self.inner.source.name()))
    }

    fn zero_range(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only(self.inner.source.name()))
    }
}

fn read_only(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ReadOnlyFilesystem,
        format!("{name}: a remote image is read-only; write to a local overlay on it instead"),
    )
}
