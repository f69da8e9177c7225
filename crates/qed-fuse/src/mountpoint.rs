//! The place a disk is mounted: what it must be before anything is opened, and taking a
//! mount away again.

use crate::error::{Error, Result};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Where the kernel reaches FUSE servers.
const FUSE_DEVICE: &str = "/dev/fuse";

/// A mountpoint that passed [`check_mountpoint`]: an existing regular file, which then
/// reads and writes as the disk, or a directory, in which the disk appears as one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mountpoint {
    /// A regular file: it becomes the disk.
    File(PathBuf),
    /// A directory: the disk appears in it as a file of its own.
    Directory(PathBuf),
}

impl Mountpoint {
    /// The mountpoint's path, with symbolic links resolved.
    pub fn path(&self) -> &Path {
        match self {
            Mountpoint::File(p) | Mountpoint::Directory(p) => p,
        }
    }
}

/// Checks that `path` can be mounted on: it exists, is a regular file or a directory,
/// and nothing is mounted on it yet. Changes nothing, so that it can run before the
/// image is opened.
pub fn check_mountpoint(path: &Path) -> Result<Mountpoint> {
    let meta = std::fs::metadata(path).map_err(|cause| match cause.raw_os_error() {
        Some(libc::ENOENT) => Error::MissingMountpoint(path.to_path_buf()),
        Some(libc::ENOTCONN) => Error::DeadMount(path.to_path_buf()),
        _ => Error::Mountpoint {
            path: path.to_path_buf(),
            cause,
        },
    })?;
    let ty = meta.file_type();
    let kind = if ty.is_file() {
        None
    } else if ty.is_dir() {
        Some(true)
    } else {
        let kind = if ty.is_fifo() {
            "fifo"
        } else if ty.is_socket() {
            "socket"
        } else if ty.is_char_device() {
            "character device"
        } else if ty.is_block_device() {
            "block device"
        } else {
            "special file"
        };
        return Err(Error::WrongMountpointType {
            path: path.to_path_buf(),
            kind,
        });
    };
    let canonical = path.canonicalize().map_err(|cause| Error::Mountpoint {
        path: path.to_path_buf(),
        cause,
    })?;
    if is_mount_point(&canonical) {
        return Err(Error::BusyMountpoint(path.to_path_buf()));
    }
    Ok(match kind {
        Some(true) => Mountpoint::Directory(canonical),
        _ => Mountpoint::File(canonical),
    })
}

/// Checks that the FUSE device exists and opens, so that a machine without FUSE is told
/// so before the image is opened.
pub fn check_fuse_device() -> Result<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::FuseDevice(match e.kind() {
            io::ErrorKind::NotFound => format!(
                "{FUSE_DEVICE} does not exist: load the fuse kernel module (modprobe fuse), \
                 or, in a container, pass the device in (--device {FUSE_DEVICE})"
            ),
            io::ErrorKind::PermissionDenied => format!(
                "{FUSE_DEVICE} cannot be opened: permission denied; make it readable and \
                 writable for this user (it is usually mode 0666)"
            ),
            _ => format!("{FUSE_DEVICE} cannot be opened: {e}"),
        })),
    }
}

/// Whether something is mounted on `path` (a canonical path), by the mount table of this
/// process's namespace. An unreadable table says no: the mount itself then decides.
pub(crate) fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.as_os_str().as_encoded_bytes();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| unescape(field) == wanted)
}

/// Undoes the octal escapes (`\040` for a space, ...) the mount table writes.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Detaches the mount on `path` even while files on it are open (as `fusermount3 -u -z`):
/// new opens fail from now on, and the kernel drops the mount once the last file closes.
pub(crate) fn detach(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    // Not root: the setuid helper may unmount what this user mounted.
    let out = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "-q", "--"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 -u -z failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_escapes() {
        assert_eq!(unescape("/a\\040b"), b"/a b");
        assert_eq!(unescape("/a\\134b"), b"/a\\b");
        assert_eq!(unescape("/plain"), b"/plain");
        assert_eq!(unescape("/end\\04"), b"/end\\04");
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")));
    }

    #[test]
    fn wrong_types_and_missing_paths_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = check_mountpoint(&missing).unwrap_err();
        assert!(matches!(e, Error::MissingMountpoint(_)), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");

        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = check_mountpoint(&fifo).unwrap_err();
        assert!(e.to_string().contains("is a fifo"), "{e}");

        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(check_mountpoint(&file), Ok(Mountpoint::File(_))));
        assert!(matches!(
            check_mountpoint(dir.path()),
            Ok(Mountpoint::Directory(_))
        ));
    }
}
