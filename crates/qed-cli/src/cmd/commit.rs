//! `qed commit`.

use crate::context::FileContext;
use crate::progress::ProgressReport;
use anyhow::{bail, Context, Result};
use qed::{open_device, BlockDevice, Format, Image, OpenOptions};
use qed::{probe_format, resolve_backing_path};
use qed::{FileStorage, Storage};
use std::path::{Path, PathBuf};

/// Write an image's data into its backing file, then empty the image.
#[derive(clap::Args)]
pub struct Args {
    /// Keep the image's data (do not empty it afterwards).
    #[arg(short = 'd')]
    keep: bool,
    /// Commit into BASE, a deeper layer of the backing chain: what every layer above it
    /// holds is written into it. As with qemu-img, this implies -d: the image keeps its
    /// data (and so still reads the same), while the layers between the image and BASE
    /// may read differently afterwards. A relative BASE is relative to the directory of
    /// the image above it in the chain.
    #[arg(short = 'b')]
    base: Option<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
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

/// Runs `qed commit`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    crate::open::require_qed(a.format)?;
    // Look read-only first: a read-write open may repair the image, and a refused
    // command must leave it as it was.
    let ro = OpenOptions {
        no_backing: true,
        ..a.remote.read_only()
    };
    let top_ro = Image::open(&a.file, &ro).file_context("could not open", &a.file)?;
    if top_ro.backing_file().is_none() {
        bail!("{} has no backing file to commit into", a.file.display());
    }
    drop(top_ro);
    let (depth, base_path, declared) = named_base(&a)?;
    // The base is written below while the image is open: the image shares its backing
    // files with that writer, as QEMU's commit job does; the base's own write lock then
    // keeps every other process out.
    let rw = OpenOptions {
        share_backing_writes: true,
        ..a.remote.read_write()
    };
    let mut top = crate::open::open_image(&a.file, &rw)?;
    let Some(backing) = top.backing_file() else {
        bail!("{} has no backing file to commit into", a.file.display());
    };
    let base_path = base_path.unwrap_or_else(|| backing.path.clone());
    if base_path.to_str().is_some_and(qed::is_remote_name) {
        bail!(
            "{}: the backing file is remote and read-only: nothing can be committed into it \
             (convert the image to a local file instead)",
            base_path.display()
        );
    }
    let format = match declared.or(backing.declared_format.filter(|_| depth == 1)) {
        Some(f) => f,
        None => {
            let s =
                FileStorage::open(&base_path, true).file_context("could not open", &base_path)?;
            probe_format(&s)?
        }
    };
    grow_base(&base_path, format, top.size(), &a.remote)?;
    let base = open_device(&base_path, Some(format), &a.remote.read_write())?;
    let mut progress = ProgressReport::new(a.progress && !a.quiet);
    qed::commit_into(&top, &*base, depth, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    drop(base);
    // qemu-img empties the image only when committing into its backing file: after a
    // commit into a deeper base, the image's data is what keeps it reading as before.
    if !a.keep && a.base.is_none() {
        top.make_empty()?;
    }
    top.close()?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// The base `-b` names: its depth in the chain, its path and its format; `None`s for
/// the backing file, at depth 1.
fn named_base(a: &Args) -> Result<(u32, Option<PathBuf>, Option<Format>)> {
    Ok(match &a.base {
        None => (1, None, None),
        Some(name) => {
            let chain = open_device(&a.file, Some(Format::Qed), &a.remote.read_only())
                .file_context("could not open", &a.file)?;
            let (depth, layer) = find_base(&*chain, name).with_context(|| {
                format!(
                    "did not find '{name}' in the backing chain of {} (a relative name is \
                     relative to the directory of the image above it)",
                    a.file.display()
                )
            })?;
            (
                depth,
                Some(PathBuf::from(layer.filename())),
                Some(layer.format()),
            )
        }
    })
}

/// Grows the base to `size` if it is shorter: it must hold the whole image.
fn grow_base(
    base_path: &Path,
    format: Format,
    size: u64,
    remote: &crate::remote::RemoteArgs,
) -> Result<()> {
    match format {
        Format::Qed => {
            let mut base = crate::open::open_image(base_path, &remote.read_write())?;
            if base.size() < size {
                base.resize(size, false)?;
            }
            base.close()?;
        }
        Format::Raw => {
            let s =
                FileStorage::open(base_path, false).file_context("could not open", base_path)?;
            s.lock(qed::LockMode::WRITER)
                .file_context("could not lock", base_path)?;
            if s.len()? < size {
                s.set_len(size)?;
            }
        }
        Format::Qcow2 => bail!(
            "{}: cannot commit into a qcow2 image (commit writes into QED and raw backing files only)",
            base_path.display()
        ),
    }
    Ok(())
}

/// The layer of `top`'s chain that `name` names, and its depth (1 is the backing file),
/// as qemu-img finds a commit base: a URL by its text, a path (relative to the directory
/// of the image above the layer) by the file it leads to.
fn find_base<'a>(top: &'a dyn BlockDevice, name: &str) -> Option<(u32, &'a dyn BlockDevice)> {
    let mut above = top;
    let mut depth = 1;
    while let Some(layer) = above.backing() {
        let found = if qed::is_remote_name(name) || qed::is_remote_name(layer.filename()) {
            name == layer.filename()
        } else {
            let wanted = resolve_backing_path(Path::new(above.filename()), name).canonicalize();
            let actual = Path::new(layer.filename()).canonicalize();
            matches!((wanted, actual), (Ok(w), Ok(l)) if w == l)
        };
        if found {
            return Some((depth, layer));
        }
        above = layer;
        depth += 1;
    }
    None
}
