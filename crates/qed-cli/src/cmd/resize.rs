//! `qed resize`.

use crate::context::FileContext;
use crate::values::SizeChange;
use anyhow::{bail, Result};
use qed::Format;
use qed::{BlockDevice, Image, OpenOptions};
use std::path::PathBuf;

/// Change an image's virtual size: `SIZE`, `+SIZE` or `-SIZE`.
#[derive(clap::Args)]
pub struct Args {
    /// Allow shrinking (drops the data past the new end).
    #[arg(long)]
    shrink: bool,
    /// Image format (qed).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
    /// New size, or a change to it with + or -.
    #[arg(allow_hyphen_values = true, value_parser = crate::values::size_change)]
    size: SizeChange,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Runs `qed resize`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    crate::open::require_qed(a.format)?;
    // Validate on a read-only open first: a read-write open may repair the image, and a
    // refused command must leave it as it was.
    let ro = OpenOptions {
        no_backing: true,
        ..a.remote.read_only()
    };
    let image = Image::open(&a.file, &ro).file_context("could not open", &a.file)?;
    let old = image.size();
    let new = match a.size {
        SizeChange::To(n) => Some(n),
        SizeChange::Grow(d) => old.checked_add(d),
        SizeChange::Shrink(d) => match old.checked_sub(d) {
            Some(n) => Some(n),
            None => bail!("cannot shrink by {d} bytes: the image is only {old} bytes"),
        },
    };
    let Some(new) = new else {
        bail!("the new size overflows");
    };
    image.validate_resize(new, a.shrink)?;
    drop(image);
    let mut image = crate::open::open_image(&a.file, &a.remote.read_write())?;
    image.resize(new, a.shrink)?;
    image.close()?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
