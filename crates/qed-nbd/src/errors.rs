//! How failures reach the client: library and I/O errors as NBD error values.

use crate::proto::errno;

/// Maps a library error to an NBD error value; `writing` says whether the request
/// wrote, since running out of range then means running out of space.
pub(crate) fn nbd_error(e: &qed::Error, writing: bool) -> u32 {
    match e {
        qed::Error::ReadOnly => errno::EPERM,
        qed::Error::OutOfRange { .. } if writing => errno::ENOSPC,
        qed::Error::OutOfRange { .. } | qed::Error::InvalidArgument(_) => errno::EINVAL,
        qed::Error::Io { cause, .. } => io_errno(cause),
        _ => errno::EIO,
    }
}

/// Maps an I/O error to an NBD error value. The protocol asks for EDQUOT and EFBIG to be
/// reported as ENOSPC too.
pub(crate) fn io_errno(cause: &std::io::Error) -> u32 {
    match cause.kind() {
        std::io::ErrorKind::StorageFull
        | std::io::ErrorKind::QuotaExceeded
        | std::io::ErrorKind::FileTooLarge => errno::ENOSPC,
        _ => errno::EIO,
    }
}
