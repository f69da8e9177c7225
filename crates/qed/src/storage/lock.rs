//! Image locking as QEMU does it, so that every QEMU process on a host and every `qed`
//! process see each other's use of an image file.
//!
//! QEMU (block/file-posix.c, since 2.10) expresses a user's access to a file as a set of
//! permissions it holds and a set it lets others hold. Each permission has two lock
//! bytes in the file: byte `100 + bit` is read-locked (shared) by every user that holds
//! the permission, byte `200 + bit` by every user that does not share it. The locks are
//! open file description (OFD) locks, so they belong to one open of the file, go away
//! with its last descriptor (a killed process holds nothing) and conflict between two
//! opens in one process as between two processes.
//!
//! Taking a set is two steps, in this order: lock the bytes, then test for conflicts (a
//! permission we hold whose "unshared" byte someone else locks, or a permission we do not
//! share whose "held" byte someone else locks). Two openers racing may both fail; they
//! never both succeed.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// One of QEMU's permissions on a file, by its bit (the lock bytes are `100 + bit` and
/// `200 + bit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permission {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

const PERMISSIONS: [Permission; 4] = [
    Permission::ConsistentRead,
    Permission::Write,
    Permission::WriteUnchanged,
    Permission::Resize,
];

impl Permission {
    /// The name QEMU gives the permission in its messages.
    fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    fn mask(self) -> u8 {
        1 << self as u8
    }
}

/// The byte locked by every user holding a permission.
const HELD_BASE: i64 = 100;
/// The byte locked by every user that does not share a permission.
const UNSHARED_BASE: i64 = 200;

const CONSISTENT_READ: u8 = 1;
const WRITE: u8 = 2;
const WRITE_UNCHANGED: u8 = 4;
const RESIZE: u8 = 8;
const ALL: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// What an open of an image file holds and shares, in QEMU's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockMode {
    hold: u8,
    share: u8,
}

impl LockMode {
    /// An image open for writing: it reads, writes and resizes the file, and lets others
    /// only read it (QEMU's format driver on its file, read-write).
    pub const WRITER: LockMode = LockMode {
        hold: CONSISTENT_READ | WRITE | RESIZE,
        share: CONSISTENT_READ | WRITE_UNCHANGED,
    };
    /// An image (or a backing file) open for reading: nobody may write or resize it
    /// meanwhile, since its metadata must stay consistent.
    pub const READER: LockMode = LockMode {
        hold: CONSISTENT_READ,
        share: CONSISTENT_READ | WRITE_UNCHANGED,
    };
    /// A read that lets anyone write (QEMU's `force-share`, `-U`): it blocks nobody,
    /// and nobody blocks it.
    pub const SHARED_READER: LockMode = LockMode {
        hold: CONSISTENT_READ,
        share: ALL,
    };
    /// A file being created (truncated and written from scratch): nobody may be using it.
    pub const CREATOR: LockMode = LockMode {
        hold: WRITE | RESIZE,
        share: ALL & !RESIZE,
    };
    /// No locks at all.
    pub const NONE: LockMode = LockMode {
        hold: 0,
        share: ALL,
    };

    /// The bytes this mode locks.
    fn bytes(self) -> impl Iterator<Item = i64> {
        PERMISSIONS.into_iter().flat_map(move |p| {
            let held = (self.hold & p.mask() != 0).then_some(HELD_BASE + p as i64);
            let unshared = (self.share & p.mask() == 0).then_some(UNSHARED_BASE + p as i64);
            held.into_iter().chain(unshared)
        })
    }
}

/// Why a set of locks could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another open of the file holds or refuses to share what this one needs; the text
    /// is QEMU's (`Failed to get "write" lock`).
    Conflict(String),
    /// The locking call itself failed.
    Io(io::Error),
}

/// Which kind of locks this host has: OFD locks, or only per-process POSIX locks (a
/// kernel before 3.15), found by the first locking call.
static POSIX_FALLBACK: AtomicBool = AtomicBool::new(false);
static WARNED_POSIX: AtomicBool = AtomicBool::new(false);
static WARNED_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// What a failed locking call means for the caller.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// The kernel has no OFD locks: use POSIX locks.
    NoOfd,
    /// The file system cannot lock at all: go on without locks.
    Unsupported,
    /// A real error.
    Other,
}

fn classify(e: &io::Error, ofd: bool) -> Refusal {
    match e.raw_os_error() {
        Some(libc::EINVAL) if ofd => Refusal::NoOfd,
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => Refusal::Unsupported,
        _ => Refusal::Other,
    }
}

fn fcntl_lock(
    fd: RawFd,
    cmd: libc::c_int,
    kind: libc::c_short,
    byte: i64,
) -> io::Result<libc::flock> {
    // SAFETY: flock is plain old data; zero is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: fcntl with a lock command reads and writes the flock we pass, nothing else.
    if unsafe { libc::fcntl(fd, cmd, &mut fl) } == 0 {
        Ok(fl)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The commands of the lock flavour in use: (set, get).
fn commands() -> (libc::c_int, libc::c_int) {
    if POSIX_FALLBACK.load(Ordering::Relaxed) {
        (libc::F_SETLK, libc::F_GETLK)
    } else {
        (libc::F_OFD_SETLK, libc::F_OFD_GETLK)
    }
}

/// Runs a locking call, moving to POSIX locks once if the kernel has no OFD locks.
fn with_fallback<T>(
    mut call: impl FnMut(libc::c_int, libc::c_int) -> io::Result<T>,
) -> io::Result<T> {
    let (set, get) = commands();
    match call(set, get) {
        Err(e) if classify(&e, set == libc::F_OFD_SETLK) == Refusal::NoOfd => {
            POSIX_FALLBACK.store(true, Ordering::Relaxed);
            if !WARNED_POSIX.swap(true, Ordering::Relaxed) {
                crate::warnings::warn(
                    "file lock requested but OFD locking syscall is unavailable, falling back \
                     to POSIX file locks; due to the implementation, locks can be lost \
                     unexpectedly",
                );
            }
            let (set, get) = commands();
            call(set, get)
        }
        r => r,
    }
}

/// Moves the locks of `fd` from mode `from` to mode `to`: locks the bytes `to` needs,
/// checks that no other open conflicts, then unlocks the bytes only `from` needed. On a
/// conflict the file is left with `from`'s locks. A file system that cannot lock is
/// warned about once and treated as locked.
pub(crate) fn relock(fd: RawFd, from: LockMode, to: LockMode) -> Result<(), LockError> {
    match apply(fd, from, to) {
        Err(LockError::Io(e)) if classify(&e, false) == Refusal::Unsupported => {
            if !WARNED_UNSUPPORTED.swap(true, Ordering::Relaxed) {
                crate::warnings::warn(&format!(
                    "this file system cannot lock files ({e}): images are opened without \
                     the locks that keep other processes from writing them at the same time"
                ));
            }
            Ok(())
        }
        r => r,
    }
}

fn apply(fd: RawFd, from: LockMode, to: LockMode) -> Result<(), LockError> {
    let old: Vec<i64> = from.bytes().collect();
    let new: Vec<i64> = to.bytes().collect();
    let set = |byte: i64, kind| with_fallback(|set, _| fcntl_lock(fd, set, kind, byte).map(|_| ()));
    let mut taken = Vec::new();
    let undo = |taken: &[i64]| {
        for &b in taken {
            let _ = set(b, libc::F_UNLCK as libc::c_short);
        }
    };
    for &b in new.iter().filter(|b| !old.contains(b)) {
        if let Err(e) = set(b, libc::F_RDLCK as libc::c_short) {
            undo(&taken);
            return Err(LockError::Io(e));
        }
        taken.push(b);
    }
    if let Err(e) = check(fd, to) {
        undo(&taken);
        return Err(e);
    }
    for &b in old.iter().filter(|b| !new.contains(b)) {
        set(b, libc::F_UNLCK as libc::c_short).map_err(LockError::Io)?;
    }
    Ok(())
}

/// Takes an exclusive lock on byte `byte` of `fd` without waiting: `Ok(false)` when
/// another open holds it. Used for claims between processes that are not QEMU's (the
/// host cache's chunk fetches), with the same OFD semantics: a killed process holds
/// nothing, and two opens in one process exclude each other.
pub(crate) fn try_lock_byte(fd: RawFd, byte: u64) -> io::Result<bool> {
    try_byte(fd, byte, libc::F_WRLCK)
}

/// Takes a shared lock on byte `byte` of `fd` without waiting: `Ok(false)` when another
/// open holds it exclusively.
pub(crate) fn try_share_byte(fd: RawFd, byte: u64) -> io::Result<bool> {
    try_byte(fd, byte, libc::F_RDLCK)
}

/// Releases a lock [`try_lock_byte`] or [`try_share_byte`] took.
pub(crate) fn unlock_byte(fd: RawFd, byte: u64) -> io::Result<()> {
    try_byte(fd, byte, libc::F_UNLCK).map(|_| ())
}

/// Whether another open holds byte `byte` of `fd` exclusively: a look, taking nothing.
pub(crate) fn byte_locked_elsewhere(fd: RawFd, byte: u64) -> io::Result<bool> {
    let byte = i64::try_from(byte).map_err(io::Error::other)?;
    with_fallback(|_, get| fcntl_lock(fd, get, libc::F_RDLCK as libc::c_short, byte))
        .map(|fl| fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn try_byte(fd: RawFd, byte: u64, kind: libc::c_int) -> io::Result<bool> {
    let byte = i64::try_from(byte).map_err(io::Error::other)?;
    match with_fallback(|set, _| fcntl_lock(fd, set, kind as libc::c_short, byte)) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether another open of the file locks `byte`.
fn locked_by_other(fd: RawFd, byte: i64) -> io::Result<bool> {
    with_fallback(|_, get| fcntl_lock(fd, get, libc::F_WRLCK as libc::c_short, byte))
        .map(|fl| fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Looks for another open that conflicts with `mode`, in QEMU's order and words.
fn check(fd: RawFd, mode: LockMode) -> Result<(), LockError> {
    for p in PERMISSIONS {
        if mode.hold & p.mask() != 0
            && locked_by_other(fd, UNSHARED_BASE + p as i64).map_err(LockError::Io)?
        {
            return Err(LockError::Conflict(format!(
                "Failed to get \"{}\" lock",
                p.name()
            )));
        }
        if mode.share & p.mask() == 0
            && locked_by_other(fd, HELD_BASE + p as i64).map_err(LockError::Io)?
        {
            return Err(LockError::Conflict(format!(
                "Failed to get shared \"{}\" lock",
                p.name()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsRawFd;

    fn two_opens() -> (tempfile::TempDir, File, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let a = File::options().read(true).write(true).open(&path).unwrap();
        let b = File::options().read(true).write(true).open(&path).unwrap();
        (dir, a, b)
    }

    #[test]
    fn bytes_are_qemus() {
        let w: Vec<i64> = LockMode::WRITER.bytes().collect();
        assert_eq!(w, [100, 101, 201, 103, 203]);
        let r: Vec<i64> = LockMode::READER.bytes().collect();
        assert_eq!(r, [100, 201, 203]);
        let u: Vec<i64> = LockMode::SHARED_READER.bytes().collect();
        assert_eq!(u, [100]);
        assert_eq!(LockMode::NONE.bytes().count(), 0);
    }

    #[test]
    fn writers_exclude_each_other_and_readers() {
        let (_d, a, b) = two_opens();
        relock(a.as_raw_fd(), LockMode::NONE, LockMode::WRITER).unwrap();
        let Err(LockError::Conflict(m)) = relock(b.as_raw_fd(), LockMode::NONE, LockMode::WRITER)
        else {
            panic!("a second writer was let in");
        };
        assert_eq!(m, "Failed to get \"write\" lock");
        let Err(LockError::Conflict(m)) = relock(b.as_raw_fd(), LockMode::NONE, LockMode::READER)
        else {
            panic!("a reader was let in beside a writer");
        };
        assert_eq!(m, "Failed to get shared \"write\" lock");
        relock(b.as_raw_fd(), LockMode::NONE, LockMode::SHARED_READER).unwrap();
        // A failed attempt leaves nothing behind: once the writer goes, a reader gets in.
        relock(a.as_raw_fd(), LockMode::WRITER, LockMode::NONE).unwrap();
        relock(b.as_raw_fd(), LockMode::SHARED_READER, LockMode::READER).unwrap();
        let Err(LockError::Conflict(_)) = relock(a.as_raw_fd(), LockMode::NONE, LockMode::CREATOR)
        else {
            panic!("a file in use was let be created over");
        };
    }

    #[test]
    fn readers_share() {
        let (_d, a, b) = two_opens();
        relock(a.as_raw_fd(), LockMode::NONE, LockMode::READER).unwrap();
        relock(b.as_raw_fd(), LockMode::NONE, LockMode::READER).unwrap();
        assert!(matches!(
            relock(b.as_raw_fd(), LockMode::READER, LockMode::WRITER),
            Err(LockError::Conflict(_))
        ));
        // The refused upgrade kept the reader's locks.
        assert!(matches!(
            relock(a.as_raw_fd(), LockMode::READER, LockMode::WRITER),
            Err(LockError::Conflict(_))
        ));
    }

    #[test]
    fn errors_are_classified() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(classify(&e(libc::EINVAL), true), Refusal::NoOfd);
        assert_eq!(classify(&e(libc::EINVAL), false), Refusal::Other);
        assert_eq!(classify(&e(libc::ENOLCK), true), Refusal::Unsupported);
        assert_eq!(classify(&e(libc::EOPNOTSUPP), false), Refusal::Unsupported);
        assert_eq!(classify(&e(libc::EBADF), true), Refusal::Other);
    }
}
