//! Where a name in a chain points, and how its bytes are reached.
//!
//! Every name the chain opens (an image named by the caller, a backing file named in a
//! header) passes through [`Location`]: it is the one place that turns a name into
//! storage. A name is a path, an `http://` / `https://` URL, or an `s3://BUCKET/KEY`
//! URL; each kind of remote base is a variant here, opening a storage of its own, and
//! nothing above this module tells them apart.

use crate::error::{Error, Result};
use crate::storage::{
    is_http_url, is_s3_url, FileStorage, HttpStorage, LockMode, RemoteOptions, S3Storage, Storage,
};
use std::path::{Path, PathBuf};

/// A place the chain can open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// A file on this host.
    File(PathBuf),
    /// An object behind an http or https URL, read-only.
    Http(String),
    /// An object in S3 (`s3://BUCKET/KEY`), read-only.
    S3(String),
}

impl Location {
    /// The location of an image the caller names: a URL, or else a file.
    pub(crate) fn named(path: &Path) -> Self {
        match path.to_str() {
            Some(name) if is_http_url(name) => Location::Http(name.to_string()),
            Some(name) if is_s3_url(name) => Location::S3(name.to_string()),
            _ => Location::File(path.to_path_buf()),
        }
    }

    /// The location a backing file name stored in `image`'s header points to.
    pub(crate) fn backing(image: &Path, name: &str) -> Self {
        Location::named(&resolve_backing_path(image, name))
    }

    /// The name to show in messages and to anchor relative backing names.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Location::File(p) => p,
            Location::Http(url) | Location::S3(url) => Path::new(url),
        }
    }

    /// Whether the location is on a server, and so read-only.
    pub(crate) fn is_remote(&self) -> bool {
        matches!(self, Location::Http(_) | Location::S3(_))
    }

    /// What identifies the location whatever it is called, for loop detection.
    pub(crate) fn identity(&self) -> Result<PathBuf> {
        match self {
            Location::File(p) => p.canonicalize().map_err(|e| file_error(p, e)),
            Location::Http(url) | Location::S3(url) => Ok(PathBuf::from(url)),
        }
    }

    /// Opens the bytes at the location. `direct` (O_DIRECT) and `lock` (QEMU's image
    /// locks) apply to files only.
    pub(crate) fn open_storage(
        &self,
        read_only: bool,
        direct: bool,
        lock: LockMode,
        remote: &RemoteOptions,
    ) -> Result<Box<dyn Storage>> {
        match self {
            Location::File(p) => {
                let s =
                    FileStorage::open_with(p, read_only, direct).map_err(|e| file_error(p, e))?;
                s.lock(lock)
                    .map_err(|e| Error::from_lock(p, e, lock == LockMode::READER))?;
                Ok(Box::new(s))
            }
            Location::Http(url) | Location::S3(url) if !read_only => Err(Error::Remote {
                url: url.clone(),
                reason: "a remote image can only be opened read-only; to change it, create \
                         a local overlay on it (qed create -b URL)"
                    .into(),
            }),
            Location::Http(url) => Ok(Box::new(HttpStorage::open(url, remote)?)),
            Location::S3(url) => Ok(Box::new(S3Storage::open(url, remote)?)),
        }
    }
}

/// The error of a file that could not be opened. A missing file named like ftp://... is
/// more likely a URL of a kind not read here than a path: that is said rather than "no
/// such file".
fn file_error(p: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound && looks_like_url(p) {
        return Error::Unsupported(format!(
            "{}: no such file, and only http://, https:// and s3:// URLs name remote images",
            p.display()
        ));
    }
    Error::Io {
        context: p.display().to_string(),
        cause: e,
    }
}

/// Whether `path` reads as `scheme://...`.
fn looks_like_url(path: &Path) -> bool {
    path.to_str()
        .and_then(|s| s.split_once("://"))
        .is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+')
        })
}

/// Resolves a backing file name as QEMU does: a URL stays as it is; other names that
/// are relative are relative to the directory of the image that names them (for an
/// image behind a URL, to the URL's directory, on the same server or in the same
/// bucket).
pub fn resolve_backing_path(image_path: &Path, name: &str) -> PathBuf {
    if is_http_url(name) || is_s3_url(name) {
        return PathBuf::from(name);
    }
    if let Some(image_url) = image_path.to_str().filter(|s| is_http_url(s)) {
        return PathBuf::from(resolve_against_url(image_url, name, true));
    }
    // An S3 key is all of what follows the bucket: '?' and '#' are part of it.
    if let Some(image_url) = image_path.to_str().filter(|s| is_s3_url(s)) {
        return PathBuf::from(resolve_against_url(image_url, name, false));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image_path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// `name` relative to the URL `base`: an absolute path replaces the base's path, a
/// relative one its last segment. The query of the base (when `has_query`) is not
/// carried over.
fn resolve_against_url(base: &str, name: &str, has_query: bool) -> String {
    let base = if has_query {
        base.split(['?', '#']).next().unwrap_or(base)
    } else {
        base
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let origin_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    if name.starts_with('/') {
        return format!("{}{name}", &base[..origin_end]);
    }
    let dir_end = base[origin_end..]
        .rfind('/')
        .map_or(base.len(), |i| origin_end + i);
    format!("{}/{name}", &base[..dir_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_not_resolved_against_the_image() {
        let b = resolve_backing_path(Path::new("/images/top.qed"), "https://h:8/a/base.qed");
        assert_eq!(b, PathBuf::from("https://h:8/a/base.qed"));
        assert_eq!(
            Location::backing(Path::new("dir/top.qed"), "http://h/base"),
            Location::Http("http://h/base".into())
        );
        assert_eq!(
            Location::backing(Path::new("dir/top.qed"), "base.qed"),
            Location::File(PathBuf::from("dir/base.qed"))
        );
    }

    #[test]
    fn s3_names_are_remote_and_relative_names_stay_in_the_bucket() {
        assert_eq!(
            Location::backing(Path::new("dir/top.qed"), "s3://b/k/base.qed"),
            Location::S3("s3://b/k/base.qed".into())
        );
        assert!(Location::named(Path::new("S3://b/k")).is_remote());
        let img = Path::new("s3://b/dir/top?.qed");
        assert_eq!(
            resolve_backing_path(img, "base.raw"),
            PathBuf::from("s3://b/dir/base.raw")
        );
        assert_eq!(
            resolve_backing_path(img, "/other/base.raw"),
            PathBuf::from("s3://b/other/base.raw")
        );
        assert_eq!(
            resolve_backing_path(img, "http://h/base.raw"),
            PathBuf::from("http://h/base.raw")
        );
    }

    #[test]
    fn relative_names_in_remote_images_stay_on_the_server() {
        let img = Path::new("http://h:80/a/b/top.qed?x=1");
        assert_eq!(
            resolve_backing_path(img, "base.raw"),
            PathBuf::from("http://h:80/a/b/base.raw")
        );
        assert_eq!(
            resolve_backing_path(img, "/c/base.raw"),
            PathBuf::from("http://h:80/c/base.raw")
        );
        assert_eq!(
            resolve_backing_path(Path::new("http://h"), "base.raw"),
            PathBuf::from("http://h/base.raw")
        );
    }
}
