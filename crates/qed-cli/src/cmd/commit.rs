//! `qed commit`.

use super::FileContext;
use super::ProgressReport;
use anyhow::{bail, Result};
use qed::probe_format;
use qed::{open_device, BlockDevice, Format, Image, OpenOptions};
use qed::{FileStorage, Storage};
use std::path::PathBuf;

/// Write an image's data into its backing file, then empty the image.
#[derive(clap::Args)]
pub struct Args {
    /// Keep the image's data (do not empty it afterwards).
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Image format (qed).
    #[arg(short = 'f')]
    format: Option<String>,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Runs `qed commit`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    super::require_qed(a.format.as_deref())?;
    // Look read-only first: a read-write open may repair the image, and a refused
    // command must leave it as it was.
    let ro = OpenOptions {
        no_backing: true,
        ..a.remote.read_only()
    };
    let has_backing = Image::open(&a.file, &ro)
        .file_context("could not open", &a.file)?
        .backing_file()
        .is_some();
    if !has_backing {
        bail!("{} has no backing file to commit into", a.file.display());
    }
    // The base is written below while the image is open: the image shares its backing
    // files with that writer, as QEMU's commit job does; the base's own write lock then
    // keeps every other process out.
    let rw = OpenOptions {
        share_backing_writes: true,
        ..a.remote.read_write()
    };
    let mut top = super::open_image(&a.file, &rw)?;
    let Some(backing) = top.backing_file() else {
        bail!("{} has no backing file to commit into", a.file.display());
    };
    let base_path = backing.path.clone();
    if base_path.to_str().is_some_and(qed::is_remote_name) {
        bail!(
            "{}: the backing file is remote and read-only: nothing can be committed into it \
             (convert the image to a local file instead)",
            base_path.display()
        );
    }
    let format = match backing.declared_format {
        Some(f) => f,
        None => {
            let s =
                FileStorage::open(&base_path, true).file_context("could not open", &base_path)?;
            probe_format(&s)?
        }
    };
    // The base must hold the whole image: grow it first if it is shorter.
    let size = top.size();
    match format {
        Format::Qed => {
            let mut base = super::open_image(&base_path, &a.remote.read_write())?;
            if base.size() < size {
                base.resize(size, false)?;
            }
            base.close()?;
        }
        Format::Raw => {
            let s =
                FileStorage::open(&base_path, false).file_context("could not open", &base_path)?;
            s.lock(qed::LockMode::WRITER)
                .file_context("could not lock", &base_path)?;
            if s.len()? < size {
                s.set_len(size)?;
            }
        }
        Format::Qcow2 => bail!("cannot commit into a qcow2 backing file"),
    }
    let base = open_device(&base_path, Some(format), &a.remote.read_write())?;
    let mut progress = ProgressReport::new(a.progress);
    qed::commit(&top, &*base, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    drop(base);
    if !a.keep {
        top.make_empty()?;
    }
    top.close()?;
    println!("Image committed.");
    Ok(0)
}
