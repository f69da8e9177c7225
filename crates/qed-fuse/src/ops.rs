//! What each request does to the device. The mounted file behaves as a disk: its size is
//! fixed, a write that starts at its end finds no space, and what reads as zeros is a
//! hole to `lseek`.

use crate::export::DiscardMode;
use fuser::Errno;
use qed::{AlignedBuf, BlockDevice};

/// `fallocate` modes (linux/falloc.h).
const KEEP_SIZE: i32 = 0x01;
const PUNCH_HOLE: i32 = 0x02;
const ZERO_RANGE: i32 = 0x10;

/// Why a request failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The request itself cannot be honoured (past the end, read-only, ...).
    Refused(Errno),
    /// The device failed: the client gets an errno, the export remembers the message.
    Device(qed::Error),
}

impl From<qed::Error> for Failure {
    fn from(e: qed::Error) -> Self {
        Failure::Device(e)
    }
}

pub(crate) type Outcome<T> = Result<T, Failure>;

/// The errno a device error reaches the client as: the OS error where there is one
/// (ENOSPC of the host filesystem, say), EIO for everything the client cannot act on.
pub(crate) fn errno(e: &qed::Error) -> Errno {
    match e {
        qed::Error::ReadOnly => Errno::EROFS,
        qed::Error::OutOfRange { .. } | qed::Error::InvalidArgument(_) => Errno::EINVAL,
        qed::Error::Unsupported(_) => Errno::EOPNOTSUPP,
        qed::Error::Io { cause, .. } => match cause.raw_os_error() {
            Some(n) if n > 0 => Errno::from_i32(n),
            _ => Errno::EIO,
        },
        _ => Errno::EIO,
    }
}

/// Reads up to `len` bytes at `offset`: short at the end of the disk, empty past it.
pub(crate) fn read(dev: &dyn BlockDevice, offset: u64, len: u32) -> Outcome<AlignedBuf> {
    let size = dev.size();
    if offset >= size {
        return Ok(AlignedBuf::new(0));
    }
    let n = u64::from(len).min(size - offset) as usize;
    let mut buf = AlignedBuf::new(n);
    dev.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// Writes `data` at `offset`: short at the end of the disk, ENOSPC past it, as a block
/// device does. `sync` (the file was opened O_SYNC or O_DSYNC) flushes afterwards.
pub(crate) fn write(
    dev: &dyn BlockDevice,
    read_only: bool,
    offset: u64,
    data: &[u8],
    sync: bool,
) -> Outcome<u32> {
    if read_only {
        return Err(Failure::Refused(Errno::EROFS));
    }
    if data.is_empty() {
        return Ok(0);
    }
    let size = dev.size();
    if offset >= size {
        return Err(Failure::Refused(Errno::ENOSPC));
    }
    let n = (data.len() as u64).min(size - offset) as usize;
    dev.write_at(&data[..n], offset)?;
    if sync {
        dev.flush()?;
    }
    // At most MAX_REQUEST bytes arrive in one request.
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// `fallocate`, as on a block device: the size never changes, PUNCH_HOLE (with
/// KEEP_SIZE, as the kernel demands) and ZERO_RANGE make the range read as zeros, and
/// plain allocation is not supported (a QED image cannot reserve space without writing
/// it, and saying so lets `posix_fallocate` fall back to writing).
pub(crate) fn fallocate(
    dev: &dyn BlockDevice,
    read_only: bool,
    discard: DiscardMode,
    offset: u64,
    len: u64,
    mode: i32,
) -> Outcome<()> {
    if read_only {
        return Err(Failure::Refused(Errno::EROFS));
    }
    let size = dev.size();
    let keep_size = mode & KEEP_SIZE != 0;
    let end = offset
        .checked_add(len)
        .ok_or(Failure::Refused(Errno::EFBIG))?;
    // A range past the end would grow a file that has the disk's size.
    if end > size && !keep_size {
        return Err(Failure::Refused(Errno::EFBIG));
    }
    let end = end.min(size);
    let op = mode & !KEEP_SIZE;
    if op != PUNCH_HOLE && op != ZERO_RANGE {
        return Err(Failure::Refused(Errno::EOPNOTSUPP));
    }
    if offset >= end {
        return Ok(());
    }
    let n = end - offset;
    if op == PUNCH_HOLE && discard == DiscardMode::Unmap {
        dev.discard(offset, n)?;
    }
    // A discard leaves partial clusters and backing data readable; a punched hole must
    // read as zeros everywhere.
    dev.write_zeroes(offset, n)?;
    Ok(())
}

/// `lseek` with SEEK_DATA or SEEK_HOLE, answered from the backing chain's block status:
/// a hole is a run the chain knows reads as zeros, so tools that skip holes copy
/// exactly what is not zero. The end of the disk counts as a hole.
pub(crate) fn seek(dev: &dyn BlockDevice, offset: i64, whence: i32) -> Outcome<i64> {
    let want_data = match whence {
        libc::SEEK_DATA => true,
        libc::SEEK_HOLE => false,
        _ => return Err(Failure::Refused(Errno::EINVAL)),
    };
    let size = dev.size();
    let Ok(mut pos) = u64::try_from(offset) else {
        return Err(Failure::Refused(Errno::ENXIO));
    };
    if pos >= size {
        return Err(Failure::Refused(Errno::ENXIO));
    }
    while pos < size {
        let run = qed::describe(dev, pos, size - pos, 0)?;
        if run.zero != want_data {
            return Ok(pos as i64);
        }
        pos += run.length.max(1);
    }
    if want_data {
        Err(Failure::Refused(Errno::ENXIO))
    } else {
        Ok(size as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;
    const CLUSTER: u64 = 64 << 10;

    fn image(size: u64) -> qed::Image {
        let storage = qed::MemoryStorage::new();
        qed::Image::create_on(&storage, &qed::CreateOptions::new(size)).unwrap();
        qed::Image::open_storage(
            Box::new(storage),
            std::path::Path::new("memory"),
            &qed::OpenOptions::default(),
        )
        .unwrap()
    }

    fn refused<T: std::fmt::Debug>(r: Outcome<T>) -> Errno {
        match r {
            Err(Failure::Refused(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn reads_and_writes_stop_at_the_end() {
        let dev = image(M);
        assert_eq!(write(&dev, false, M - 10, &[7; 100], false).unwrap(), 10);
        assert_eq!(
            refused(write(&dev, false, M, &[7; 1], false)),
            Errno::ENOSPC
        );
        assert_eq!(refused(write(&dev, true, 0, &[7; 1], false)), Errno::EROFS);
        assert_eq!(read(&dev, M - 10, 100).unwrap().to_vec(), vec![7; 10]);
        assert!(read(&dev, M + 5, 100).unwrap().is_empty());
    }

    #[test]
    fn holes_and_zero_ranges_read_as_zeros() {
        let dev = image(4 * M);
        for discard in [DiscardMode::Ignore, DiscardMode::Unmap] {
            write(&dev, false, 0, &vec![9; 4 * M as usize], false).unwrap();
            // Partial clusters at both ends, whole ones in between.
            fallocate(
                &dev,
                false,
                discard,
                1000,
                3 * CLUSTER,
                PUNCH_HOLE | KEEP_SIZE,
            )
            .unwrap();
            fallocate(&dev, false, discard, M + 7, 5000, ZERO_RANGE).unwrap();
            let all = read(&dev, 0, 4 * M as u32).unwrap();
            for (i, b) in all.iter().enumerate() {
                let i = i as u64;
                let zero =
                    (1000..1000 + 3 * CLUSTER).contains(&i) || (M + 7..M + 5007).contains(&i);
                assert_eq!(*b == 0, zero, "byte {i} with {discard:?}");
            }
        }
        // Past the end: clamped with KEEP_SIZE, refused without; plain allocation and
        // the rest of the modes are not supported.
        fallocate(
            &dev,
            false,
            DiscardMode::Ignore,
            4 * M - 10,
            M,
            PUNCH_HOLE | KEEP_SIZE,
        )
        .unwrap();
        let e = fallocate(&dev, false, DiscardMode::Ignore, 4 * M - 10, M, ZERO_RANGE);
        assert_eq!(refused(e), Errno::EFBIG);
        let e = fallocate(&dev, false, DiscardMode::Ignore, 0, M, 0);
        assert_eq!(refused(e), Errno::EOPNOTSUPP);
        let e = fallocate(&dev, false, DiscardMode::Ignore, 0, M, 0x08);
        assert_eq!(refused(e), Errno::EOPNOTSUPP);
        let e = fallocate(&dev, true, DiscardMode::Ignore, 0, M, ZERO_RANGE);
        assert_eq!(refused(e), Errno::EROFS);
    }

    #[test]
    fn seek_finds_data_and_holes() {
        let dev = image(8 * M);
        write(&dev, false, M, &[1; CLUSTER as usize], false).unwrap();
        write(&dev, false, 3 * M, &[1; 2 * CLUSTER as usize], false).unwrap();
        assert_eq!(seek(&dev, 0, libc::SEEK_DATA).unwrap(), M as i64);
        assert_eq!(seek(&dev, 0, libc::SEEK_HOLE).unwrap(), 0);
        assert_eq!(
            seek(&dev, M as i64, libc::SEEK_HOLE).unwrap(),
            (M + CLUSTER) as i64
        );
        assert_eq!(
            seek(&dev, (M + CLUSTER) as i64, libc::SEEK_DATA).unwrap(),
            3 * M as i64
        );
        assert_eq!(
            seek(&dev, 3 * M as i64 + 5, libc::SEEK_DATA).unwrap(),
            3 * M as i64 + 5
        );
        assert_eq!(
            seek(&dev, 3 * M as i64, libc::SEEK_HOLE).unwrap(),
            (3 * M + 2 * CLUSTER) as i64
        );
        assert_eq!(
            refused(seek(&dev, 4 * M as i64, libc::SEEK_DATA)),
            Errno::ENXIO
        );
        assert_eq!(
            seek(&dev, 4 * M as i64, libc::SEEK_HOLE).unwrap(),
            4 * M as i64
        );
        assert_eq!(
            refused(seek(&dev, 8 * M as i64, libc::SEEK_HOLE)),
            Errno::ENXIO
        );
        assert_eq!(refused(seek(&dev, -1, libc::SEEK_DATA)), Errno::ENXIO);
        assert_eq!(refused(seek(&dev, 0, libc::SEEK_END)), Errno::EINVAL);
        // A zeroed data cluster stays data, as block status reports it (and QEMU does).
        fallocate(&dev, false, DiscardMode::Ignore, M, CLUSTER, ZERO_RANGE).unwrap();
        assert_eq!(seek(&dev, 0, libc::SEEK_DATA).unwrap(), M as i64);
    }
}
