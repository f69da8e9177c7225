//! `qed bench`: the workload of `qemu-img bench`, on our implementation.

use anyhow::{bail, Context, Result};
use qed::Format;
use qed::{bench, BenchParams, Engine};
use std::path::PathBuf;

/// Run a simple image benchmark, with qemu-img bench's flags and meaning.
#[derive(clap::Args)]
pub struct Args {
    /// Image format: qed or raw (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = crate::values::format)]
    format: Option<Format>,
    /// Number of requests.
    #[arg(short = 'c', long = "count", default_value_t = 75000)]
    count: u64,
    /// Requests in parallel.
    #[arg(short = 'd', long = "depth", default_value_t = 64)]
    depth: usize,
    /// Bytes per request.
    #[arg(short = 's', long = "buffer-size", default_value = "4k", value_parser = crate::values::size)]
    size: u64,
    /// Offset increment between requests (default: the buffer size).
    #[arg(short = 'S', long = "step-size", value_parser = crate::values::size)]
    step: Option<u64>,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset", default_value = "0", value_parser = crate::values::size)]
    offset: u64,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Cache mode: none (O_DIRECT), writeback, or writethrough (flush after each write).
    #[arg(short = 't', long = "cache", value_enum, default_value = "writeback")]
    cache: Cache,
    /// Byte to write.
    #[arg(long = "pattern", default_value_t = 0)]
    pattern: u8,
    /// Flush after this many requests.
    #[arg(long = "flush-interval")]
    flush_interval: Option<u64>,
    /// How requests are issued: io_uring (the default: one thread, requests to mapped
    /// data straight to the file), or threads (one per request in flight); native is
    /// taken as io_uring.
    #[arg(short = 'i', long = "aio", value_enum)]
    aio: Option<Aio>,
    /// Quiet: print only the result line.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// `-t`: qemu-img bench's cache modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Cache {
    /// O_DIRECT.
    None,
    /// Through the page cache.
    Writeback,
    /// Through the page cache, flushed after each write.
    Writethrough,
    /// O_DIRECT, flushed after each write.
    Directsync,
}

/// `-i`: how requests are issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Aio {
    /// One thread per request in flight.
    Threads,
    /// Taken as io_uring.
    Native,
    /// One thread; requests to mapped data go straight to the file.
    #[value(name = "io_uring")]
    IoUring,
}

/// Runs `qed bench`; returns the exit code.
pub fn run(a: Args) -> Result<u8> {
    let (direct, writethrough) = match a.cache {
        Cache::None => (true, false),
        Cache::Writeback => (false, false),
        Cache::Writethrough => (false, true),
        Cache::Directsync => (true, true),
    };
    let size = usize::try_from(a.size).context("buffer size too large")?;
    if size == 0 || size > 1 << 30 {
        bail!("invalid buffer size {size}: it must be from 1 byte to 1 GiB");
    }
    let step = a.step.unwrap_or(size as u64);
    if a.depth == 0 || a.depth > 1024 {
        bail!("invalid depth {}: it must be from 1 to 1024", a.depth);
    }
    let params = BenchParams {
        count: a.count,
        depth: a.depth,
        size,
        step,
        offset: a.offset,
        write: a.write,
        pattern: a.pattern,
        flush_interval: a.flush_interval,
        writethrough,
        engine: match a.aio {
            Some(Aio::Threads) => Engine::Threads,
            _ => Engine::IoUring,
        },
    };
    let format = a.format;
    let dev = crate::open::open_for_io(
        &a.file,
        format,
        &qed::OpenOptions {
            image: qed::ImageOptions {
                read_only: !a.write,
                ..a.remote.read_write().image
            },
            direct,
            ..a.remote.read_write()
        },
    )?;
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            a.count,
            if a.write { "write" } else { "read" },
            size,
            a.depth,
            params.offset,
            step
        );
    }
    let elapsed = bench(&*dev, &params)?;
    println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    Ok(0)
}
