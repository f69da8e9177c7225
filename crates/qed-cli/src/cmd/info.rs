//! `qed info`.

use crate::context::FileContext;
use crate::units::human_size;
use crate::Output;
use anyhow::{bail, Context, Result};
use qed::{Format, Image, OpenOptions, Qcow2Facts, MAX_CHAIN_DEPTH};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Show information about an image.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Image format: qed, raw or qcow2 (probed when omitted).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// Show every image of the backing chain, top first (JSON: an array of the objects
    /// one image gives).
    #[arg(long)]
    backing_chain: bool,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    #[command(flatten)]
    share: crate::share::ShareArgs,
}

/// One image, in `qemu-img info --output=json`'s shape (QAPI's ImageInfo), plus the
/// table and header size of a QED image.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Info {
    /// The protocol node under the format, as qemu-img lists it; empty for a URL.
    children: Vec<Child>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<String>,
    virtual_size: u64,
    filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: &'static str,
    /// Space the file takes on this host; unknown for an image behind a URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    dirty_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    table_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header_size: Option<u32>,
    /// The object a remote backing file must still be (its ETag or Last-Modified, and
    /// its size), as the image records it.
    #[serde(skip_serializing_if = "Option::is_none")]
    base_pin: Option<String>,
}

/// A node under an image.
#[derive(Serialize)]
struct Child {
    name: &'static str,
    info: FileInfo,
}

/// The file an image is stored in, as qemu-img describes its `file` protocol node.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FileInfo {
    children: [(); 0],
    /// The file's length, in whole sectors.
    virtual_size: u64,
    filename: String,
    format: &'static str,
    actual_size: u64,
    format_specific: FormatSpecific,
    dirty_flag: bool,
}

/// `{"type": ..., "data": {...}}`.
#[derive(Serialize)]
struct FormatSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: SpecificData,
}

/// The facts of one format, in qemu-img's order.
#[derive(Serialize)]
#[serde(untagged)]
enum SpecificData {
    /// A file has none.
    File {},
    Qcow2(Qcow2Specific),
}

/// QAPI's ImageInfoSpecificQCow2, as far as the header tells it.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Qcow2Specific {
    compat: &'static str,
    compression_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    refcount_bits: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

/// An image of the chain still to describe: its name, resolved path and format if known.
struct Layer {
    path: PathBuf,
    format: Option<Format>,
}

/// Runs `qed info`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    let format = a.format;
    let opts = OpenOptions {
        no_backing: true,
        ..a.share.apply(a.remote.read_only())
    };
    let mut infos = Vec::new();
    let mut next = Some(Layer {
        path: a.file.clone(),
        format,
    });
    let mut seen = Vec::new();
    while let Some(layer) = next.take() {
        if infos.len() > MAX_CHAIN_DEPTH {
            bail!(
                "the backing chain of {} is deeper than {MAX_CHAIN_DEPTH} files",
                a.file.display()
            );
        }
        // A chain that loops would be described for ever.
        if let Ok(id) = layer.path.canonicalize() {
            if seen.contains(&id) {
                bail!(
                    "the backing chain of {} loops back to {}",
                    a.file.display(),
                    layer.path.display()
                );
            }
            seen.push(id);
        }
        let (info, below) = describe(&layer, &opts)?;
        infos.push(info);
        if a.backing_chain {
            next = below;
        }
    }
    match a.output {
        Output::Json if a.backing_chain => println!("{}", serde_json::to_string_pretty(&infos)?),
        Output::Json => println!("{}", serde_json::to_string_pretty(&infos[0])?),
        Output::Human => {
            for (i, info) in infos.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_human(info);
            }
        }
    }
    Ok(0)
}

/// Describes one image, and names the one below it.
fn describe(layer: &Layer, opts: &OpenOptions) -> Result<(Info, Option<Layer>)> {
    let path = &layer.path;
    let format = match layer.format {
        Some(f) => f,
        None => qed::probe_format_at(path, opts).file_context("could not open", path)?,
    };
    let filename = path.display().to_string();
    let file = file_info(path)?;
    let mut info = Info {
        children: file
            .map(|info| Child { name: "file", info })
            .into_iter()
            .collect(),
        backing_filename_format: None,
        virtual_size: 0,
        filename,
        cluster_size: None,
        format: "raw",
        actual_size: None,
        format_specific: None,
        full_backing_filename: None,
        backing_filename: None,
        dirty_flag: false,
        table_size: None,
        header_size: None,
        base_pin: None,
    };
    info.actual_size = info.children.first().map(|c| c.info.actual_size);
    let below = match format {
        Format::Qed => {
            let image = Image::open(path, opts)?;
            let header = image.header();
            info.format = "qed";
            info.virtual_size = header.image_size;
            info.cluster_size = Some(header.cluster_size.into());
            info.dirty_flag = header.needs_check();
            info.table_size = Some(header.table_size);
            info.header_size = Some(header.header_size);
            info.base_pin = image.base_pin()?.map(|p| p.to_string());
            image.backing_file().map(|b| {
                info.backing_filename_format = b.declared_format.map(|f| f.to_string());
                info.full_backing_filename = Some(b.path.display().to_string());
                info.backing_filename = Some(b.name.clone());
                Layer {
                    path: b.path.clone(),
                    format: b.declared_format,
                }
            })
        }
        Format::Qcow2 => {
            let facts = qed::qcow2_facts_at(path, opts)?;
            info.format = "qcow2";
            info.virtual_size = facts.size;
            info.cluster_size = Some(facts.cluster_size);
            info.dirty_flag = facts.dirty;
            info.format_specific = Some(qcow2_specific(&facts));
            info.backing_filename_format = facts.backing_format.clone();
            facts.backing_file.as_ref().map(|name| {
                let below = qed::resolve_backing_path(path, name);
                info.full_backing_filename = Some(below.display().to_string());
                info.backing_filename = Some(name.clone());
                Layer {
                    path: below,
                    // qcow2 records its backing file's format; QEMU probes only without.
                    format: facts.backing_format.as_deref().and_then(|f| f.parse().ok()),
                }
            })
        }
        Format::Raw => {
            let device = qed::open_device(path, Some(Format::Raw), opts)?;
            // As QEMU, which sizes a raw image in whole sectors of its file.
            info.virtual_size = device.size().next_multiple_of(512);
            None
        }
    };
    Ok((info, below))
}

/// The file holding a local image; `None` for a URL.
fn file_info(path: &Path) -> Result<Option<FileInfo>> {
    if path.to_str().is_some_and(qed::is_remote_name) {
        return Ok(None);
    }
    let meta =
        std::fs::metadata(path).with_context(|| format!("could not stat {}", path.display()))?;
    Ok(Some(FileInfo {
        children: [],
        // QEMU measures files in whole sectors.
        virtual_size: meta.len().next_multiple_of(512),
        filename: path.display().to_string(),
        format: "file",
        actual_size: meta.blocks() * 512,
        format_specific: FormatSpecific {
            kind: "file",
            data: SpecificData::File {},
        },
        dirty_flag: false,
    }))
}

/// qemu-img's format-specific facts of a qcow2 image.
fn qcow2_specific(f: &Qcow2Facts) -> FormatSpecific {
    let v3 = f.version >= 3;
    FormatSpecific {
        kind: "qcow2",
        data: SpecificData::Qcow2(Qcow2Specific {
            compat: if v3 { "1.1" } else { "0.10" },
            compression_type: f.compression_type,
            lazy_refcounts: v3.then_some(f.lazy_refcounts),
            refcount_bits: f.refcount_bits,
            corrupt: v3.then_some(f.corrupt),
            extended_l2: v3.then_some(f.extended_l2),
        }),
    }
}

/// One image as `qemu-img info` prints it, plus QED's table size.
fn print_human(info: &Info) {
    println!("image: {}", info.filename);
    println!("file format: {}", info.format);
    println!(
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    match info.actual_size {
        Some(n) => println!("disk size: {}", human_size(n)),
        None => println!("disk size: unavailable"),
    }
    if let Some(c) = info.cluster_size {
        println!("cluster_size: {c}");
    }
    if let Some(t) = info.table_size {
        println!("table_size: {t}");
    }
    if let Some(b) = &info.backing_filename {
        // As qemu-img: the path the name resolves to, when it is not the name itself.
        match &info.full_backing_filename {
            Some(full) if full != b => println!("backing file: {b} (actual path: {full})"),
            _ => println!("backing file: {b}"),
        }
        if let Some(f) = &info.backing_filename_format {
            println!("backing file format: {f}");
        }
        if let Some(p) = &info.base_pin {
            println!("backing file pinned to: {p}");
        }
    }
    if info.dirty_flag {
        if info.format == "qed" {
            println!("dirty flag: yes (NEED_CHECK is set)");
        } else {
            println!("cleanly shut down: no");
        }
    }
    if let Some(FormatSpecific {
        data: SpecificData::Qcow2(q),
        ..
    }) = &info.format_specific
    {
        println!("Format specific information:");
        println!("    compat: {}", q.compat);
        println!("    compression type: {}", q.compression_type);
        if let Some(l) = q.lazy_refcounts {
            println!("    lazy refcounts: {l}");
        }
        println!("    refcount bits: {}", q.refcount_bits);
        if let Some(c) = q.corrupt {
            println!("    corrupt: {c}");
        }
        if let Some(e) = q.extended_l2 {
            println!("    extended l2: {e}");
        }
    }
    for child in &info.children {
        let f = &child.info;
        println!("Child node '/{}':", child.name);
        println!("    filename: {}", f.filename);
        println!("    protocol type: file");
        println!(
            "    file length: {} ({} bytes)",
            human_size(f.virtual_size),
            f.virtual_size
        );
        println!("    disk size: {}", human_size(f.actual_size));
    }
}
