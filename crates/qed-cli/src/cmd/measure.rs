//! `qed measure`.

use crate::geometry::CreateGeometry;
use crate::Output;
use anyhow::{bail, Result};
use qed::measure;
use qed::Format;
use qed::Geometry;
use qed::{open_device, CreateOptions};
use std::path::PathBuf;

/// How large a QED image must be: for a new image of `--size`, or to hold FILE's data.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Virtual size of a new, empty image.
    #[arg(long, value_parser = crate::values::size)]
    size: Option<u64>,
    /// Source format (probed when omitted).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// Output format (only qed is measured).
    #[arg(short = 'O', default_value = "qed", value_parser = crate::values::format)]
    output_format: Format,
    /// Options of the image to measure: cluster_size=SIZE, table_size=N.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// The source image.
    file: Option<PathBuf>,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Runs `qed measure`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    if a.output_format != Format::Qed {
        bail!("only qed images can be measured (-O qed)");
    }
    let mut opts = CreateOptions::new(0);
    CreateGeometry::parse(&a.options, crate::geometry::GEOMETRY_KEYS, "qed measure")?
        .apply(&mut opts);
    let geometry = Geometry::new(opts.cluster_size, opts.table_size)?;
    let m = match (a.size, &a.file) {
        (Some(size), None) => {
            opts.size = size;
            let size = opts.header()?.image_size;
            measure(None, size, geometry)?
        }
        (None, Some(f)) => {
            let src = open_device(f, a.format, &a.remote.read_only())?;
            opts.size = src.size();
            let size = opts.header()?.image_size;
            measure(Some(&*src), size, geometry)?
        }
        _ => bail!("give either --size SIZE or a FILE to measure"),
    };
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "required": m.required,
                "fully-allocated": m.fully_allocated,
            }))?
        ),
        Output::Human => {
            println!("required size: {}", m.required);
            println!("fully allocated size: {}", m.fully_allocated);
        }
    }
    Ok(0)
}
