//! How remote bases are read ([`RemoteOptions`]), and where their messages go
//! ([`RemoteReport`]).

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// Requests one read may have in flight at once, and readahead requests in flight
    /// for all sequential readers together.
    pub connections: usize,
    /// Bytes fetched per chunk: reads are widened to whole chunks, which are cached.
    /// A power of two from 64 KiB to 16 MiB.
    pub chunk_size: u32,
    /// Upper bound on memory used for cached chunks, in bytes.
    pub cache_bytes: usize,
    /// Bytes first fetched ahead of a read that continues an earlier one (0: no
    /// readahead). Each further read that continues it doubles what is fetched ahead, up
    /// to [`RemoteOptions::readahead_max`], in the background.
    pub readahead: u64,
    /// Most bytes fetched ahead of one sequential reader; at most a quarter of
    /// `cache_bytes` is used whatever is set, so that readahead not read yet never
    /// pushes itself out of the cache.
    pub readahead_max: u64,
    /// Where messages about a server being retried go (nowhere by default).
    pub report: RemoteReport,
    /// The cache on disk that every process of the host shares (none by default; the
    /// `qed` tool turns it on, see [`HostCacheOptions::from_env`]).
    pub host_cache: Option<HostCacheOptions>,
}

/// Smallest chunk: a QED cluster is at least 4 KiB, and a smaller request costs a round
/// trip for little data.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk, which bounds the buffer one request needs.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// Longest timeout or deadline accepted.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(120),
            connections: 8,
            chunk_size: 64 << 10,
            cache_bytes: 64 << 20,
            readahead: 2 << 20,
            readahead_max: 256 << 20,
            report: RemoteReport::default(),
            host_cache: None,
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

/// Where the host cache is and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCacheOptions {
    /// The cache's directory, created when missing.
    pub dir: PathBuf,
    /// Bytes of chunks kept at most (headers included); past it the least recently used
    /// go.
    pub max_bytes: u64,
}

impl HostCacheOptions {
    /// The bound when none is given: room for a few bases' boot and working sets.
    pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;

    /// The cache the environment asks for: `QED_CACHE_DIR` (`none` for no cache), else
    /// `$XDG_CACHE_HOME/qed`, else `~/.cache/qed`; `None` when it says none or names no
    /// directory at all.
    pub fn from_env() -> Option<Self> {
        Self::from_vars(|name| std::env::var_os(name).filter(|v| !v.is_empty()))
    }

    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<Self> {
        let dir = match var("QED_CACHE_DIR") {
            Some(d) if d == "none" => return None,
            Some(d) => PathBuf::from(d),
            None => match var("XDG_CACHE_HOME").map(PathBuf::from) {
                // The XDG rules ignore a relative setting.
                Some(x) if x.is_absolute() => x.join("qed"),
                _ => PathBuf::from(var("HOME")?).join(".cache").join("qed"),
            },
        };
        Some(Self {
            dir,
            max_bytes: Self::DEFAULT_MAX_BYTES,
        })
    }
}
