//! `qed create`.

use crate::context::FileContext;
use anyhow::{bail, Context, Result};
use qed::resolve_backing_path;
use qed::{open_device, CreateOptions, Format, Image};
use std::path::PathBuf;

/// Create a new QED image.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (only qed can be created).
    #[arg(short = 'f', default_value = "qed", value_parser = crate::values::format)]
    format: Format,
    /// Backing file, stored as given (relative names are relative to FILE's directory).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format: raw, qed or qcow2 (probed when omitted). Only raw is recorded
    /// in the image (QED has a bit for "raw, do not probe" and nothing else): any other
    /// format is probed again at every open, by QEMU as by qed.
    #[arg(short = 'F', value_parser = crate::values::format)]
    backing_format: Option<Format>,
    /// Options: cluster_size=SIZE, table_size=N, size=SIZE, backing_file=NAME (as -b),
    /// backing_fmt=FMT (as -F); -b and -F win over them, as in qemu-img.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Do not open the backing file (SIZE is then required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to create.
    file: PathBuf,
    /// Virtual size (k, M, G, T suffixes); defaults to the backing file's size.
    #[arg(value_parser = crate::values::size)]
    size: Option<u64>,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Runs `qed create`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    if a.format != Format::Qed {
        bail!(
            "unsupported format '{}': qed create makes only qed images",
            a.format
        );
    }
    let mut opts = CreateOptions::new(0);
    let parsed = crate::geometry::CreateGeometry::parse(
        &a.options,
        crate::geometry::CREATE_KEYS,
        "qed create",
    )?;
    parsed.apply(&mut opts);
    let backing = a.backing.clone().or(parsed.backing_file);
    let mut format = match a.backing_format {
        Some(f) => Some(f),
        None => parsed.backing_fmt.as_deref().map(str::parse).transpose()?,
    };

    let size = match (a.size, parsed.size) {
        (Some(_), Some(_)) => {
            bail!("the image size must be given only once: as SIZE or as -o size, not both")
        }
        (Some(size), None) => Some(size),
        (None, size) => size,
    };
    // A remote base is pinned as it is now: a later open refuses another object.
    let mut pin = None;
    let size = match (&backing, a.unsafe_backing) {
        (Some(name), false) => {
            let path = resolve_backing_path(&a.file, name);
            let dev = open_device(&path, format, &a.remote.read_only())
                .file_context("could not open backing file", &path)?;
            pin = dev.remote_identity();
            if format.is_none() {
                format = Some(dev.format());
                if !a.quiet {
                    eprintln!("qed: backing format not given; detected {}", dev.format());
                }
            }
            size.unwrap_or(dev.size())
        }
        (Some(_), true) => size.context("SIZE is required with -u")?,
        (None, _) => size.context("SIZE (or -o size) is required when there is no backing file")?,
    };
    opts.size = size;
    opts.backing_file = backing.clone();
    opts.backing_format = format;
    // Validate everything before touching the destination.
    opts.header()?;
    for why in opts.qemu_incompatibilities() {
        eprintln!("qed: warning: {why}");
    }
    if !a.quiet {
        // As qemu-img: the size as requested (before rounding up to 512).
        let mut line = format!("Formatting '{}', fmt=qed size={size}", a.file.display());
        if let Some(b) = &backing {
            line += &format!(" backing_file={b}");
        }
        if let Some(f) = format {
            line += &format!(" backing_fmt={f}");
        }
        line += &format!(" cluster_size={}", opts.cluster_size);
        // qemu-img prints table_size whenever it was given, default or not.
        if parsed.table_size.is_some() {
            line += &format!(" table_size={}", opts.table_size);
        }
        println!("{line}");
    }
    Image::create_pinned(&a.file, &opts, pin.as_ref())?;
    Ok(0)
}
