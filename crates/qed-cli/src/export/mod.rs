//! What `qed serve` and `qed mount` share: the options of an export, and its session
//! (opening the image, its jobs and control socket, signals, the clean close).

mod session;

pub use session::{signals, write_pid_file, Kind, Session};

use crate::remote::RemoteArgs;
use crate::values::{self, Cache};
use qed::{DiscardMode, Format};
use std::path::PathBuf;

/// The options of an export, the same for NBD and FUSE. The fields are named after
/// their flags, so that they do not clash with a command's own.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Export read-only (a mounted file is read-only too).
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Image format: qed or raw (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = values::format)]
    pub format: Option<Format>,
    /// Host cache mode: writeback (page cache) or none (O_DIRECT on the image, and no
    /// kernel cache on a mounted file).
    #[arg(long = "cache", value_enum, default_value = "writeback")]
    pub cache: Cache,
    /// Reads of clusters the image does not hold copy them in from its backing chain.
    #[arg(long = "copy-on-read")]
    pub copy_on_read: bool,
    /// Trim requests and punched holes: ignore (a punched hole is a zero write), or
    /// unmap (discard in the image).
    #[arg(long = "discard", default_value = "ignore", value_parser = values::discard)]
    pub discard: DiscardMode,
    /// Write the serving process's id to this file once it serves (listens, or is
    /// mounted).
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Bound on cached L2 table entries, in bytes (k, M suffixes).
    #[arg(long = "l2-cache-size", default_value = "16M", value_parser = values::memory)]
    pub l2_cache_size: usize,
    /// Listen for control commands on this Unix socket: QMP-shaped JSON lines that
    /// start, query and cancel jobs (stream, compact, defrag, query-jobs, job-cancel;
    /// see qed job).
    #[arg(long = "control")]
    pub control: Option<PathBuf>,
    /// Compact the image on its own (a job, as the control socket's compact) whenever
    /// the space freed by discards reaches this share of the file, in percent.
    #[arg(long = "compact-free", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub compact_free: Option<u8>,
    /// The image.
    #[arg(index = 1)]
    pub file: PathBuf,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

impl ExportArgs {
    /// The options the image is opened with.
    pub fn open_options(&self) -> qed::OpenOptions {
        let base = self.remote.read_write();
        qed::OpenOptions {
            image: qed::ImageOptions {
                read_only: self.read_only,
                l2_cache_bytes: self.l2_cache_size,
                copy_on_read: self.copy_on_read,
                ..base.image
            },
            direct: self.cache.direct(),
            ..base
        }
    }
}
