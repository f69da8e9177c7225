//! Opening images for the commands that do I/O on them.

use crate::context::FileContext;
use anyhow::{bail, Result};
use qed::Format;

/// Refuses a `-f` other than qed, for commands that only understand QED images.
pub fn require_qed(format: Option<Format>) -> Result<()> {
    match format {
        None | Some(Format::Qed) => Ok(()),
        Some(f) => bail!("'{f}' images are not supported by this command: only qed"),
    }
}

/// Opens a device for I/O. A QED image opened read-write with NEED_CHECK set is
/// checked and repaired first; what was repaired is reported on stderr.
pub fn open_for_io(
    path: &std::path::Path,
    format: Option<Format>,
    opts: &qed::OpenOptions,
) -> Result<Box<dyn qed::BlockDevice>> {
    Ok(match open_for_jobs(path, format, opts)? {
        Opened::Qed(image) => image,
        Opened::Other(device) => device,
    })
}

/// A device opened for I/O, a QED image kept as one: jobs (streaming) need the image.
pub enum Opened {
    /// A QED image.
    Qed(Box<qed::Image>),
    /// Any other device.
    Other(Box<dyn qed::BlockDevice>),
}

/// [`open_for_io`], keeping a QED image's type.
pub fn open_for_jobs(
    path: &std::path::Path,
    format: Option<Format>,
    opts: &qed::OpenOptions,
) -> Result<Opened> {
    if opts.copy_on_read && opts.read_only {
        bail!("--copy-on-read writes what it reads into the image: it cannot be read-only");
    }
    let format = match format {
        Some(f) => f,
        None => qed::probe_format_at(path, opts).file_context("could not open", path)?,
    };
    if format != Format::Qed {
        return Ok(Opened::Other(qed::open_device(path, Some(format), opts)?));
    }
    Ok(Opened::Qed(Box::new(open_image(path, opts)?)))
}

/// Opens a QED image; when the open had to repair it (NEED_CHECK was set), says what
/// was repaired on stderr.
pub fn open_image(path: &std::path::Path, opts: &qed::OpenOptions) -> Result<qed::Image> {
    let image = qed::Image::open(path, opts)?;
    if let Some(r) = image.open_repair() {
        eprintln!(
            "qed: {}: NEED_CHECK was set; the check repaired {} corruptions and reclaimed {} \
             leaked clusters",
            path.display(),
            r.corruptions_fixed,
            r.leaks_fixed
        );
    }
    Ok(image)
}
