//! `qed stream`.

use crate::context::FileContext;
use crate::progress::ProgressReport;
use anyhow::Result;
use qed::Format;
use qed::{StreamEnd, StreamOptions};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Copy into an image every cluster it reads from its backing chain, then drop the
/// backing file (or, with -b, every backing file above BASE). Killed or failed at any
/// point, the image is consistent and still names its old backing file; running the
/// command again continues where it stopped.
#[derive(clap::Args)]
pub struct Args {
    /// Keep this backing file (one of the chain's), streaming only what lies above it.
    #[arg(short = 'b')]
    base: Option<String>,
    /// Copy at most this many bytes per second (k, M, G suffixes).
    #[arg(long = "rate", value_parser = crate::values::rate)]
    rate: Option<u64>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Image format (qed).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Runs `qed stream`; returns the exit code (1 when interrupted).
pub fn run(a: Args) -> Result<u8> {
    crate::open::require_qed(a.format)?;
    let rate = a.rate;
    let image = crate::open::open_image(&a.file, &a.remote.read_write())?;
    let base = a
        .base
        .as_deref()
        .map(|b| qed::stream_base(&image, b))
        .transpose()?;
    // SIGINT and SIGTERM stop the job between steps; the image is then closed cleanly.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let opts = StreamOptions {
        base,
        rate,
        cancel: Some(&stop),
    };
    let mut progress = ProgressReport::new(a.progress);
    let end = qed::stream(&image, &opts, &mut |d, t| progress.update(d, t))
        .file_context("streaming into", &a.file)?;
    progress.finish();
    image.close()?;
    Ok(match end {
        StreamEnd::Done { .. } => 0,
        StreamEnd::Cancelled { copied } => {
            eprintln!(
                "qed: {}: stream interrupted after copying {copied} bytes; run it again to \
                 continue",
                a.file.display()
            );
            1
        }
    })
}
