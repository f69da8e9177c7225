//! One module per subcommand.

pub mod bench;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
mod daemon;
pub mod info;
pub mod io;
pub mod job;
pub mod map;
pub mod measure;
pub mod mount;
pub mod rebase;
pub mod reorganize;
pub mod resize;
pub mod serve;
pub mod stream;

use anyhow::{bail, Result};
use qed::Format;
use std::path::Path;

/// Context for an error about a file: what the file was for, and its name unless the
/// error names it already (the library's errors do), so that the name appears once.
pub trait FileContext<T> {
    /// Wraps the error as `what NAME: error`, or `what: error` when it names the file.
    fn file_context(self, what: &str, path: &Path) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> FileContext<T> for std::result::Result<T, E> {
    fn file_context(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| {
            let name = path.display().to_string();
            let e = anyhow::Error::new(e);
            if e.to_string().contains(&name) {
                e.context(what.to_string())
            } else {
                e.context(format!("{what} {name}"))
            }
        })
    }
}

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

/// Whether `--cache` asks for O_DIRECT.
pub fn parse_cache(cache: &str) -> Result<bool> {
    Ok(match cache {
        "writeback" => false,
        "none" => true,
        c => bail!("invalid --cache '{c}': use writeback or none"),
    })
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

/// The device an export serves, and what its jobs run on: a QED image is shared by the
/// export and its jobs; anything else has no jobs.
pub fn job_target(
    opened: Opened,
    file: &std::path::Path,
) -> (std::sync::Arc<dyn qed::BlockDevice>, qed_control::JobTarget) {
    match opened {
        Opened::Qed(image) => {
            let image: std::sync::Arc<qed::Image> = std::sync::Arc::from(image);
            (image.clone(), qed_control::JobTarget::Image(image))
        }
        Opened::Other(device) => {
            let why = format!(
                "{} is a {} image: only a QED image runs jobs (stream, compact, defrag)",
                file.display(),
                device.format()
            );
            (
                std::sync::Arc::from(device),
                qed_control::JobTarget::Refused(why),
            )
        }
    }
}

/// The commands of an export's control socket: the job commands, and those that start
/// a stream, a compaction and a defragmentation of `target`.
pub fn control_commands(
    jobs: &std::sync::Arc<qed_control::Jobs>,
    target: &qed_control::JobTarget,
) -> qed_control::Commands {
    let mut commands = qed_control::Commands::new(jobs.clone());
    qed_control::add_stream_command(&mut commands, target.clone());
    qed_control::add_reorganize_commands(&mut commands, target.clone());
    commands
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

/// A progress reporter for `-p`: a bar on stderr when enabled, nothing otherwise.
pub struct ProgressReport {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressReport {
    /// A reporter that draws only when `enabled`.
    pub fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "    ({percent:>3}.00/100%) [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self { bar }
    }

    /// The callback to hand to an operation.
    pub fn update(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    /// Ends the bar, leaving it on screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// The `-o` keys a command that only lays out a QED image takes (`measure`).
pub const GEOMETRY_KEYS: &[&str] = &["cluster_size", "table_size"];
/// The `-o` keys of `convert`: the geometry, and the backing file as `-B` and `-F` give it.
pub const CONVERT_KEYS: &[&str] = &["cluster_size", "table_size", "backing_file", "backing_fmt"];
/// The `-o` keys of `create`: those of `convert`, and the size.
pub const CREATE_KEYS: &[&str] = &[
    "cluster_size",
    "table_size",
    "backing_file",
    "backing_fmt",
    "size",
];

/// The `-o key=value,...` options of a QED image to create. A key given twice takes its
/// last value, as qemu-img does.
#[derive(Default)]
pub struct CreateGeometry {
    /// `cluster_size=SIZE`.
    pub cluster_size: Option<u32>,
    /// `table_size=N`.
    pub table_size: Option<u32>,
    /// `backing_file=NAME`.
    pub backing_file: Option<String>,
    /// `backing_fmt=FMT`.
    pub backing_fmt: Option<String>,
    /// `size=SIZE`.
    pub size: Option<u64>,
}

impl CreateGeometry {
    /// Parses every `-o` list given, refusing a key outside `allowed` (one of
    /// [`GEOMETRY_KEYS`], [`CONVERT_KEYS`], [`CREATE_KEYS`]) by name: a key taken and
    /// ignored would leave an image other than the one asked for.
    pub fn parse(lists: &[String], allowed: &[&str], command: &str) -> Result<Self> {
        use anyhow::Context;
        let mut g = Self::default();
        for list in lists {
            for kv in list.split(',').filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("invalid option '{kv}': expected key=value"))?;
                if !allowed.contains(&k) {
                    bail!(
                        "invalid -o option '{k}': {command} takes {}",
                        allowed.join(", ")
                    );
                }
                match k {
                    "cluster_size" => {
                        g.cluster_size = Some(
                            u32::try_from(crate::units::parse_size(v)?)
                                .ok()
                                .with_context(|| format!("cluster_size {v} is too large"))?,
                        )
                    }
                    "table_size" => {
                        g.table_size = Some(v.parse().with_context(|| {
                            format!("invalid table_size '{v}': expected 1 to 16")
                        })?)
                    }
                    "backing_file" => g.backing_file = Some(v.to_string()),
                    "backing_fmt" => g.backing_fmt = Some(v.to_string()),
                    "size" => g.size = Some(crate::units::parse_size(v)?),
                    _ => bail!("invalid -o option '{k}'"),
                }
            }
        }
        Ok(g)
    }

    /// Sets the geometry given (the rest stays at its default).
    pub fn apply(&self, opts: &mut qed::CreateOptions) {
        if let Some(c) = self.cluster_size {
            opts.cluster_size = c;
        }
        if let Some(t) = self.table_size {
            opts.table_size = t;
        }
    }
}
