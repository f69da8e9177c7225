//! `qed info`.

use crate::units::human_size;
use crate::Output;
use anyhow::{Context, Result};
use qed::{Image, OpenOptions};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Show information about an image.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Image format (qed).
    #[arg(short = 'f')]
    format: Option<String>,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// `qemu-img info --output=json`'s keys for a QED image, plus the table and header size,
/// and the remote base the image is pinned to.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Info {
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<String>,
    virtual_size: u64,
    filename: String,
    cluster_size: u64,
    format: &'static str,
    /// Space the file takes on this host; unknown for an image behind a URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    dirty_flag: bool,
    table_size: u32,
    header_size: u32,
    /// The object a remote backing file must still be (its ETag or Last-Modified, and
    /// its size), as the image records it.
    #[serde(skip_serializing_if = "Option::is_none")]
    base_pin: Option<String>,
}

/// Runs `qed info`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    super::require_qed(a.format.as_deref())?;
    let opts = OpenOptions {
        no_backing: true,
        ..a.remote.read_only()
    };
    let image = Image::open(&a.file, &opts)?;
    let header = image.header();
    let actual_size = if a.file.to_str().is_some_and(qed::is_remote_name) {
        None
    } else {
        let meta = std::fs::metadata(&a.file)
            .with_context(|| format!("could not stat {}", a.file.display()))?;
        Some(meta.blocks() * 512)
    };
    let backing = image.backing_file();
    let info = Info {
        backing_filename_format: backing
            .and_then(|b| b.declared_format)
            .map(|f| f.to_string()),
        virtual_size: header.image_size,
        filename: a.file.display().to_string(),
        cluster_size: header.cluster_size.into(),
        format: "qed",
        actual_size,
        full_backing_filename: backing.map(|b| b.path.display().to_string()),
        backing_filename: backing.map(|b| b.name.clone()),
        dirty_flag: header.needs_check(),
        table_size: header.table_size,
        header_size: header.header_size,
        base_pin: image.base_pin()?.map(|p| p.to_string()),
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
        Output::Human => {
            println!("image: {}", info.filename);
            println!("file format: qed");
            println!(
                "virtual size: {} ({} bytes)",
                human_size(info.virtual_size),
                info.virtual_size
            );
            match info.actual_size {
                Some(n) => println!("disk size: {}", human_size(n)),
                None => println!("disk size: unavailable"),
            }
            println!("cluster_size: {}", info.cluster_size);
            println!("table_size: {}", info.table_size);
            if let Some(b) = &info.backing_filename {
                println!("backing file: {b}");
                if let Some(f) = &info.backing_filename_format {
                    println!("backing file format: {f}");
                }
                if let Some(p) = &info.base_pin {
                    println!("backing file pinned to: {p}");
                }
            }
            if info.dirty_flag {
                println!("dirty flag: yes (NEED_CHECK is set)");
            }
        }
    }
    Ok(0)
}
