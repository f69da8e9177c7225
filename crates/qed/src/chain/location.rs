//! Where a name in a chain points, and how its bytes are reached.
//!
//! Every name the chain opens (an image named by the caller, a backing file named in a
//! header) passes through [`Location`]: it is the one place that turns a name into
//! storage. Today a name is a path; remote bases (http, https, s3) become variants here,
//! each opening a storage of its own, and nothing above this module changes.

use crate::error::{IoContext, Result};
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};

/// A place the chain can open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// A file on this host.
    File(PathBuf),
}

impl Location {
    /// The location of a file the caller names.
    pub(crate) fn file(path: &Path) -> Self {
        Location::File(path.to_path_buf())
    }

    /// The location a backing file name stored in `image`'s header points to.
    pub(crate) fn backing(image: &Path, name: &str) -> Self {
        Location::File(resolve_backing_path(image, name))
    }

    /// The path to show in messages and to anchor relative backing names.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Location::File(p) => p,
        }
    }

    /// What identifies the location whatever it is called, for loop detection.
    pub(crate) fn identity(&self) -> Result<PathBuf> {
        match self {
            Location::File(p) => p.canonicalize().context(|| p.display().to_string()),
        }
    }

    /// Opens the bytes at the location.
    pub(crate) fn open_storage(&self, read_only: bool, direct: bool) -> Result<Box<dyn Storage>> {
        match self {
            Location::File(p) => Ok(Box::new(
                FileStorage::open_with(p, read_only, direct).context(|| p.display().to_string())?,
            )),
        }
    }
}

/// Resolves a backing file name as QEMU does: relative names are relative to the
/// directory of the image that names them.
pub fn resolve_backing_path(image_path: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image_path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}
