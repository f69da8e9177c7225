//! `qed compact` and `qed defrag`.

use crate::context::FileContext;
use crate::progress::ProgressReport;
use anyhow::Result;
use qed::Format;
use qed::{Reorganization, ReorganizeEnd, ReorganizeOptions};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Moves clusters inside the image while nothing else has it open (a running `qed
/// serve` does the same through its control socket). Killed at any point, the image is
/// consistent; running the command again goes on.
#[derive(clap::Args)]
pub struct Args {
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Image format (qed).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// The image.
    file: PathBuf,
}

/// Runs `qed compact` or `qed defrag`; returns the exit code (1 when interrupted).
pub fn run(a: Args, job: Reorganization) -> Result<u8> {
    crate::open::require_qed(a.format)?;
    let image = crate::open::open_image(&a.file, &qed::OpenOptions::default())?;
    let before = image.file_len()?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let opts = ReorganizeOptions {
        cancel: Some(&stop),
        ..Default::default()
    };
    let mut progress = ProgressReport::new(a.progress);
    let mut report = |d, t| progress.update(d, t);
    let what = match job {
        Reorganization::Compact => "compacting",
        Reorganization::Defrag => "defragmenting",
    };
    let end = job.run(&image, &opts, &mut report);
    let end = end.file_context(what, &a.file)?;
    progress.finish();
    image.close()?;
    Ok(match end {
        ReorganizeEnd::Done { .. } => 0,
        ReorganizeEnd::Cancelled { moved, file_len } => {
            eprintln!(
                "qed: {}: {what} interrupted after moving {moved} bytes (file {before} -> \
                 {file_len} bytes); run it again to go on",
                a.file.display()
            );
            1
        }
    })
}
