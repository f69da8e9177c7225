//! `qed convert --in-place`: qcow2 or raw to QED, and QED to qcow2, in the same file.

use crate::context::FileContext;
use crate::progress::ProgressReport;
use crate::Output;
use anyhow::{bail, Result};
use qed::{convert_in_place, probe_format_at, resolve_backing_path, Format, Image};
use qed::{InPlaceOptions, InPlacePlan, OpenOptions};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `qed convert --in-place` was asked to do.
pub struct Request {
    /// The image.
    pub file: PathBuf,
    /// `-f`: `None` probes.
    pub source: Option<Format>,
    /// `-O`.
    pub target: Format,
    /// `-o cluster_size=`, for a raw source.
    pub cluster_size: Option<u64>,
    /// `--dry-run`.
    pub dry_run: bool,
    pub output: Output,
    pub progress: bool,
    pub quiet: bool,
}

/// Runs the conversion, or plans it, and reports it.
pub fn run(r: Request) -> Result<u8> {
    let opts = if r.dry_run {
        OpenOptions::read_only()
    } else {
        OpenOptions::default()
    };
    let source = match r.source {
        Some(f) => f,
        None => probe_format_at(&r.file, &opts).file_context("could not open", &r.file)?,
    };
    let backing_format = backing_format(&r.file, source)?;
    let storage: Arc<dyn qed::Storage> = Arc::from(
        opts.open_bytes(&r.file)
            .file_context("could not open", &r.file)?,
    );
    let name = r.file.to_string_lossy().into_owned();
    let mut progress = ProgressReport::new(r.progress && !r.quiet && !r.dry_run);
    let plan = convert_in_place(
        storage,
        &name,
        &InPlaceOptions {
            source,
            target: r.target,
            dry_run: r.dry_run,
            backing_format,
            cluster_size: r.cluster_size,
        },
        &mut |d, t| progress.update(d, t),
    )?;
    progress.finish();
    if !r.quiet {
        report(&name, &plan, r.dry_run, r.output)?;
    }
    Ok(0)
}

/// The format of a QED image's backing file, which its header leaves to probing unless
/// it is raw: qcow2 records it, so it is probed now. `None` when it cannot be.
fn backing_format(file: &Path, source: Format) -> Result<Option<Format>> {
    if source != Format::Qed {
        return Ok(None);
    }
    let ro = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_only()
    };
    let Ok(image) = Image::open(file, &ro) else {
        // The conversion reads the header itself and says what is wrong with it.
        return Ok(None);
    };
    let Some(name) = image.header_backing_name() else {
        return Ok(None);
    };
    drop(image);
    let path = resolve_backing_path(file, &name);
    if qed::is_remote_name(&name) {
        return Ok(None);
    }
    match probe_format_at(&path, &OpenOptions::read_only()) {
        Ok(f) => Ok(Some(f)),
        Err(e) => bail!(
            "could not probe the backing file {} of {} ({e}): qcow2 records the backing \
             file's format; make the backing file reachable first",
            path.display(),
            file.display()
        ),
    }
}

/// The plan's figures, with the keys `--output=json` uses.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Report<'a> {
    filename: &'a str,
    source_format: String,
    target_format: String,
    cluster_size: u64,
    virtual_size: u64,
    file_length: u64,
    metadata_bytes: u64,
    decompressed_clusters: u64,
    decompressed_bytes: u64,
    moved_bytes: u64,
    extra_bytes: u64,
    final_length: u64,
    dry_run: bool,
}

fn report(name: &str, p: &InPlacePlan, dry_run: bool, output: Output) -> Result<()> {
    match output {
        Output::Json => {
            let r = Report {
                filename: name,
                source_format: p.source.to_string(),
                target_format: p.target.to_string(),
                cluster_size: p.cluster_size,
                virtual_size: p.virtual_size,
                file_length: p.file_length,
                metadata_bytes: p.metadata_bytes,
                decompressed_clusters: p.decompressed_clusters,
                decompressed_bytes: p.decompressed_bytes,
                moved_bytes: p.moved_bytes,
                extra_bytes: p.extra_bytes,
                final_length: p.final_length,
                dry_run,
            };
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Output::Human if dry_run => {
            println!(
                "{name}: would convert {} to {} in place: {} bytes of new metadata, {} \
                 compressed clusters decompressed ({} bytes), {} bytes of clusters moved; \
                 the file ({} bytes) grows by at most {} bytes meanwhile",
                p.source,
                p.target,
                p.metadata_bytes,
                p.decompressed_clusters,
                p.decompressed_bytes,
                p.moved_bytes,
                p.file_length,
                p.extra_bytes
            );
        }
        Output::Human => {
            println!(
                "{name}: converted {} to {} in place ({} bytes of new metadata, {} \
                 compressed clusters decompressed); the file is now {} bytes",
                p.source, p.target, p.metadata_bytes, p.decompressed_clusters, p.final_length
            );
        }
    }
    Ok(())
}
