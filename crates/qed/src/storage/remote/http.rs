//! Objects behind plain `http://` and `https://` URLs: [`HttpStorage`], a
//! [`RangedGet`] of the URL as it is, read through the chunk cache.

use super::cache::RemoteStorage;
use super::has_scheme;
use super::options::RemoteOptions;
use super::ranged_get::{Failure, RangedGet, Target};
use crate::error::{Error, Result};

/// Whether `name` is a URL this module opens.
pub(crate) fn is_http_url(name: &str) -> bool {
    has_scheme(name, "http://") || has_scheme(name, "https://")
}
/// A read-only object behind an `http://` or `https://` URL, as
/// [`Storage`](crate::storage::Storage).
///
/// Reads are cached in chunks (see [`RemoteOptions`]); writes fail with
/// [`std::io::ErrorKind::ReadOnlyFilesystem`].
#[derive(Debug)]
pub struct HttpStorage {
    inner: RemoteStorage<RangedGet<PlainUrl>>,
}

impl HttpStorage {
    /// Opens the object at `url`: finds its size with a one-byte ranged GET (servers
    /// that do not answer it with a 206 are refused) and pins its ETag or Last-Modified.
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<Self> {
        let remote = |reason: String| Error::Remote {
            url: url.to_string(),
            reason,
        };
        if !is_http_url(url) {
            return Err(remote("not an http:// or https:// URL".into()));
        }
        opts.validate().map_err(remote)?;
        let source = RangedGet::open(PlainUrl(url.to_string()), opts).map_err(remote)?;
        Ok(Self {
            inner: RemoteStorage::new(source, opts),
        })
    }

    /// The URL, as given.
    pub fn url(&self) -> &str {
        self.inner.source().target.name()
    }
}

super::delegate_storage!(HttpStorage);

/// A URL that is fetched as it is.
#[derive(Debug)]
pub(crate) struct PlainUrl(String);

impl Target for PlainUrl {
    fn name(&self) -> &str {
        &self.0
    }

    fn url(&self) -> Result<String, String> {
        Ok(self.0.clone())
    }

    fn refusal(&self, status: u16, _body: &[u8]) -> Failure {
        match status {
            404 => Failure::fatal("the server answered 404 (not found): check the URL"),
            401 | 403 => Failure::fatal(format!(
                "the server answered {status} (access denied): check the URL and its credentials"
            )),
            s => Failure::fatal(format!("the server answered {s}")),
        }
    }
}
