//! Opening by name: format probing, backing chains and their limits.
//!
//! The chain is the only place that turns a name into a device. It opens a QED image in
//! two steps, as the engine's open gate asks: the engine reads and validates the header
//! ([`Image::begin_open`]), the chain opens the backing file it names (read-only, with
//! the same rules all the way down), and hands it to the engine to finish.

mod create;
mod layers;
mod location;

pub use create::create_qcow2;
pub use layers::{chain_contains, describe, for_each_run, known_zero, map, MapEntry};
pub use location::resolve_backing_path;

use crate::block::{BlockDevice, Format};
use crate::devices::RawDevice;
use crate::engine::{Backing, Image, ImageOptions};
use crate::error::{Error, IoContext, Result};
use crate::format::MAGIC;
use crate::storage::{LockMode, NoFlush, RemoteIdentity, RemoteOptions, Storage};
pub(crate) use location::Location;
use std::path::{Path, PathBuf};

/// How deep a backing chain may go (the image itself excluded).
pub const MAX_CHAIN_DEPTH: usize = 64;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// How to open an image: what the engine needs ([`ImageOptions`], whose fields read
/// and write through these options, as `opts.read_only`), and how the chain finds and
/// opens the files.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// What the engine needs to open a QED image: read-only, the L2 cache's bound, the
    /// repair at open, copy-on-read (which applies to the image itself only: its
    /// backing files stay read-only).
    pub image: ImageOptions,
    /// Do not open the backing chain (reads of unallocated clusters then fail).
    pub no_backing: bool,
    /// Open files with O_DIRECT, bypassing the host page cache (files only).
    pub direct: bool,
    /// Ignore flushes of a file opened for writing (QEMU's cache.no-flush, as in its
    /// cache=unsafe): nothing here waits for the data to reach the disk, which the
    /// system writes back in its own time. For work that is redone after a crash, such
    /// as a copy into a new image.
    pub no_flush: bool,
    /// How images named by http, https or s3 URLs are read.
    pub remote: RemoteOptions,
    /// Take the locks QEMU takes on image files (the default), so that two writers, or a
    /// writer and a reader that wants the file unchanged, are refused whoever they are:
    /// `qed`, qemu-img, qemu-nbd, a VM. Off only for a caller that rules such sharing out
    /// itself (QEMU's `locking=off`).
    pub locking: bool,
    /// Read whatever other processes do to the files (QEMU's force-share, `-U`): a
    /// read-only open that neither waits for writers nor keeps them out. What it reads
    /// may be inconsistent while another process writes.
    pub force_share: bool,
    /// Let another open write the backing files while this image is open, as a commit
    /// into the backing file does: they are locked as `force_share` locks, and this
    /// image reads data that may change under it.
    pub share_backing_writes: bool,
    /// Let a qcow2 image open read-write (through imago), as `convert -n` into an
    /// existing qcow2 image needs. Off by default: the exports and `io` keep qcow2
    /// read-only, since those writes are not proven under concurrent requests and
    /// crashes as the QED engine's are.
    pub qcow2_writes: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            image: ImageOptions::default(),
            no_backing: false,
            direct: false,
            no_flush: false,
            remote: RemoteOptions::default(),
            locking: true,
            force_share: false,
            share_backing_writes: false,
            qcow2_writes: false,
        }
    }
}

impl std::ops::Deref for OpenOptions {
    type Target = ImageOptions;

    fn deref(&self) -> &ImageOptions {
        &self.image
    }
}

impl std::ops::DerefMut for OpenOptions {
    fn deref_mut(&mut self) -> &mut ImageOptions {
        &mut self.image
    }
}

impl OpenOptions {
    /// Options for a read-only open.
    pub fn read_only() -> Self {
        let mut opts = Self::default();
        opts.image.read_only = true;
        opts
    }

    /// The bytes of the file or URL `path`, opened with these options and the locks
    /// they take, for an operation that works on the bytes themselves (such as
    /// converting an image in place).
    pub fn open_bytes(&self, path: &Path) -> Result<Box<dyn Storage>> {
        self.open_storage(&Location::named(path))
    }

    /// `storage`, opened with these options, with its flushes ignored if asked.
    fn flushing(&self, storage: Box<dyn Storage>) -> Box<dyn Storage> {
        if self.no_flush && !self.read_only {
            Box::new(NoFlush(storage))
        } else {
            storage
        }
    }

    /// The options a backing file is opened with: read-only, otherwise the same, and
    /// shared with writers if the image lets them write its backing files.
    fn for_backing(&self) -> Self {
        Self {
            image: ImageOptions {
                read_only: true,
                copy_on_read: false,
                ..self.image.clone()
            },
            force_share: self.force_share || self.share_backing_writes,
            ..self.clone()
        }
    }

    /// The locks a file opened with these options takes (as QEMU's format drivers ask
    /// of their files).
    fn lock_mode(&self) -> Result<LockMode> {
        Ok(match (self.locking, self.read_only, self.force_share) {
            (false, _, _) => LockMode::NONE,
            (true, false, true) => {
                return Err(Error::InvalidArgument(
                    "force-share (-U) only reads: it cannot be used to open an image for \
                     writing"
                        .into(),
                ))
            }
            (true, false, false) => LockMode::WRITER,
            (true, true, false) => LockMode::READER,
            (true, true, true) => LockMode::SHARED_READER,
        })
    }

    /// Opens the bytes at `location` with these options.
    fn open_storage(&self, location: &Location) -> Result<Box<dyn Storage>> {
        let storage =
            location.open_storage(self.read_only, self.direct, self.lock_mode()?, &self.remote)?;
        Ok(self.flushing(storage))
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

/// Opens a device by name: a path, or an `http://`, `https://` or `s3://` URL
/// (read-only).
/// `format` of `None` probes it. A QED image opens its backing chain unless
/// `opts.no_backing`; backing files are always read-only.
pub fn open_device(
    path: &Path,
    format: Option<Format>,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockDevice>> {
    Chain::default().open(&Location::named(path), format, opts, None)
}

/// What the object behind the URL `path` is now (size, ETag, Last-Modified), as an
/// overlay on it would be pinned to; `None` for a name that is not a URL.
pub fn remote_identity_at(path: &Path, opts: &OpenOptions) -> Result<Option<RemoteIdentity>> {
    let location = Location::named(path);
    if !location.is_remote() {
        return Ok(None);
    }
    Ok(location
        .open_storage(true, false, LockMode::NONE, &opts.remote)?
        .remote_identity())
}

/// The remote object an overlay was written against, which the object its backing file
/// names must still be.
struct Pinned<'a> {
    identity: &'a RemoteIdentity,
    /// The overlay, for the message.
    by: &'a str,
}

/// Guesses the format of the image named `path` (a path or a URL) from its first
/// bytes, as [`probe_format`] does.
pub fn probe_format_at(path: &Path, opts: &OpenOptions) -> Result<Format> {
    let location = Location::named(path);
    // The probe takes the locks of the open it precedes, so that a refusal names the
    // right lock, and reads only.
    let storage = location.open_storage(true, false, opts.lock_mode()?, &opts.remote)?;
    probe_format(&*storage).context(|| format!("probing {}", path.display()))
}

/// The header facts of the qcow2 image named `path` (a path or a URL), without opening
/// it as a device: what `qed info` reports of a qcow2 layer.
pub fn qcow2_facts_at(path: &Path, opts: &OpenOptions) -> Result<crate::devices::Qcow2Facts> {
    let location = Location::named(path);
    let storage = location.open_storage(true, false, opts.lock_mode()?, &opts.remote)?;
    crate::devices::Qcow2Facts::read(&*storage, &path.to_string_lossy())
}

/// Whether `name` is a URL that names a remote image (`http://`, `https://` or `s3://`), which
/// the chain opens read-only and does not resolve against other names.
pub fn is_remote_name(name: &str) -> bool {
    Location::named(Path::new(name)).is_remote()
}

impl Image {
    /// Opens an image file (or, read-only, an http, https or s3 URL), with its backing
    /// chain unless `opts.no_backing`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let location = Location::named(path.as_ref());
        let mut chain = Chain::default();
        chain.enter(&location)?;
        let storage = opts.open_storage(&location)?;
        chain.open_image(storage, &location, opts)
    }

    /// Opens an image held in `storage`. `path` names it in messages and anchors
    /// relative backing file names.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        path: &Path,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let location = Location::named(path);
        let mut chain = Chain::default();
        // Storage that is not the file at `path` has no identity of its own to loop on.
        if let Ok(id) = location.identity() {
            chain.files.push(id);
        }
        chain.open_image(opts.flushing(storage), &location, opts)
    }
}

/// The links opened so far, from the top: what a backing file may not lead back to,
/// and how deep the chain has gone.
#[derive(Default)]
struct Chain {
    files: Vec<PathBuf>,
}

impl Chain {
    /// Records `location` as the next link, refusing a loop or a chain too deep.
    fn enter(&mut self, location: &Location) -> Result<()> {
        let id = location.identity()?;
        let refuse = |reason: String| Error::Backing {
            path: location.path().to_path_buf(),
            reason,
        };
        if self.files.contains(&id) {
            return Err(refuse("the backing chain loops back to this file".into()));
        }
        if self.files.len() > MAX_CHAIN_DEPTH {
            return Err(refuse(format!(
                "the backing chain is deeper than {MAX_CHAIN_DEPTH} files"
            )));
        }
        self.files.push(id);
        Ok(())
    }

    /// Opens the device at `location` as the next link.
    fn open(
        &mut self,
        location: &Location,
        format: Option<Format>,
        opts: &OpenOptions,
        pinned: Option<Pinned<'_>>,
    ) -> Result<Box<dyn BlockDevice>> {
        let depth = self.files.len();
        self.enter(location)?;
        let result = self.open_entered(location, format, opts, pinned);
        self.files.truncate(depth);
        result
    }

    fn open_entered(
        &mut self,
        location: &Location,
        format: Option<Format>,
        opts: &OpenOptions,
        pinned: Option<Pinned<'_>>,
    ) -> Result<Box<dyn BlockDevice>> {
        let path = location.path();
        let storage =
            location.open_storage(opts.read_only, opts.direct, opts.lock_mode()?, &opts.remote)?;
        // Before a byte of the object is used: another object under the same name would
        // mix with what the overlay copied from the one it was written against.
        if let (Some(pin), Some(now)) = (&pinned, storage.remote_identity()) {
            if !pin.identity.matches(&now) {
                return Err(Error::Remote {
                    url: path.to_string_lossy().into_owned(),
                    reason: format!(
                        "the object is not the one {} was written against: it was {}, and \
                         is now {now}; reading it would mix the two. Restore that object, \
                         or, if {} is meant to read the new one, accept it with \
                         'qed rebase -u -b {} {}'",
                        pin.by,
                        pin.identity,
                        pin.by,
                        path.display(),
                        pin.by
                    ),
                });
            }
        }
        let storage = opts.flushing(storage);
        let format = match format {
            Some(f) => f,
            None => probe_format(&*storage).context(|| format!("probing {}", path.display()))?,
        };
        let name = path.to_string_lossy().into_owned();
        match format {
            Format::Raw => Ok(Box::new(RawDevice::new(storage, name, opts.read_only)?)),
            Format::Qed => Ok(Box::new(self.open_image(storage, location, opts)?)),
            Format::Qcow2 if location.is_remote() => Err(Error::Unsupported(format!(
                "{}: remote qcow2 images cannot be read yet: use a raw or qed base",
                path.display()
            ))),
            #[cfg(feature = "qcow2")]
            Format::Qcow2 if opts.read_only => {
                let mut locks = self.qcow2_backing_locks(location, &*storage, opts)?;
                locks.insert(0, storage);
                Ok(Box::new(
                    crate::devices::Qcow2Device::open(path)?.holding(locks),
                ))
            }
            #[cfg(feature = "qcow2")]
            Format::Qcow2 if !opts.qcow2_writes => Err(Error::Unsupported(format!(
                "{}: qcow2 images are opened read-only here (only qed convert -n writes \
                 into one); open it read-only, or convert it to QED in place (qed convert \
                 --in-place FILE)",
                path.display()
            ))),
            #[cfg(feature = "qcow2")]
            Format::Qcow2 => {
                let mut locks = self.qcow2_backing_locks(location, &*storage, opts)?;
                locks.insert(0, storage);
                Ok(Box::new(
                    crate::devices::Qcow2Device::open_writable(path, opts.direct, opts.no_flush)?
                        .holding(locks),
                ))
            }
            #[cfg(not(feature = "qcow2"))]
            Format::Qcow2 => Err(Error::Unsupported(format!(
                "{}: this build has no qcow2 support",
                path.display(),
            ))),
        }
    }

    /// The backing files of the qcow2 image at `location` (its file open in `top`),
    /// opened and locked as backing files are: the qcow2 driver opens them itself,
    /// without locks. Down to the first that is not qcow2, or is remote.
    #[cfg(feature = "qcow2")]
    fn qcow2_backing_locks(
        &mut self,
        location: &Location,
        top: &dyn Storage,
        opts: &OpenOptions,
    ) -> Result<Vec<Box<dyn Storage>>> {
        let opts = opts.for_backing();
        let depth = self.files.len();
        let mut held: Vec<Box<dyn Storage>> = Vec::new();
        let mut at = location.clone();
        let mut name =
            crate::devices::Qcow2Facts::read(top, &at.path().to_string_lossy())?.backing_file;
        let result = loop {
            let Some(n) = name.take() else {
                break Ok(held);
            };
            let next = Location::backing(at.path(), &n);
            if next.is_remote() {
                break Ok(held);
            }
            if let Err(e) = self.enter(&next) {
                break Err(e);
            }
            let storage = match opts.open_storage(&next) {
                Ok(s) => s,
                Err(e) => break Err(backing_error(next.path(), e)),
            };
            let shown = next.path().to_string_lossy().into_owned();
            match probe_format(&*storage) {
                Ok(Format::Qcow2) => match crate::devices::Qcow2Facts::read(&*storage, &shown) {
                    Ok(f) => name = f.backing_file,
                    Err(e) => break Err(e),
                },
                Ok(_) => {}
                Err(e) => {
                    break Err(Error::Io {
                        context: format!("probing {shown}"),
                        cause: e,
                    })
                }
            }
            held.push(storage);
            at = next;
        };
        self.files.truncate(depth);
        result
    }

    /// Opens the QED image in `storage`: the engine reads its header, the chain opens
    /// the backing file it names, and the engine finishes with it.
    fn open_image(
        &mut self,
        storage: Box<dyn Storage>,
        location: &Location,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let name = location.path().to_string_lossy().into_owned();
        let overlay = name.clone();
        let opening = Image::begin_open(storage, name)?;
        // A remote base not pinned yet is pinned once opened, if this open may write.
        let mut pin_now = None;
        let backing = match opening.backing_name() {
            None => None,
            Some(name) => {
                let declared_format = opening.declared_backing_format();
                let at = Location::backing(location.path(), name);
                let pinned = opening.backing_pin().map(|identity| Pinned {
                    identity,
                    by: &overlay,
                });
                let device = if opts.no_backing {
                    None
                } else {
                    let dev = self
                        .open(&at, declared_format, &opts.for_backing(), pinned)
                        .map_err(|e| backing_error(at.path(), e))?;
                    if opening.backing_pin().is_none() && !opts.read_only {
                        pin_now = dev.remote_identity();
                    }
                    Some(dev)
                };
                Some(Backing {
                    name: name.to_string(),
                    path: at.path().to_path_buf(),
                    declared_format,
                    device,
                })
            }
        };
        let image = opening.finish(backing, &opts.image)?;
        if let Some(identity) = pin_now {
            match image.set_base_pin(&identity) {
                // A header area too small for the record (an image QEMU made with small
                // clusters and a long name): the pin then lasts as long as this open.
                Err(Error::InvalidArgument(_)) => {}
                r => r?,
            }
        }
        Ok(image)
    }
}

/// The error of a backing file that could not be opened, naming the file once.
fn backing_error(path: &Path, e: Error) -> Error {
    if let Error::Backing { .. } = e {
        return e; // names the link that failed already
    }
    let message = e.to_string();
    let named = format!("{}: ", path.display());
    Error::Backing {
        path: path.to_path_buf(),
        reason: message
            .strip_prefix(&named)
            .map(str::to_string)
            .unwrap_or(message),
    }
}
