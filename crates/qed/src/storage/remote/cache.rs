//! The chunk cache: a [`RangeSource`] as read-only [`Storage`], fetched in chunks on
//! demand (coalesced, read ahead, several requests at once) and kept in a bounded cache.

use super::host_cache::{Chunks, ObjectCache};
use super::options::RemoteOptions;
use super::RangeSource;
use crate::storage::Storage;
use lru::LruCache;
use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Most bytes one request asks for: adjacent chunks are fetched together up to this.
const MAX_REQUEST_BYTES: u64 = 8 << 20;

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
    /// The object's chunks on disk, shared with the other processes of the host.
    host: Option<ObjectCache>,
}

impl<S: RangeSource> RemoteStorage<S> {
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
            host,
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

/// What one read is made of: a slot for each chunk from `first` (the read's, then any
/// readahead), filled from the cache at once and from the wire after.
struct Plan {
    first: u64,
    have: Vec<Option<Arc<[u8]>>>,
    /// Missing chunks in adjacent runs (each run one request of bounded size), marked in
    /// the cache as being fetched by this read.
    runs: Vec<(u64, u64)>,
    /// Chunks of the read that another reader is fetching.
    awaited: Vec<u64>,
}

impl<S: RangeSource> RemoteStorage<S> {
    /// Plans a read of `len` bytes (at least one, all inside the object) at `offset`:
    /// what is at hand, what others are fetching, and what this read fetches, decided
    /// under one hold of the cache.
    fn plan(&self, offset: u64, len: u64) -> Plan {
        let first = offset / self.chunk;
        let last = (offset + len - 1) / self.chunk;
        let last_chunk = (self.source.size() - 1) / self.chunk;
        let sequential = self.last_end.swap(offset + len, Ordering::Relaxed) == offset;
        let fetch_last = if sequential {
            (last + self.readahead_chunks).min(last_chunk)
        } else {
            last
        };
        let per_request = (MAX_REQUEST_BYTES / self.chunk).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut awaited: Vec<u64> = Vec::new();
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
        Plan {
            first,
            have,
            runs,
            awaited,
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
            plan.have[(index - plan.first) as usize] = Some(self.wait_for(index)?);
        }
        Ok(())
    }

    /// Copies the read's bytes, from `offset`, out of the gathered chunks into `out`.
    fn assemble(&self, plan: &Plan, mut out: &mut [u8], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        while !out.is_empty() {
            let index = pos / self.chunk;
            let data = plan.have[(index - plan.first) as usize]
                .as_ref()
                .ok_or_else(|| {
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
        let mut plan = self.plan(offset, inside as u64);
        self.gather(&mut plan)?;
        self.assemble(&plan, &mut buf[..inside], offset)
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
