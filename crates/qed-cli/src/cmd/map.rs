//! `qed map`.

use crate::Output;
use anyhow::Result;
use qed::open_device;
use qed::Format;
use qed::{for_each_run, MapEntry};
use std::io::Write;
use std::path::PathBuf;

/// Show how an image's guest space is stored, as `qemu-img map`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Image format (raw or qed; probed when omitted).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// First guest offset to map.
    #[arg(long = "start-offset", default_value = "0", value_parser = crate::values::size)]
    start_offset: u64,
    /// Bytes to map from the start offset.
    #[arg(long = "max-length", value_parser = crate::values::size)]
    max_length: Option<u64>,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    #[command(flatten)]
    share: crate::share::ShareArgs,
}

fn json_row(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
         \"data\": {}, \"compressed\": false",
        e.start, e.length, e.depth, e.present, e.zero, e.data
    );
    if let Some(off) = e.offset {
        s += &format!(", \"offset\": {off}");
    }
    s + "}"
}

/// C's `%#-16x`: `0x` prefix except for zero, left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Runs `qed map`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    let format = a.format;
    let dev = open_device(&a.file, format, &a.share.apply(a.remote.read_only()))?;
    let start = a.start_offset;
    let len = a.max_length.unwrap_or(dev.size());
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match a.output {
        Output::Json => {
            let mut first = true;
            write!(out, "[")?;
            for_each_run(&*dev, start, len, |e| {
                let sep = if first { "" } else { ",\n" };
                first = false;
                write!(out, "{sep}{}", json_row(e)).map_err(io_err)
            })?;
            writeln!(out, "]")?;
        }
        Output::Human => {
            writeln!(
                out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            )?;
            for_each_run(&*dev, start, len, |e| {
                if e.data && !e.zero {
                    writeln!(
                        out,
                        "{}{}{}{}",
                        hex16(e.start),
                        hex16(e.length),
                        hex16(e.offset.unwrap_or(0)),
                        e.filename
                    )
                    .map_err(io_err)?;
                }
                Ok(())
            })?;
        }
    }
    out.flush()?;
    Ok(0)
}

fn io_err(e: std::io::Error) -> qed::Error {
    qed::Error::Io {
        context: "writing the map".into(),
        cause: e,
    }
}
