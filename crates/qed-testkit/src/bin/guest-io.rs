//! The benchmark's workload inside a test guest: random direct reads or writes of one
//! block size on a disk, from several threads at once (each one request deep), for a
//! while; prints what it did as `key=value` words. It runs in the guest's initramfs,
//! with nothing but the C library, so it uses the standard library alone.
//!
//! `guest-io DEVICE randwrite|randread|fill BLOCK THREADS SECONDS SPAN_MIB`
//!
//! `fill` writes the span once, front to back, in blocks, from one thread, however long
//! it takes: random reads over a filled span read data on every path, whatever the
//! random writes before them managed to allocate.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        eprintln!("usage: guest-io DEVICE randwrite|randread|fill BLOCK THREADS SECONDS SPAN_MIB");
        std::process::exit(2);
    }
    let number = |i: usize| -> u64 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("guest-io: {} is not a number", args[i]);
            std::process::exit(2)
        })
    };
    let (block, threads, seconds, span) = (number(3), number(4), number(5), number(6) << 20);
    let write = match args[2].as_str() {
        "randwrite" | "fill" => true,
        "randread" => false,
        other => {
            eprintln!("guest-io: {other}: randwrite, randread or fill");
            std::process::exit(2)
        }
    };
    if block == 0 || block % 512 != 0 || span < block || threads == 0 {
        eprintln!("guest-io: a block of whole sectors, a span of at least one, a thread");
        std::process::exit(2);
    }
    let file = match OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(0o40000) // O_DIRECT: the disk, not the guest's page cache
        .open(&args[1])
    {
        Ok(f) => Arc::new(f),
        Err(e) => {
            eprintln!("guest-io: {}: {e}", args[1]);
            std::process::exit(1)
        }
    };
    if args[2] == "fill" {
        fill(&file, block, span);
        return;
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let blocks = span / block;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (file, done, failed) = (file.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                // Direct I/O wants an aligned buffer: a page-aligned slice of a larger one.
                let mut raw = vec![0x5au8; (block + 4096) as usize];
                let skew = raw.as_ptr().align_offset(4096);
                let buf = &mut raw[skew..skew + block as usize];
                let mut state =
                    0x9e37_79b9_7f4a_7c15u64 ^ (t + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                while Instant::now() < deadline {
                    // xorshift: a spread of offsets, the same for every run.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let at = (state % blocks) * block;
                    let r = if write {
                        buf[..8].copy_from_slice(&state.to_le_bytes());
                        file.write_all_at(buf, at)
                    } else {
                        file.read_exact_at(buf, at)
                    };
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                        return;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let secs = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    if failed.load(Ordering::Relaxed) {
        eprintln!("guest-io: an I/O failed");
        std::process::exit(1);
    }
    println!(
        "{}_ios={n} {}_iops={:.0}",
        args[2],
        args[2],
        n as f64 / secs
    );
}

/// Writes `span` bytes of `file` front to back in direct writes of `block` bytes.
fn fill(file: &std::fs::File, block: u64, span: u64) {
    let started = Instant::now();
    let mut raw = vec![0xa5u8; (block + 4096) as usize];
    let skew = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skew..skew + block as usize];
    let mut at = 0;
    while at + block <= span {
        buf[..8].copy_from_slice(&at.to_le_bytes());
        if let Err(e) = file.write_all_at(buf, at) {
            eprintln!("guest-io: writing at {at}: {e}");
            std::process::exit(1);
        }
        at += block;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fill_mib={} fill_mibps={:.0}",
        at >> 20,
        (at >> 20) as f64 / secs
    );
}
