//! What can go wrong setting up or tearing down a mount. Failures of single requests are
//! not errors of this kind: they go back to the client as errno values (see `ops`).

use std::io;
use std::path::PathBuf;

/// Why a mount could not be set up or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The mountpoint does not exist.
    #[error(
        "mountpoint {}: does not exist; create an empty file (touch) or a directory to \
         mount on",
        .0.display()
    )]
    MissingMountpoint(PathBuf),
    /// The mountpoint is neither a regular file nor a directory.
    #[error(
        "mountpoint {}: is a {kind}; mount on a regular file or a directory",
        path.display()
    )]
    WrongMountpointType {
        /// The mountpoint.
        path: PathBuf,
        /// What it is instead ("fifo", "socket", ...).
        kind: &'static str,
    },
    /// Something is mounted on the mountpoint already.
    #[error(
        "mountpoint {}: is already a mount point (busy); unmount it first (fusermount3 -u) \
         or choose another",
        .0.display()
    )]
    BusyMountpoint(PathBuf),
    /// The mountpoint is a FUSE mount whose server is gone.
    #[error(
        "mountpoint {}: is a FUSE mount whose server has gone (transport endpoint is not \
         connected); unmount it with fusermount3 -u first",
        .0.display()
    )]
    DeadMount(PathBuf),
    /// The mountpoint could not be examined.
    #[error("mountpoint {}: {cause}", path.display())]
    Mountpoint {
        /// The mountpoint.
        path: PathBuf,
        /// What failed.
        cause: io::Error,
    },
    /// `/dev/fuse` is missing or cannot be opened.
    #[error("{0}")]
    FuseDevice(String),
    /// The kernel or fusermount3 refused the mount.
    #[error("could not mount on {}: {cause}", path.display())]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// What failed.
        cause: io::Error,
    },
    /// A thread the export needs could not be started, or the session failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// What failed.
        cause: io::Error,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
