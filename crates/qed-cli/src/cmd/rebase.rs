//! `qed rebase`.

use crate::context::FileContext;
use crate::progress::ProgressReport;
use anyhow::{bail, Context, Result};
use qed::Format;
use qed::NewBacking;
use qed::{chain_contains, remote_identity_at, resolve_backing_path};
use qed::{open_device, Image, OpenOptions};
use std::path::PathBuf;

/// Change an image's backing file. Safe mode (the default) first copies into the image
/// every cluster that reads differently through the new backing file, so the guest sees
/// the same disk; `-u` only rewrites the name. `-b ""` removes the backing file.
#[derive(clap::Args)]
pub struct Args {
    /// Unsafe: only change the name, copy nothing.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// The new backing file ("" for none), relative to the image's directory.
    #[arg(short = 'b')]
    backing: String,
    /// Format of the new backing file (probed when omitted).
    #[arg(short = 'F', value_parser = crate::values::format)]
    backing_format: Option<Format>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no progress bar even with -p.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image format (qed).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Runs `qed rebase`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    crate::open::require_qed(a.format)?;
    // Validate everything read-only first: a read-write open may repair the image, and a
    // refused command must leave it as it was.
    let room = Image::open(
        &a.file,
        &OpenOptions {
            no_backing: true,
            ..a.remote.read_only()
        },
    )
    .file_context("could not open", &a.file)?
    .max_backing_name_len();
    if a.backing.len() as u64 > room {
        bail!(
            "the backing file name is {} bytes; this image's header area holds at most {room}",
            a.backing.len()
        );
    }
    let new = new_backing(&a)?;
    let opts = OpenOptions {
        no_backing: a.unsafe_mode,
        ..a.remote.read_write()
    };
    let mut image = crate::open::open_image(&a.file, &opts)?;
    if !a.unsafe_mode {
        let mut progress = ProgressReport::new(a.progress && !a.quiet);
        let target = new.as_ref().and_then(|b| b.device.as_deref());
        qed::rebase(&image, target, &mut |d, t| progress.update(d, t))?;
        progress.finish();
    }
    image.set_backing_file(new)?;
    image.close()?;
    Ok(0)
}

/// The new backing file `-b` names, checked (it does not lead back to the image) and
/// pinned when remote; `None` for `-b ""`.
fn new_backing(a: &Args) -> Result<Option<NewBacking>> {
    if a.backing.is_empty() {
        return Ok(None);
    }
    let path = resolve_backing_path(&a.file, &a.backing);
    let format = a.backing_format;
    let device = if a.unsafe_mode {
        None
    } else {
        Some(
            open_device(&path, format, &a.remote.read_only())
                .with_context(|| format!("could not open new backing file {}", path.display()))?,
        )
    };
    let loops = match &device {
        Some(d) => chain_contains(&**d, &a.file),
        None => path.canonicalize().ok() == a.file.canonicalize().ok(),
    };
    if loops {
        bail!(
            "{} cannot be a backing file of itself: {} leads back to it",
            a.file.display(),
            a.backing
        );
    }
    let format = format.or(device.as_ref().map(|d| d.format()));
    // The user's word: the object the name points to now is the one to read, even
    // with -u, which opens nothing else of it.
    let pin = match &device {
        Some(d) => d.remote_identity(),
        // -u promises not to need the backing file: a server out of reach leaves
        // the image unpinned, and its next read-write open pins what it finds.
        None => match remote_identity_at(&path, &a.remote.read_only()) {
            Ok(pin) => pin,
            Err(e) => {
                eprintln!(
                    "qed: warning: {e}; {} is not pinned to an object of {} until it \
                     is next opened read-write",
                    a.file.display(),
                    path.display()
                );
                None
            }
        },
    };
    Ok(Some(NewBacking {
        name: a.backing.clone(),
        path,
        format,
        device,
        pin,
    }))
}
