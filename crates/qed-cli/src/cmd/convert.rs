//! `qed convert`.

use super::{parse_format, CreateGeometry, ProgressReport};
use crate::units::parse_size;
use anyhow::{bail, Context, Result};
use qed::FileStorage;
use qed::{chain_contains, resolve_backing_path, RawDevice};
use qed::{convert, ConvertOptions};
use qed::{open_device, BlockDevice, CreateOptions, Format, Image, OpenOptions};
use std::path::PathBuf;

/// Copy an image into a new QED or raw image, sparsely.
#[derive(clap::Args)]
pub struct Args {
    /// Source format: raw, qed or qcow2 (probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Destination format: qed (default) or raw.
    #[arg(short = 'O', default_value = "qed")]
    output_format: String,
    /// Destination options: cluster_size=SIZE, table_size=N.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file of the destination: only data differing from it is written.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file given with -B (probed when omitted).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Zero runs at least this long are not written (default 4k; 0 writes everything).
    #[arg(short = 'S', default_value = "4k")]
    sparse_size: String,
    /// Do not create the destination: it exists and is at least as large as the source.
    #[arg(short = 'n')]
    no_create: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// The source image.
    src: PathBuf,
    /// The destination image.
    dst: PathBuf,
}

pub fn run(a: Args) -> Result<u8> {
    let src_format = parse_format(a.format.as_deref())?;
    let dst_format: Format = a.output_format.parse()?;
    if dst_format == Format::Qcow2 {
        bail!("cannot write qcow2 images: use -O qed or -O raw");
    }
    let sparse_size = parse_size(&a.sparse_size)?;
    if sparse_size % 512 != 0 {
        bail!("invalid -S {}: it must be a multiple of 512", a.sparse_size);
    }
    if a.no_create && !a.options.is_empty() {
        bail!("-o has no effect when skipping image creation (-n): drop one of them");
    }
    if dst_format == Format::Raw && (a.backing.is_some() || !a.options.is_empty()) {
        bail!("-B and -o apply to qed destinations only");
    }
    if let (Ok(s), Ok(d)) = (a.src.canonicalize(), a.dst.canonicalize()) {
        if s == d {
            bail!(
                "source and destination are the same file: {}",
                a.src.display()
            );
        }
    }
    let src = open_device(&a.src, src_format, &OpenOptions::read_only())
        .with_context(|| format!("could not open source {}", a.src.display()))?;
    if chain_contains(&*src, &a.dst) {
        bail!(
            "the destination {} is a backing file of the source {}: writing it would change              the data being copied",
            a.dst.display(),
            a.src.display()
        );
    }
    let size = src.size();

    // Validate everything about the destination before creating or opening it.
    let backing_format = parse_format(a.backing_format.as_deref())?;
    if !a.no_create && dst_format == Format::Qed {
        let mut opts = CreateOptions::new(size);
        CreateGeometry::parse(&a.options)?.apply(&mut opts);
        if let Some(b) = &a.backing {
            let path = resolve_backing_path(&a.dst, b);
            let dev = open_device(&path, backing_format, &OpenOptions::read_only())
                .with_context(|| format!("could not open backing file {}", path.display()))?;
            if chain_contains(&*dev, &a.dst) {
                bail!(
                    "the destination {} cannot be in its own backing chain (-B {b})",
                    a.dst.display()
                );
            }
            opts.backing_file = Some(b.clone());
            opts.backing_format = Some(backing_format.unwrap_or(dev.format()));
        }
        opts.header()?;
        for why in opts.qemu_incompatibilities() {
            eprintln!("qed: warning: {why}");
        }
        Image::create(&a.dst, &opts)?;
    } else if !a.no_create {
        let storage = FileStorage::create(&a.dst)
            .with_context(|| format!("could not create {}", a.dst.display()))?;
        qed::Storage::set_len(&storage, size)
            .with_context(|| format!("could not size {}", a.dst.display()))?;
    } else {
        // Look at the existing destination read-only first: a read-write open may repair
        // it, and a refused command must leave it as it was.
        let ro = OpenOptions {
            no_backing: true,
            ..OpenOptions::read_only()
        };
        let existing = open_device(&a.dst, Some(dst_format), &ro)
            .with_context(|| format!("could not open destination {}", a.dst.display()))?;
        if existing.size() < size {
            bail!(
                "the destination {} ({} bytes) is smaller than the source ({size} bytes)",
                a.dst.display(),
                existing.size()
            );
        }
    }

    let rw = OpenOptions::default();
    let dst: Box<dyn BlockDevice> = match dst_format {
        Format::Qed => Box::new(super::open_image(&a.dst, &rw)?),
        _ => {
            let storage = FileStorage::open(&a.dst, false)
                .with_context(|| format!("could not open {}", a.dst.display()))?;
            Box::new(RawDevice::new(
                Box::new(storage),
                a.dst.display().to_string(),
                false,
            )?)
        }
    };
    let opts = ConvertOptions {
        sparse_size,
        target_is_zero: !a.no_create && a.backing.is_none(),
        target_backing: if a.backing.is_some() {
            dst.backing()
        } else {
            None
        },
    };
    let mut progress = ProgressReport::new(a.progress);
    convert(&*src, &*dst, &opts, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    dst.flush()?;
    Ok(0)
}
