//! `qed convert SRC s3://BUCKET/KEY`: an image published to S3, laid out front to back,
//! by multipart upload. Nothing appears under the key until the upload completes, which
//! replaces any object there in one step; a failure or an interrupt aborts the upload.

use super::convert_plan::Plan;
use crate::progress::ProgressReport;
use anyhow::{bail, Context, Result};
use qed::{
    open_device, part_size_for, resolve_backing_path, BlockDevice, CreateOptions, Format, S3Config,
    S3Upload, SequentialImage, SequentialOptions, MAX_PART_SIZE, MIN_PART_SIZE,
};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether `name` is an `s3://` URL, which `qed convert` writes by upload.
pub fn is_s3_destination(name: &Path) -> bool {
    name.to_str()
        .and_then(|s| s.get(..5))
        .is_some_and(|s| s.eq_ignore_ascii_case("s3://"))
}

/// Signals that interrupt an upload, each with its own flag, so that the exit code can
/// say which came.
struct Interrupts {
    flags: Vec<(i32, Arc<AtomicBool>)>,
    /// Set by any of them: what the copy polls.
    any: Arc<AtomicBool>,
}

impl Interrupts {
    fn register() -> Result<Self> {
        let any = Arc::new(AtomicBool::new(false));
        let mut flags = Vec::new();
        for sig in [SIGINT, SIGTERM] {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(sig, flag.clone())?;
            signal_hook::flag::register(sig, any.clone())?;
            flags.push((sig, flag));
        }
        Ok(Self { flags, any })
    }

    /// The signal that came, if one did.
    fn received(&self) -> Option<i32> {
        self.flags
            .iter()
            .find(|(_, f)| f.load(Ordering::Acquire))
            .map(|&(s, _)| s)
    }
}

/// Uploads the source as `plan` says; the exit code (128 + the signal's number when
/// interrupted).
pub fn run(plan: &Plan, src: &dyn BlockDevice) -> Result<u8> {
    let url = plan
        .dst
        .to_str()
        .context("the destination URL is not valid UTF-8")?
        .to_string();
    if plan.no_create {
        bail!(
            "{url}: -n writes into an existing image, and an S3 object is written whole: drop -n"
        );
    }
    if !matches!(plan.dst_format, Format::Qed | Format::Raw) {
        bail!(
            "{url}: S3 destinations are written as qed or raw (-O qed, -O raw), not {}",
            plan.dst_format
        );
    }
    let mut create = CreateOptions::new(src.size());
    plan.geometry.apply(&mut create);
    let backing = match &plan.backing {
        None => None,
        Some(name) => {
            // Relative names are relative to the object's URL, as readers resolve them.
            let path = resolve_backing_path(&plan.dst, name);
            let dev = open_device(&path, plan.backing_format, &plan.remote.read_only())
                .with_context(|| format!("could not open backing file {}", path.display()))?;
            create.backing_file = Some(name.clone());
            create.backing_format = Some(plan.backing_format.unwrap_or(dev.format()));
            Some(dev)
        }
    };
    if plan.dst_format == Format::Qed {
        create.header()?;
        for why in create.qemu_incompatibilities() {
            eprintln!("qed: warning: {why}");
        }
    }
    let config = S3Config::from_env().with_context(|| format!("{url}: cannot upload"))?;
    // Refused before the source is read.
    S3Upload::check(&url, &config)?;
    let interrupts = Interrupts::register()?;
    let opts = SequentialOptions {
        format: plan.dst_format,
        create,
        sparse_size: plan.sparse_size,
        target_backing: backing.as_deref(),
        cancel: Some(&interrupts.any),
    };
    let interrupted = |sig: i32| -> u8 {
        let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
        eprintln!("qed: {url}: interrupted by {name}: the upload was aborted, nothing was written");
        (128 + sig) as u8
    };
    let image = match SequentialImage::plan(src, &opts) {
        Ok(i) => i,
        Err(_) if interrupts.received().is_some() => {
            return Ok(interrupted(interrupts.received().unwrap_or(SIGINT)))
        }
        Err(e) => return Err(e).context(format!("could not read {}", plan.src.display())),
    };
    let part_size = match plan.part_size {
        Some(p) => {
            if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&p) {
                bail!("--part-size {p}: a part is {MIN_PART_SIZE} to {MAX_PART_SIZE} bytes");
            }
            if image.len().div_ceil(p) > qed::MAX_PARTS {
                bail!(
                    "{url}: {} bytes in parts of {p} would need more than {} parts",
                    image.len(),
                    qed::MAX_PARTS
                );
            }
            p
        }
        None => part_size_for(image.len()).with_context(|| {
            format!(
                "{url}: the image is {} bytes, more than S3 takes in one object",
                image.len()
            )
        })?,
    };
    let mut upload = S3Upload::create(&url, &config, &plan.remote.options(), part_size)?;
    let mut progress = ProgressReport::new(plan.progress);
    let written = image.write(
        src,
        Some(&interrupts.any),
        &mut |bytes| upload.write(bytes),
        &mut |d, t| progress.update(d, t),
    );
    if let Some(sig) = interrupts.received() {
        upload.abort()?;
        return Ok(interrupted(sig));
    }
    if let Err(e) = written {
        let e = upload.aborted(e);
        return Err(anyhow::Error::new(e))
            .context(format!("could not upload {} to {url}", plan.src.display()));
    }
    upload.complete()?;
    progress.finish();
    Ok(0)
}
