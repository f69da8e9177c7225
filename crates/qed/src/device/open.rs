//! Opening a device by path: format probing and backing chains.

use super::{BlockDevice, Format, RawDevice};
use crate::engine::Image;
use crate::error::{Error, IoContext, Result};
use crate::format::MAGIC;
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};

/// How deep a backing chain may go (the image itself excluded).
pub const MAX_CHAIN_DEPTH: usize = 64;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Refuse writes; do not touch the file.
    pub read_only: bool,
    /// Do not open the backing chain (reads of unallocated clusters then fail).
    pub no_backing: bool,
    /// Upper bound on memory used for cached L2 table entries, in bytes.
    pub l2_cache_bytes: usize,
    /// On a read-write open of an image with NEED_CHECK set, check and repair it first
    /// (turn this off only to run a repair of your own right after opening).
    pub repair_on_open: bool,
    /// Open files with O_DIRECT, bypassing the host page cache.
    pub direct: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            no_backing: false,
            l2_cache_bytes: crate::engine::DEFAULT_L2_CACHE_BYTES,
            repair_on_open: true,
            direct: false,
        }
    }
}

impl OpenOptions {
    /// Options for a read-only open.
    pub fn read_only() -> Self {
        Self {
            read_only: true,
            ..Self::default()
        }
    }
}

/// Guesses a file's format from its first bytes: QED, qcow2, else raw.
pub fn probe_format(storage: &dyn Storage) -> std::io::Result<Format> {
    let mut magic = [0u8; 4];
    if storage.len()? >= 4 {
        storage.read_at(&mut magic, 0)?;
    }
    Ok(match magic {
        MAGIC => Format::Qed,
        QCOW2_MAGIC => Format::Qcow2,
        _ => Format::Raw,
    })
}

/// Opens a device by path. `format` of `None` probes it. A QED image opens its
/// backing chain unless `opts.no_backing`; backing files are always read-only.
pub fn open_device(
    path: &Path,
    format: Option<Format>,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockDevice>> {
    open_in_chain(path, format, opts, &mut Vec::new())
}

/// Opens one link of a chain. `chain` holds the canonical paths of the images above it.
pub(crate) fn open_in_chain(
    path: &Path,
    format: Option<Format>,
    opts: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn BlockDevice>> {
    let canonical = path
        .canonicalize()
        .context(|| format!("opening {}", path.display()))?;
    if chain.contains(&canonical) {
        return Err(Error::Backing {
            path: path.to_path_buf(),
            reason: "the backing chain loops back to this file".into(),
        });
    }
    if chain.len() > MAX_CHAIN_DEPTH {
        return Err(Error::Backing {
            path: path.to_path_buf(),
            reason: format!("the backing chain is deeper than {MAX_CHAIN_DEPTH} files"),
        });
    }
    let storage = FileStorage::open_with(path, opts.read_only, opts.direct)
        .context(|| format!("opening {}", path.display()))?;
    let format = match format {
        Some(f) => f,
        None => probe_format(&storage).context(|| format!("probing {}", path.display()))?,
    };
    let name = path.to_string_lossy().into_owned();
    match format {
        Format::Raw => Ok(Box::new(RawDevice::new(
            Box::new(storage),
            name,
            opts.read_only,
        )?)),
        Format::Qed => {
            chain.push(canonical);
            let image = Image::open_storage_in_chain(Box::new(storage), path, opts, chain);
            chain.pop();
            Ok(Box::new(image?))
        }
        #[cfg(feature = "qcow2")]
        Format::Qcow2 if opts.read_only => Ok(Box::new(super::Qcow2Device::open(path)?)),
        Format::Qcow2 => Err(Error::Unsupported(format!(
            "{}: qcow2 images can only be opened read-only{}",
            path.display(),
            if cfg!(feature = "qcow2") {
                ""
            } else {
                " (and this build has no qcow2 support)"
            }
        ))),
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
