//! `qed compare`.

use crate::context::FileContext;
use crate::progress::ProgressReport;
use anyhow::Result;
use qed::open_device;
use qed::Format;
use qed::{compare, Difference};
use std::path::PathBuf;

/// Compare the contents of two images, as `qemu-img compare`.
///
/// Exit codes: 0 identical, 1 different, 2 error.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format_a: Option<Format>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_parser = crate::values::format)]
    format_b: Option<Format>,
    /// Strict: images of different sizes differ.
    #[arg(short = 's')]
    strict: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print nothing; the exit code tells the result.
    #[arg(short = 'q')]
    quiet: bool,
    /// The first image.
    a: PathBuf,
    /// The second image.
    b: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    #[command(flatten)]
    share: crate::share::ShareArgs,
}

/// The result, and the smaller of the two sizes when they differ.
fn compare_files(a: &Args) -> Result<(Option<Difference>, Option<u64>)> {
    let ro = a.share.apply(a.remote.read_only());
    let da = open_device(&a.a, a.format_a, &ro).file_context("could not open", &a.a)?;
    let db = open_device(&a.b, a.format_b, &ro).file_context("could not open", &a.b)?;
    let mut progress = ProgressReport::new(a.progress && !a.quiet);
    let diff = compare(&*da, &*db, a.strict, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    let shorter = (da.size() != db.size()).then(|| da.size().min(db.size()));
    Ok((diff, shorter))
}

/// Runs `qed compare`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    let say = |line: &str| {
        if !a.quiet {
            println!("{line}");
        }
    };
    let (diff, shorter) = match compare_files(&a) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qed: {e:#}");
            return Ok(2);
        }
    };
    // qemu-img compares the part both images have first, and warns of the size
    // mismatch only on its way to the rest: a difference inside the common part is
    // reported alone.
    if let Some(end) = shorter {
        let past_common = match diff {
            None => true,
            Some(Difference::Content { offset }) => offset >= end,
            Some(Difference::Size { .. }) => false,
        };
        if past_common {
            say("Warning: Image size mismatch!");
        }
    }
    Ok(match diff {
        None => {
            say("Images are identical.");
            0
        }
        Some(Difference::Content { offset }) => {
            say(&format!("Content mismatch at offset {offset}!"));
            1
        }
        Some(Difference::Size { .. }) => {
            say("Strict mode: Image size mismatch!");
            1
        }
    })
}
