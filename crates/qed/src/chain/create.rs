//! Creating an image file by name for a writer that fills it: a new qcow2 image.

use super::{Location, OpenOptions};
use crate::block::BlockDevice;
use crate::devices::{Qcow2CreateOptions, Qcow2Writer};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, LockMode};
use std::path::Path;

/// Creates the qcow2 image `path` (replacing a file there that no other process uses)
/// over `backing` (the device `options.backing_file` names, opened by the caller), and
/// returns it open for writing, with `opts`' direct I/O and flush settings. Bad options
/// are refused before the file is touched. The file becomes an image at the writer's
/// first flush.
pub fn create_qcow2(
    path: &Path,
    options: &Qcow2CreateOptions,
    backing: Option<Box<dyn BlockDevice>>,
    opts: &OpenOptions,
) -> Result<Qcow2Writer> {
    options.validate().map_err(|e| match e {
        Error::InvalidArgument(why) => Error::InvalidArgument(format!("{}: {why}", path.display())),
        e => e,
    })?;
    if options.backing_file.is_some() != backing.is_some() {
        return Err(Error::InvalidArgument(format!(
            "{}: a backing file name needs the backing device, and the device its name",
            path.display()
        )));
    }
    let location = Location::named(path);
    if location.is_remote() {
        return Err(Error::Remote {
            url: path.to_string_lossy().into_owned(),
            reason: "images are created on local files only".into(),
        });
    }
    let created = FileStorage::create(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::ResourceBusy => Error::from_lock(path, e, false),
        _ => Error::Io {
            context: format!("creating {}", path.display()),
            cause: e,
        },
    })?;
    // Opened again to be written, as QEMU opens the file it created: closing the
    // descriptor that emptied the file is what keeps ext4 (auto_da_alloc) from starting
    // the write-back of the whole copy when it is closed, which a copy left to the page
    // cache would wait for. The locks of one descriptor conflict with those of another,
    // so the created file's go first: another process may slip in between, and then this
    // open is refused.
    created
        .lock(LockMode::NONE)
        .map_err(|e| Error::from_lock(path, e, false))?;
    drop(created);
    let storage = location.open_storage(false, opts.direct, opts.lock_mode()?, &opts.remote)?;
    let name = path.to_string_lossy().into_owned();
    Qcow2Writer::create(opts.flushing(storage), name, options.clone(), backing)
}
