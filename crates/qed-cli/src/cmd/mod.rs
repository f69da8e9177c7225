//! One module per subcommand.

pub mod check;
pub mod create;
pub mod info;
pub mod io;
pub mod map;

use anyhow::{bail, Result};
use qed::Format;

/// Refuses a `-f` other than qed, for commands that only understand QED images.
pub fn require_qed(format: Option<&str>) -> Result<()> {
    match format {
        None | Some("qed") => Ok(()),
        Some(f) => bail!("'{f}' images are not supported by this command: only qed"),
    }
}

/// Parses an optional `-f` into a format (`None` probes).
pub fn parse_format(format: Option<&str>) -> Result<Option<Format>> {
    Ok(format.map(str::parse).transpose()?)
}

/// Opens a device for I/O. A QED image opened read-write with NEED_CHECK set is
/// checked and repaired first; what was repaired is reported on stderr.
pub fn open_for_io(
    path: &std::path::Path,
    format: Option<Format>,
    read_only: bool,
) -> Result<Box<dyn qed::BlockDevice>> {
    let opts = qed::OpenOptions {
        read_only,
        ..Default::default()
    };
    let format = match format {
        Some(f) => f,
        None => {
            let storage = qed::storage::FileStorage::open(path, true)
                .map_err(|e| anyhow::anyhow!("could not open {}: {e}", path.display()))?;
            qed::device::probe_format(&storage)?
        }
    };
    if format != Format::Qed {
        return Ok(qed::open_device(path, Some(format), &opts)?);
    }
    let image = qed::Image::open(path, &opts)?;
    if let Some(r) = image.open_repair() {
        eprintln!(
            "qed: {}: NEED_CHECK was set; the check repaired {} corruptions ({} leaked clusters left)",
            path.display(),
            r.corruptions_fixed,
            r.leaks_remaining()
        );
    }
    Ok(Box::new(image))
}
