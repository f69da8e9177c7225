//! Read-only storage whose bytes live on a server: the object is fetched in chunks, on
//! demand, through a [`RangeSource`], and kept in a bounded cache of chunks.
//!
//! The split keeps what every protocol shares in the chunk cache ([`cache`]: chunking,
//! caching, coalescing, readahead, parallel requests, the read-only refusals) and leaves
//! a source only the question of how to fetch one byte range exactly. Both sources are
//! ranged GETs ([`ranged_get`]); plain URLs ([`http`]) and S3 ([`s3`]) differ only in
//! how each request is addressed and signed and how its refusals read. [`options`] says
//! how all of them are read. Objects are written only to S3, whole, by multipart upload
//! ([`upload`]).

mod cache;
mod host_cache;
mod http;
mod options;
mod ranged_get;
mod s3;
mod upload;

pub use host_cache::{
    clear_host_cache, host_cache_info, prune_host_cache, CachedObject, HostCacheInfo, PruneReport,
};
pub(crate) use http::is_http_url;
pub use http::HttpStorage;
pub use options::{HostCacheOptions, RemoteOptions, RemoteReport, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
pub(crate) use s3::is_s3_url;
pub use s3::{S3Config, S3Credentials, S3Storage};
pub use upload::{part_size_for, S3Upload, MAX_PARTS, MAX_PART_SIZE, MIN_PART_SIZE};

use std::fmt::Debug;
use std::io;

/// Whether `name` starts with `scheme` (given in lower case), in any case.
pub(crate) fn has_scheme(name: &str, scheme: &str) -> bool {
    name.get(..scheme.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
}

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
/// Implements [`Storage`](crate::storage::Storage) for a type whose `inner` is a
/// [`RemoteStorage`](cache::RemoteStorage).
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
            fn direct_span(&self, offset: u64, len: u64) -> Option<$crate::storage::DirectSpan> {
                self.inner.direct_span(offset, len)
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
    /// What names these exact bytes across processes (address, version and size), for
    /// the host cache; `None` when no request can be tied to a version (the server gave
    /// neither a strong ETag nor Last-Modified), which keeps the object out of it.
    fn cache_key(&self) -> Option<String>;
}
