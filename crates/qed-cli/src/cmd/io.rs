//! `qed io`: scripted reads and writes in the manner of qemu-io.

use crate::units::{io_size, parse_size};
use anyhow::{bail, Context, Result};
use qed::BlockDevice;
use qed::Format;
use std::path::PathBuf;
use std::time::Instant;

/// Run commands on an image, as qemu-io: `read [-P PATTERN] [-v] OFF LEN`,
/// `write [-P PATTERN] [-z] OFF LEN`, `discard OFF LEN`, `flush`, `map`, `sleep MS`.
#[derive(clap::Args)]
pub struct Args {
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format (raw or qed; probed when omitted).
    #[arg(short = 'f', value_parser = crate::values::format)]
    format: Option<Format>,
    /// Reads of clusters the image does not hold copy them in from its backing chain.
    #[arg(long = "copy-on-read")]
    copy_on_read: bool,
    /// A command to run; repeat for several, run in order.
    #[arg(short = 'c', required = true)]
    commands: Vec<String>,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    #[command(flatten)]
    share: crate::share::ShareArgs,
}

/// Largest buffer one command moves at a time.
const CHUNK: u64 = 16 << 20;
/// qemu-io's default write pattern.
const DEFAULT_PATTERN: u8 = 0xcd;

fn parse_pattern(s: &str) -> Result<u8> {
    let v = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else {
        s.parse()
    };
    match v {
        Ok(v) if v <= 0xff => Ok(v as u8),
        _ => bail!("invalid pattern '{s}': expected a byte value such as 0xab or 171"),
    }
}

/// The flags and two numbers of a read, write or discard command.
#[derive(Default)]
struct Request {
    pattern: Option<u8>,
    verbose: bool,
    zero: bool,
    quiet: bool,
    offset: u64,
    len: u64,
}

fn parse_request(name: &str, args: &[&str], allowed: &str) -> Result<Request> {
    let mut r = Request::default();
    let mut nums = Vec::new();
    let mut it = args.iter();
    while let Some(&a) = it.next() {
        match a {
            "-P" if allowed.contains('P') => {
                let p = it
                    .next()
                    .with_context(|| format!("{name}: -P needs a pattern"))?;
                r.pattern = Some(parse_pattern(p)?);
            }
            "-v" if allowed.contains('v') => r.verbose = true,
            "-z" if allowed.contains('z') => r.zero = true,
            "-q" => r.quiet = true,
            _ if a.starts_with('-') => bail!("{name}: unknown option '{a}'"),
            _ => nums.push(parse_size(a)?),
        }
    }
    let [offset, len] = nums[..] else {
        bail!("{name}: expected OFFSET and LENGTH");
    };
    r.offset = offset;
    r.len = len;
    Ok(r)
}

fn report(verb: &str, r: &Request, start: Instant) {
    if r.quiet {
        return;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    println!("{verb} {}/{} bytes at offset {}", r.len, r.len, r.offset);
    println!(
        "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        io_size(r.len),
        secs,
        io_size((r.len as f64 / secs) as u64),
        1.0 / secs
    );
}

/// Prints bytes as qemu-io's `read -v` does.
fn dump(buf: &[u8], offset: u64) {
    for (i, row) in buf.chunks(16).enumerate() {
        let hex: String = row.iter().map(|b| format!("{b:02x} ")).collect();
        let text: String = row
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!("{:08x}:  {hex} {text}", offset + i as u64 * 16);
    }
}

fn read(dev: &dyn BlockDevice, r: &Request) -> Result<()> {
    let start = Instant::now();
    let mut buf = vec![0u8; r.len.min(CHUNK) as usize];
    let mut done = 0;
    let mut mismatch = None;
    while done < r.len {
        let n = (r.len - done).min(CHUNK) as usize;
        let pos = r.offset + done;
        dev.read_at(&mut buf[..n], pos)?;
        if let Some(p) = r.pattern {
            if mismatch.is_none() {
                mismatch = buf[..n]
                    .iter()
                    .position(|&b| b != p)
                    .map(|i| pos + i as u64);
            }
        }
        if r.verbose {
            dump(&buf[..n], pos);
        }
        done += n as u64;
    }
    if let Some(at) = mismatch {
        bail!(
            "Pattern verification failed at offset {at} (request at offset {}, {} bytes)",
            r.offset,
            r.len
        );
    }
    report("read", r, start);
    Ok(())
}

fn write(dev: &dyn BlockDevice, r: &Request) -> Result<()> {
    let start = Instant::now();
    if r.zero {
        dev.write_zeroes(r.offset, r.len)?;
    } else {
        let buf = vec![r.pattern.unwrap_or(DEFAULT_PATTERN); r.len.min(CHUNK) as usize];
        let mut done = 0;
        while done < r.len {
            let n = (r.len - done).min(CHUNK) as usize;
            dev.write_at(&buf[..n], r.offset + done)?;
            done += n as u64;
        }
    }
    report("wrote", r, start);
    Ok(())
}

/// Prints the top layer's allocation, as qemu-io's `map`.
fn map(dev: &dyn BlockDevice) -> Result<()> {
    let size = dev.size();
    let mut pos = 0;
    while pos < size {
        let first = dev.block_status(pos, size - pos)?;
        let mut len = first.len;
        while pos + len < size {
            let next = dev.block_status(pos + len, size - pos - len)?;
            if next.allocated != first.allocated {
                break;
            }
            len += next.len;
        }
        println!(
            "{} ({len:#x}) bytes {}allocated at offset {} ({pos:#x})",
            io_size(len),
            if first.allocated { "    " } else { "not " },
            io_size(pos)
        );
        pos += len;
    }
    Ok(())
}

fn run_one(dev: &dyn BlockDevice, line: &str) -> Result<()> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&name, args)) = words.split_first() else {
        bail!("empty command");
    };
    match name {
        "read" => read(dev, &parse_request(name, args, "Pv")?),
        "write" => write(dev, &parse_request(name, args, "Pz")?),
        "discard" => {
            let r = parse_request(name, args, "")?;
            let start = Instant::now();
            dev.discard(r.offset, r.len)?;
            if !r.quiet {
                println!("discard {}/{} bytes at offset {}", r.len, r.len, r.offset);
                let secs = start.elapsed().as_secs_f64();
                println!("{}, 1 ops; {secs:05.2} sec", io_size(r.len));
            }
            Ok(())
        }
        "flush" => Ok(dev.flush()?),
        "map" => map(dev),
        // As qemu-io's: lets a script leave time for something else to happen.
        "sleep" => {
            let ms = match args {
                [ms] => ms.parse::<u64>().ok().filter(|&ms| ms <= 86_400_000),
                _ => None,
            }
            .context("sleep: expected milliseconds, such as 500")?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(())
        }
        _ => bail!("unknown command '{name}': use read, write, discard, flush, map or sleep"),
    }
}

/// Runs `qed io`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    let format = a.format;
    let dev = crate::open::open_for_io(
        &a.file,
        format,
        &qed::OpenOptions {
            image: qed::ImageOptions {
                read_only: a.read_only,
                copy_on_read: a.copy_on_read,
                ..a.share.apply(a.remote.read_write()).image
            },
            ..a.share.apply(a.remote.read_write())
        },
    )?;
    let mut failed = false;
    for c in &a.commands {
        if let Err(e) = run_one(&*dev, c) {
            eprintln!("{c}: {e:#}");
            failed = true;
        }
    }
    dev.flush()?;
    Ok(u8::from(failed))
}
