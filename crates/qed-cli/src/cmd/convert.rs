//! `qed convert`.

use super::convert_plan::Plan;
use crate::context::FileContext;
use crate::geometry::CreateGeometry;
use crate::progress::ProgressReport;
use crate::values::ConvertCache;
use anyhow::{bail, Context, Result};
use qed::FileStorage;
use qed::{chain_contains, resolve_backing_path};
use qed::{convert, ConvertOptions};
use qed::{create_qcow2, Qcow2CreateOptions};
use qed::{open_device, BlockDevice, CreateOptions, Format, Image, OpenOptions};
use std::path::PathBuf;

/// Copy an image into a new QED, qcow2 or raw image, sparsely; or, with --in-place,
/// convert it in its own file.
#[derive(clap::Args)]
pub struct Args {
    /// Convert FILE in its own file instead of copying it: qcow2 or raw to qed (-O qed),
    /// qed to qcow2 (-O qcow2). Data clusters stay where they are; the new metadata is
    /// written first and the header naming the new format last, so an interrupted
    /// conversion leaves the old image or the new one.
    #[arg(long, conflicts_with_all = ["backing", "backing_format", "no_create", "target_is_zero"])]
    in_place: bool,
    /// With --in-place: say what would be written and how much space it needs; change
    /// nothing.
    #[arg(long, requires = "in_place")]
    dry_run: bool,
    /// With --in-place: how to report what was (or would be) done.
    #[arg(long, value_enum, default_value_t)]
    output: crate::Output,
    /// Source format: raw, qed or qcow2 (probed when omitted).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// Destination format: qed (default), qcow2 or raw.
    #[arg(short = 'O', default_value = "qed", value_parser = crate::values::format)]
    output_format: Format,
    /// Destination options: cluster_size=SIZE, table_size=N (qed only), backing_file=NAME
    /// (as -B), backing_fmt=FMT (as -F); -B and -F win over them, as in qemu-img.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file of the destination: only data differing from it is written.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file given with -B (probed when omitted).
    #[arg(short = 'F', value_parser = crate::values::format)]
    backing_format: Option<Format>,
    /// Zero runs at least this long are not written (default 4k; 0 writes everything).
    #[arg(short = 'S', default_value = "4k", value_parser = crate::values::size)]
    sparse_size: u64,
    /// Cache mode of the destination, as qemu-img convert's: unsafe (the default: no
    /// flush, the system writes the copy back in its own time), writeback (flushed
    /// before the command returns) or none (O_DIRECT, flushed).
    #[arg(short = 't', default_value = "unsafe", value_parser = crate::values::convert_cache)]
    cache: ConvertCache,
    /// Do not create the destination: it exists and is at least as large as the source.
    #[arg(short = 'n')]
    no_create: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no progress bar even with -p.
    #[arg(short = 'q')]
    quiet: bool,
    /// The existing destination (-n) reads as zeros everywhere: zero runs of the source
    /// are not written to it.
    #[arg(long)]
    target_is_zero: bool,
    /// The source image.
    src: PathBuf,
    /// Bytes per part of an upload to S3 (5M to 5G); chosen from the image's size when
    /// omitted.
    #[arg(long, hide = true, value_parser = crate::values::size)]
    part_size: Option<u64>,
    /// The destination image, or an s3://BUCKET/KEY URL to upload it to (as qed or raw,
    /// replacing any object there once the upload completes); none with --in-place.
    #[arg(required_unless_present = "in_place")]
    dst: Option<PathBuf>,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    /// `-U` applies to the source.
    #[command(flatten)]
    share: crate::share::ShareArgs,
}

/// Runs `qed convert`. Every refusal comes before the destination is created or written.
pub fn run(a: Args) -> Result<u8> {
    if a.in_place {
        return run_in_place(a);
    }
    let plan = Plan::new(a)?;
    if super::publish::is_s3_destination(&plan.dst) {
        let src = open_source(&plan)?;
        return super::publish::run(&plan, &*src);
    }
    refuse_same_file(&plan)?;
    let src = open_source(&plan)?;
    refuse_destination_in_source_chain(&plan, &*src)?;
    prepare_destination(&plan, src.size())?;
    let dst = open_destination(&plan, src.size())?;
    copy(&plan, &*src, &*dst)?;
    Ok(0)
}

fn run_in_place(a: Args) -> Result<u8> {
    if let Some(dst) = &a.dst {
        bail!(
            "--in-place converts one file: drop {} (or drop --in-place to copy)",
            dst.display()
        );
    }
    let geometry = CreateGeometry::parse(
        &a.options,
        crate::geometry::IN_PLACE_KEYS,
        "qed convert --in-place",
    )?;
    super::convert_in_place::run(super::convert_in_place::Request {
        file: a.src,
        source: a.format,
        target: a.output_format,
        cluster_size: geometry.cluster_size.map(u64::from),
        dry_run: a.dry_run,
        output: a.output,
        progress: a.progress,
        quiet: a.quiet,
    })
}

impl Plan {
    fn new(a: Args) -> Result<Self> {
        let src_format = a.format;
        let dst_format = a.output_format;
        let sparse_size = a.sparse_size;
        if sparse_size % 512 != 0 {
            bail!("invalid -S {sparse_size}: it must be a multiple of 512");
        }
        if a.no_create && !a.options.is_empty() {
            bail!("-o has no effect when skipping image creation (-n): drop one of them");
        }
        if dst_format == Format::Raw && (a.backing.is_some() || !a.options.is_empty()) {
            bail!("-B and -o apply to qed and qcow2 destinations only");
        }
        let geometry =
            CreateGeometry::parse(&a.options, crate::geometry::CONVERT_KEYS, "qed convert")?;
        if dst_format == Format::Qcow2 && geometry.table_size.is_some() {
            bail!("invalid -o option 'table_size': it applies to qed destinations only");
        }
        let backing = a.backing.or_else(|| geometry.backing_file.clone());
        let backing_fmt = geometry.backing_fmt.as_deref().map(str::parse::<Format>);
        let backing_format = match a.backing_format {
            Some(f) => Some(Ok(f)),
            None => backing_fmt,
        };
        if backing.is_none() && backing_format.is_some() {
            bail!(
                "a backing format (-F or -o backing_fmt) needs a backing file (-B or -o \
                 backing_file)"
            );
        }
        let backing_format = backing_format.transpose()?;
        if a.target_is_zero && !a.no_create {
            bail!("--target-is-zero is for an existing destination: it needs -n");
        }
        if a.target_is_zero && backing.is_some() {
            bail!(
                "--target-is-zero cannot be used with a backing file: the destination reads \
                 its backing file's data, not zeros"
            );
        }
        let (direct, no_flush) = match a.cache {
            ConvertCache::Unsafe => (false, true),
            ConvertCache::Writeback => (false, false),
            ConvertCache::Direct => (true, false),
        };
        let Some(dst) = a.dst else {
            bail!("a destination is needed: qed convert SRC DST (or --in-place FILE)");
        };
        Ok(Self {
            src: a.src,
            src_format,
            dst,
            dst_format,
            no_create: a.no_create,
            geometry,
            backing,
            backing_format,
            sparse_size,
            direct,
            no_flush,
            progress: a.progress && !a.quiet,
            target_is_zero: a.target_is_zero,
            remote: a.remote,
            share: a.share,
            part_size: a.part_size,
        })
    }
}

/// Refuses a destination that is the source itself, however the two are spelled.
fn refuse_same_file(plan: &Plan) -> Result<()> {
    if let (Ok(s), Ok(d)) = (plan.src.canonicalize(), plan.dst.canonicalize()) {
        if s == d {
            bail!(
                "source and destination are the same file: {}",
                plan.src.display()
            );
        }
    }
    Ok(())
}

fn open_source(plan: &Plan) -> Result<Box<dyn BlockDevice>> {
    open_device(
        &plan.src,
        plan.src_format,
        &plan.share.apply(plan.remote.read_only()),
    )
    .file_context("could not open source", &plan.src)
}

/// Refuses a destination that the source reads through: writing it would change the
/// data being copied.
fn refuse_destination_in_source_chain(plan: &Plan, src: &dyn BlockDevice) -> Result<()> {
    if chain_contains(src, &plan.dst) {
        bail!(
            "the destination {} is a backing file of the source {}: writing it would change \
             the data being copied",
            plan.dst.display(),
            plan.src.display()
        );
    }
    Ok(())
}

/// Creates the destination, `size` bytes long; with `-n`, checks the existing one
/// instead. A new qcow2 image is created when it is opened.
fn prepare_destination(plan: &Plan, size: u64) -> Result<()> {
    if plan.no_create {
        check_existing_destination(plan, size)
    } else if plan.dst_format == Format::Qcow2 {
        Ok(())
    } else if plan.dst_format == Format::Qed {
        create_qed_destination(plan, size)
    } else {
        let storage = FileStorage::create(&plan.dst)
            .with_context(|| format!("could not create {}", plan.dst.display()))?;
        qed::Storage::set_len(&storage, size)
            .with_context(|| format!("could not size {}", plan.dst.display()))
    }
}

/// Creates a QED destination with the geometry and backing file asked for, having
/// checked all of it first.
fn create_qed_destination(plan: &Plan, size: u64) -> Result<()> {
    let mut opts = CreateOptions::new(size);
    plan.geometry.apply(&mut opts);
    if let Some((name, dev)) = open_new_backing(plan)? {
        opts.backing_file = Some(name);
        opts.backing_format = Some(plan.backing_format.unwrap_or(dev.format()));
    }
    opts.header()?;
    for why in opts.qemu_incompatibilities() {
        eprintln!("qed: warning: {why}");
    }
    Image::create(&plan.dst, &opts)?;
    Ok(())
}

/// The backing file `-B` names for a new destination, opened read-only, with the name
/// its header is to store; refused if it leads back to the destination.
fn open_new_backing(plan: &Plan) -> Result<Option<(String, Box<dyn BlockDevice>)>> {
    let Some(b) = &plan.backing else {
        return Ok(None);
    };
    let path = resolve_backing_path(&plan.dst, b);
    let dev = open_device(&path, plan.backing_format, &plan.remote.read_only())
        .file_context("could not open backing file", &path)?;
    if chain_contains(&*dev, &plan.dst) {
        bail!(
            "the destination {} cannot be in its own backing chain (-B {b})",
            plan.dst.display()
        );
    }
    Ok(Some((b.clone(), dev)))
}

/// Creates a qcow2 destination, open for the copy: the cluster size and the backing
/// file are checked before the file is created.
fn create_qcow2_destination(
    plan: &Plan,
    opts: &OpenOptions,
    size: u64,
) -> Result<Box<dyn BlockDevice>> {
    let mut create = Qcow2CreateOptions::new(size);
    if let Some(c) = plan.geometry.cluster_size {
        create.cluster_size = u64::from(c);
    }
    create
        .validate()
        .file_context("could not create", &plan.dst)?;
    let backing = open_new_backing(plan)?.map(|(name, dev)| {
        create.backing_file = Some(name);
        create.backing_format = Some(plan.backing_format.unwrap_or(dev.format()));
        dev
    });
    let dst = create_qcow2(&plan.dst, &create, backing, opts)
        .file_context("could not create", &plan.dst)?;
    Ok(Box::new(dst))
}

/// Refuses an existing destination smaller than the source. It is looked at read-only:
/// a read-write open may repair it, and a refused command must leave it as it was.
fn check_existing_destination(plan: &Plan, size: u64) -> Result<()> {
    let ro = OpenOptions {
        no_backing: true,
        ..plan.remote.read_only()
    };
    let existing = open_device(&plan.dst, Some(plan.dst_format), &ro)
        .file_context("could not open destination", &plan.dst)?;
    if plan.target_is_zero && plan.dst_format == Format::Qed {
        let image = Image::open(&plan.dst, &ro).file_context("could not open", &plan.dst)?;
        if let Some(b) = image.backing_file() {
            bail!(
                "--target-is-zero: the destination {} has a backing file ({}), so it does \
                 not read as zeros",
                plan.dst.display(),
                b.name
            );
        }
    }
    if existing.size() < size {
        bail!(
            "the destination {} ({} bytes) is smaller than the source ({size} bytes)",
            plan.dst.display(),
            existing.size()
        );
    }
    Ok(())
}

/// Opens the destination read-write, in the cache mode asked for (a QED image with
/// NEED_CHECK set is repaired); a new qcow2 destination, `size` bytes long, is created
/// here.
fn open_destination(plan: &Plan, size: u64) -> Result<Box<dyn BlockDevice>> {
    let opts = OpenOptions {
        direct: plan.direct,
        no_flush: plan.no_flush,
        // -n into an existing qcow2 image writes through imago.
        qcow2_writes: true,
        ..plan.remote.read_write()
    };
    if plan.dst_format == Format::Qed {
        return Ok(Box::new(crate::open::open_image(&plan.dst, &opts)?));
    }
    if plan.dst_format == Format::Qcow2 && !plan.no_create {
        return create_qcow2_destination(plan, &opts, size);
    }
    open_device(&plan.dst, Some(plan.dst_format), &opts).file_context("could not open", &plan.dst)
}

/// Copies the source into the destination, showing progress when asked; the copy ends
/// with a flush (which `-t unsafe` ignores).
fn copy(plan: &Plan, src: &dyn BlockDevice, dst: &dyn BlockDevice) -> Result<()> {
    let opts = ConvertOptions {
        sparse_size: plan.sparse_size,
        // Only a new destination with nothing below it is known to read as zeros.
        target_is_zero: (!plan.no_create || plan.target_is_zero) && plan.backing.is_none(),
        target_backing: if plan.backing.is_some() {
            dst.backing()
        } else {
            None
        },
    };
    let mut progress = ProgressReport::new(plan.progress);
    convert(src, dst, &opts, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    Ok(())
}
