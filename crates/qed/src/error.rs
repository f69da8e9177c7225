//! The library's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong opening, creating or using an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error, with what was being done when it happened. The message includes
    /// the OS error, so it is not repeated as a `source()`.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        cause: io::Error,
    },

    /// The file does not start with the QED magic.
    #[error(
        "{} not a QED image (no QED magic: it starts with {found:02x?}, not \"QED\\0\"); \
         if it is a raw or qcow2 image, name that format",
        subject(file, "is", "this is")
    )]
    BadMagic {
        /// The image file, as it was named.
        file: String,
        /// The first four bytes of the file.
        found: [u8; 4],
    },

    /// A header field breaks a rule of the format.
    #[error("{}invalid QED header: {field} = {value}: {reason}", prefix(file))]
    InvalidHeader {
        /// The image file, as it was named.
        file: String,
        /// Name of the field, as in the format's header layout.
        field: &'static str,
        /// The value found.
        value: u64,
        /// The rule it breaks.
        reason: String,
    },

    /// The image uses incompatible features this implementation does not know.
    #[error(
        "{}unsupported QED feature bits {bits:#x}: the image needs a newer implementation",
        prefix(file)
    )]
    UnsupportedFeatures {
        /// The image file, as it was named.
        file: String,
        /// The unknown bits of `features`.
        bits: u64,
    },

    /// A table entry points somewhere it may not.
    #[error("corrupt image: {table} entry {index} = {value:#x}: {reason}; run 'qed check -r all'")]
    CorruptTable {
        /// Which table ("L1", or "L2 at 0x...").
        table: String,
        /// Index of the entry in its table.
        index: u64,
        /// The raw entry value.
        value: u64,
        /// Why it is invalid.
        reason: &'static str,
    },

    /// An argument the caller passed is not acceptable.
    #[error("{0}")]
    InvalidArgument(String),

    /// A request reaches past the end of the device.
    #[error("request at offset {offset} of {len} bytes is past the end of the {size}-byte device")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the device.
        size: u64,
    },

    /// A write was attempted on a device opened read-only.
    #[error("the image is open read-only")]
    ReadOnly,

    /// A backing file could not be used.
    #[error("backing file {path}: {reason}")]
    Backing {
        /// The backing file's path as resolved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A remote image (an http or https URL) could not be opened or read.
    #[error("{url}: {reason}")]
    Remote {
        /// The URL, as it was named.
        url: String,
        /// What went wrong, and what to do about it.
        reason: String,
    },

    /// Another open of the file (another process: `qed`, QEMU) uses it in a way this open
    /// conflicts with, as QEMU's image locks tell.
    #[error(
        "{}: {reason}: is another process (qed, qemu-nbd, a VM) using the image? Wait for \
         it to end or stop it{}",
        path.display(),
        if *reading { "; to read it anyway, open it with -U (--force-share), which skips the \
         wait for writers" } else { "" }
    )]
    Locked {
        /// The file.
        path: PathBuf,
        /// Which lock could not be taken, in QEMU's words.
        reason: String,
        /// Whether this open only reads (and so could share instead).
        reading: bool,
    },

    /// The image needs something this build cannot do.
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    /// The error of a file whose locks could not be taken ([`crate::FileStorage::lock`]):
    /// [`Error::Locked`] when another open conflicts (`reading`: this open only reads,
    /// and could share instead), else the I/O error.
    pub fn from_lock(path: &std::path::Path, e: io::Error, reading: bool) -> Error {
        if e.kind() == io::ErrorKind::ResourceBusy {
            Error::Locked {
                path: path.to_path_buf(),
                reason: e.to_string(),
                reading,
            }
        } else {
            Error::Io {
                context: format!("locking {}", path.display()),
                cause: e,
            }
        }
    }
}

/// Result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// "FILE: " before a message about a file, or nothing while the file is not known yet.
fn prefix(file: &str) -> String {
    if file.is_empty() {
        String::new()
    } else {
        format!("{file}: ")
    }
}

/// "FILE is" when the file is known, else `unnamed`.
fn subject(file: &str, verb: &str, unnamed: &str) -> String {
    if file.is_empty() {
        unnamed.to_string()
    } else {
        format!("{file} {verb}")
    }
}

impl Error {
    /// Names the image file in an error about its header that the format layer, which
    /// knows no files, raised.
    pub(crate) fn in_file(mut self, name: &str) -> Self {
        match &mut self {
            Error::BadMagic { file, .. }
            | Error::InvalidHeader { file, .. }
            | Error::UnsupportedFeatures { file, .. } => *file = name.to_string(),
            _ => {}
        }
        self
    }

    pub(crate) fn invalid_header(
        field: &'static str,
        value: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidHeader {
            file: String::new(),
            field,
            value,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_argument(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// Attaches "what was being done" to I/O errors.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::Io {
            context: what(),
            cause,
        })
    }
}
