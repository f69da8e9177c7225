//! The filesystem the kernel talks to: one file that is the disk (the mount's root, or
//! the one entry of a root directory). Requests about names and attributes are answered
//! where they are read; requests that touch the device pass the admission gate and go to
//! the ring thread (reads and writes) or the worker pool (the rest), which answer them.

use crate::admission::{Admission, Ticket};
use crate::export::{DiscardMode, Export, MAX_REQUEST};
use crate::ops::{self, Failure, Outcome};
use crate::replies::{read_and_reply, write_and_reply};
use crate::ring::{Io, RingLink};
use crate::tally::Tally;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use qed::WorkerPool;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// The disk's inode when the mount's root is a directory.
const DISK_IN_DIRECTORY: INodeNo = INodeNo(2);
/// How long the kernel may trust attributes and names. The size never changes while
/// mounted; the allocated size may lag this much.
const TTL: Duration = Duration::from_secs(1);
/// File handle bit: opened for writing (its close flushes what was written).
const WRITABLE: u64 = 1;
/// Requests in flight the kernel may send without waiting (async direct I/O,
/// readahead). Above its default of 12, so that a queue depth of 32 reaches the pool.
const MAX_BACKGROUND: u16 = 128;

/// Where the disk is in the mount.
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// The mount's root is the disk.
    File,
    /// The mount's root is a directory holding the disk under this name.
    Directory(OsString),
}

/// What the filesystem's threads (readers and workers) share.
pub(crate) struct Shared {
    pub(crate) admission: Arc<Admission>,
    /// Started by `Mount::run`, so that no thread exists before then.
    pub(crate) pool: OnceLock<Arc<WorkerPool>>,
    /// The ring thread, where io_uring is available; started with the pool.
    pub(crate) ring: OnceLock<RingLink>,
    size: u64,
    read_only: bool,
    discard: DiscardMode,
    direct_io: bool,
    layout: Layout,
    allocation_from: Option<PathBuf>,
    mounted_at: SystemTime,
    uid: u32,
    gid: u32,
    perm: AtomicU32,
    pub(crate) tally: Arc<Tally>,
}

impl Shared {
    pub(crate) fn new(export: &Export, layout: Layout, admission: Arc<Admission>) -> Self {
        // SAFETY: getters without side effects.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Self {
            admission,
            pool: OnceLock::new(),
            ring: OnceLock::new(),
            size: export.device.size(),
            read_only: export.read_only,
            discard: export.discard,
            direct_io: export.direct_io,
            layout,
            allocation_from: export.allocation_from.clone(),
            mounted_at: SystemTime::now(),
            uid,
            gid,
            perm: AtomicU32::new(if export.read_only { 0o444 } else { 0o644 }),
            tally: Arc::default(),
        }
    }

    fn disk_ino(&self) -> INodeNo {
        match self.layout {
            Layout::File => INodeNo::ROOT,
            Layout::Directory(_) => DISK_IN_DIRECTORY,
        }
    }

    fn is_disk(&self, ino: INodeNo) -> bool {
        ino == self.disk_ino()
    }

    fn is_directory(&self, ino: INodeNo) -> bool {
        matches!(self.layout, Layout::Directory(_)) && ino == INodeNo::ROOT
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let t = self.mounted_at;
        let mut a = FileAttr {
            ino,
            size: self.size,
            blocks: self.allocated_blocks(),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: self.perm.load(Ordering::Relaxed) as u16,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        if self.is_directory(ino) {
            a.size = 0;
            a.blocks = 0;
            a.kind = FileType::Directory;
            a.perm = if self.read_only { 0o555 } else { 0o755 };
            a.nlink = 2;
            return Some(a);
        }
        self.is_disk(ino).then_some(a)
    }

    /// 512-byte blocks the image file takes, so that tools can tell a sparse disk.
    fn allocated_blocks(&self) -> u64 {
        let full = self.size.div_ceil(512);
        self.allocation_from
            .as_deref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(full, |m| m.blocks().min(full))
    }
}

/// The filesystem fuser runs.
pub(crate) struct ExportFs {
    pub(crate) shared: Arc<Shared>,
}

impl ExportFs {
    /// Lets a request of `bytes` in and hands `job` its ticket on a worker; `refuse`
    /// answers the request instead when the export is closing.
    fn submit<R: Send + 'static>(
        &self,
        bytes: usize,
        reply: R,
        refuse: fn(R, Errno),
        job: impl FnOnce(&Shared, Ticket, R) + Send + 'static,
    ) {
        let Some(ticket) = self.shared.admission.admit(bytes) else {
            return refuse(reply, Errno::ENOTCONN);
        };
        let Some(pool) = self.shared.pool.get() else {
            return refuse(reply, Errno::EIO);
        };
        let shared = self.shared.clone();
        pool.execute(move || job(&shared, ticket, reply));
    }

    fn check_disk(&self, ino: INodeNo) -> Result<(), Errno> {
        if self.shared.is_disk(ino) {
            Ok(())
        } else if self.shared.is_directory(ino) {
            Err(Errno::EISDIR)
        } else {
            Err(Errno::ENOENT)
        }
    }

    /// The answer to requests that would change the directory: its one entry is fixed.
    fn fixed_directory(&self) -> Errno {
        if self.shared.read_only {
            Errno::EROFS
        } else {
            Errno::EPERM
        }
    }
}

/// Answers an empty-reply request with its outcome.
fn answer_empty(shared: &Shared, reply: ReplyEmpty, r: Outcome<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(f) => reply.error(shared.tally.errno(f)),
    }
}

impl fuser::Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each setting is a wish: an older kernel that refuses one still serves.
        let _ = config.set_max_write(MAX_REQUEST);
        if let Err(max) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        // Asynchronous direct I/O lets one process keep many requests in flight (libaio,
        // io_uring); without it they reach the export one at a time.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        if self.shared.direct_io {
            // Shared mmap of a direct_io file, for tools that map the disk.
            let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match &self.shared.layout {
            Layout::Directory(disk) if parent == INodeNo::ROOT => {
                match (name == disk.as_os_str())
                    .then(|| self.shared.attr(DISK_IN_DIRECTORY))
                    .flatten()
                {
                    Some(a) => reply.entry(&TTL, &a, Generation(0)),
                    None => reply.error(Errno::ENOENT),
                }
            }
            _ => reply.error(Errno::ENOTDIR),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.shared.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// The size is the disk's: only setting it to what it is succeeds (`qed resize`
    /// changes it). Times are accepted and not kept; the mode's permission bits may
    /// change, but a read-only disk gets no write bits; the owner stays.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = &self.shared;
        let Some(attr) = s.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if size.is_some_and(|n| n != attr.size) {
            return reply.error(if s.read_only {
                Errno::EROFS
            } else {
                Errno::EPERM
            });
        }
        if uid.is_some_and(|u| u != s.uid) || gid.is_some_and(|g| g != s.gid) {
            return reply.error(Errno::EPERM);
        }
        if let Some(m) = mode {
            let perm = m & 0o7777;
            if perm != u32::from(attr.perm) && !s.is_disk(ino) {
                return reply.error(Errno::EPERM);
            }
            if s.read_only && perm & 0o222 != 0 {
                return reply.error(Errno::EROFS);
            }
            if s.is_disk(ino) {
                s.perm.store(perm, Ordering::Relaxed);
            }
        }
        match s.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Err(e) = self.check_disk(ino) {
            return reply.error(e);
        }
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if writing && self.shared.read_only {
            return reply.error(Errno::EROFS);
        }
        let fh = FileHandle(if writing { WRITABLE } else { 0 });
        let open_flags = if self.shared.direct_io {
            // Nothing between the client and the device: a request arrives as it was
            // made, and writes to different places of the file run in parallel.
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            // Only this export changes the disk, so cached pages stay right across opens.
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(fh, open_flags);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Err(e) = self.check_disk(ino) {
            return reply.error(e);
        }
        // The kernel never asks for more than was agreed; a buffer is never larger.
        if size > MAX_REQUEST {
            return reply.error(Errno::EINVAL);
        }
        let Some(ticket) = self.shared.admission.admit(size as usize) else {
            return reply.error(Errno::ENOTCONN);
        };
        if let Some(ring) = self.shared.ring.get() {
            return ring.send(Io::Read {
                offset,
                len: size,
                reply,
                ticket,
            });
        }
        let Some(pool) = self.shared.pool.get() else {
            return reply.error(Errno::EIO);
        };
        let shared = self.shared.clone();
        pool.execute(move || {
            read_and_reply(&shared.tally, &*ticket.device, offset, size, reply);
            drop(ticket);
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Err(e) = self.check_disk(ino) {
            return reply.error(e);
        }
        if self.shared.read_only {
            return reply.error(Errno::EROFS);
        }
        if data.len() > MAX_REQUEST as usize {
            return reply.error(Errno::EINVAL);
        }
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let Some(ticket) = self.shared.admission.admit(data.len()) else {
            return reply.error(Errno::ENOTCONN);
        };
        // The kernel's buffer is reused for the next request as soon as this returns:
        // the payload is copied, into an aligned buffer so O_DIRECT needs no bounce.
        let mut payload = qed::AlignedBuf::new(data.len());
        payload.copy_from_slice(data);
        if let Some(ring) = self.shared.ring.get() {
            return ring.send(Io::Write {
                offset,
                data: payload,
                sync,
                reply,
                ticket,
            });
        }
        let Some(pool) = self.shared.pool.get() else {
            return reply.error(Errno::EIO);
        };
        let shared = self.shared.clone();
        pool.execute(move || {
            write_and_reply(
                &shared.tally,
                &*ticket.device,
                offset,
                &payload,
                sync,
                reply,
            );
            drop(ticket);
        });
    }

    /// Called at every close of a file handle: one opened for writing flushes the image
    /// if anything was written since, so that what a tool wrote is on disk once it has
    /// closed the file.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if fh.0 & WRITABLE == 0 || !self.shared.tally.take_written() {
            return reply.ok();
        }
        self.submit(0, reply, ReplyEmpty::error, |s, t, reply| {
            let r = t.device.flush().map_err(Failure::Device);
            if r.is_err() {
                s.tally.wrote();
            }
            answer_empty(s, reply, r);
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = self.check_disk(ino) {
            return reply.error(e);
        }
        if self.shared.read_only {
            return reply.ok();
        }
        self.submit(0, reply, ReplyEmpty::error, |s, t, reply| {
            answer_empty(s, reply, t.device.flush().map_err(Failure::Device));
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Layout::Directory(name) = &self.shared.layout else {
            return reply.error(Errno::ENOTDIR);
        };
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (DISK_IN_DIRECTORY, FileType::RegularFile, name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.shared.size.div_ceil(4096);
        reply.statfs(blocks, 0, 0, 1, 0, 4096, 255, 4096);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = self.check_disk(ino) {
            return reply.error(e);
        }
        let (read_only, discard) = (self.shared.read_only, self.shared.discard);
        self.submit(0, reply, ReplyEmpty::error, move |s, t, reply| {
            let r = ops::fallocate(&*t.device, read_only, discard, offset, length, mode);
            if r.is_ok() {
                s.tally.wrote();
            }
            answer_empty(s, reply, r);
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if let Err(e) = self.check_disk(ino) {
            return reply.error(e);
        }
        self.submit(
            0,
            reply,
            ReplyLseek::error,
            move |s, t, reply| match ops::seek(&*t.device, offset, whence) {
                Ok(pos) => reply.offset(pos),
                Err(f) => reply.error(s.tally.errno(f)),
            },
        );
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.fixed_directory());
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.fixed_directory());
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.fixed_directory());
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.fixed_directory());
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.fixed_directory());
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.fixed_directory());
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.fixed_directory());
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(self.fixed_directory());
    }
}
