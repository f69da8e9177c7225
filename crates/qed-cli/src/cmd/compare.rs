//! `qed compare`.

use super::FileContext;
use super::{parse_format, ProgressReport};
use anyhow::Result;
use qed::open_device;
use qed::{compare, Difference};
use std::path::PathBuf;

/// Compare the contents of two images, as `qemu-img compare`.
///
/// Exit codes: 0 identical, 1 different, 2 error.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f')]
    format_a: Option<String>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F')]
    format_b: Option<String>,
    /// Strict: images of different sizes differ.
    #[arg(short = 's')]
    strict: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// The first image.
    a: PathBuf,
    /// The second image.
    b: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    #[command(flatten)]
    share: crate::share::ShareArgs,
}

fn compare_files(a: &Args) -> Result<Option<Difference>> {
    let ro = a.share.apply(a.remote.read_only());
    let da = open_device(&a.a, parse_format(a.format_a.as_deref())?, &ro)
        .file_context("could not open", &a.a)?;
    let db = open_device(&a.b, parse_format(a.format_b.as_deref())?, &ro)
        .file_context("could not open", &a.b)?;
    if da.size() != db.size() && !a.strict {
        println!("Warning: Image size mismatch!");
    }
    let mut progress = ProgressReport::new(a.progress);
    let diff = compare(&*da, &*db, a.strict, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    Ok(diff)
}

/// Runs `qed compare`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    match compare_files(&a) {
        Ok(None) => {
            println!("Images are identical.");
            Ok(0)
        }
        Ok(Some(Difference::Content { offset })) => {
            println!("Content mismatch at offset {offset}!");
            Ok(1)
        }
        Ok(Some(Difference::Size { .. })) => {
            println!("Strict mode: Image size mismatch!");
            Ok(1)
        }
        Err(e) => {
            eprintln!("qed: {e:#}");
            Ok(2)
        }
    }
}
