//! `qed stress` (hidden): concurrent writes with periodic flushes, logging what each
//! flush made durable, for tests that kill the process at random moments.
//!
//! The image is divided into `--slots` slots of `--slot-size` bytes, slot `i` starting
//! at `i * stride` where `stride` is the image size divided by the number of slots,
//! rounded down to a multiple of the slot size (so slots spread over many L2 tables).
//! Writer thread `t` owns the slots `i` with `i % threads == t`, so writes to one slot
//! never race. Each write covers whole 512-byte sectors of one slot; every sector it
//! writes is self-describing (see [`sector`]), so a reader can tell, sector by sector,
//! which write it holds and that it is in the right place.
//!
//! After each successful flush, the writes that completed before the flush started are
//! appended to the log, one line each, and the log is fsync'd:
//! `SLOT GENERATION FIRST_SECTOR SECTORS` (sectors counted from the start of the slot).
//! Generations start at `seed << 32` and grow with every write of a run, so a later run
//! with a larger seed outranks every earlier one.

use crate::units::parse_size;
use anyhow::{bail, Context, Result};
use qed::BlockDevice;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes per self-describing sector.
pub const SECTOR: u64 = 512;

/// Write patterns from several threads and log what each flush made durable.
#[derive(clap::Args)]
pub struct Args {
    /// The image (opened read-write; repaired first if NEED_CHECK is set).
    file: PathBuf,
    /// Seeds the choice of writes, and the generations (seed << 32 onwards). At least 1.
    #[arg(long)]
    seed: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 4)]
    threads: u64,
    /// File the durable writes are appended to.
    #[arg(long)]
    log: PathBuf,
    /// Number of slots.
    #[arg(long, default_value_t = 256)]
    slots: u64,
    /// Bytes per slot: a multiple of 512.
    #[arg(long, default_value = "128k")]
    slot_size: String,
    /// Longest pause between flushes, in milliseconds (each pause is random up to it).
    #[arg(long, default_value_t = 20)]
    flush_interval_ms: u64,
    /// Stop (flushing, logging and closing the image) after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
}

/// splitmix64: a small, good mixing function.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The content of guest sector `sector` (counted from the start of the image) written by
/// generation `gen` of slot `slot`: slot, generation and sector as little-endian u64s,
/// then bytes derived from all three.
pub fn sector(slot: u64, gen: u64, sector: u64, out: &mut [u8]) {
    out[0..8].copy_from_slice(&slot.to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
    out[16..24].copy_from_slice(&sector.to_le_bytes());
    let seed = mix(slot ^ mix(gen ^ mix(sector)));
    for (i, chunk) in out[24..SECTOR as usize].chunks_mut(8).enumerate() {
        let v = mix(seed ^ i as u64).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One completed write.
struct Record {
    slot: u64,
    gen: u64,
    first: u64,
    sectors: u64,
}

pub fn run(a: Args) -> Result<u8> {
    if a.seed == 0 || a.seed >= 1 << 31 {
        bail!("--seed must be from 1 to 2^31 - 1");
    }
    if a.threads == 0 || a.slots == 0 {
        bail!("--threads and --slots must be at least 1");
    }
    let slot_size = parse_size(&a.slot_size)?;
    if slot_size == 0 || slot_size % SECTOR != 0 {
        bail!("--slot-size must be a positive multiple of 512");
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.log)
        .with_context(|| format!("opening {}", a.log.display()))?;
    let image = super::open_image(&a.file, &qed::OpenOptions::default())?;
    let stride = image.size() / a.slots / slot_size * slot_size;
    if stride == 0 {
        bail!(
            "{} slots of {slot_size} bytes do not fit in the image",
            a.slots
        );
    }
    let sectors_per_slot = slot_size / SECTOR;
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let stop = AtomicBool::new(false);
    let completed = Mutex::new(Vec::<Record>::new());
    let failed = Mutex::new(None::<anyhow::Error>);

    std::thread::scope(|s| -> Result<()> {
        for t in 0..a.threads.min(a.slots) {
            let (image, stop, completed, failed) = (&image, &stop, &completed, &failed);
            s.spawn(move || {
                let mut rng = Rng(mix(a.seed) ^ mix(t + 1));
                let mut gen = a.seed << 32;
                let owned = (a.slots - t).div_ceil(a.threads);
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let slot = t + rng.below(owned) * a.threads;
                    let sectors = match rng.below(10) {
                        0..=4 => 1 + rng.below(16),
                        5..=7 => 1 + rng.below(sectors_per_slot / 2),
                        _ => sectors_per_slot,
                    }
                    .min(sectors_per_slot);
                    let first = rng.below(sectors_per_slot - sectors + 1);
                    gen += 1;
                    let at = slot * stride + first * SECTOR;
                    buf.resize((sectors * SECTOR) as usize, 0);
                    for (k, out) in buf.chunks_mut(SECTOR as usize).enumerate() {
                        sector(slot, gen, at / SECTOR + k as u64, out);
                    }
                    if let Err(e) = image.write_at(&buf, at) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(anyhow::Error::from(e).context(format!("writing at {at}")));
                        stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    completed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Record {
                            slot,
                            gen,
                            first,
                            sectors,
                        });
                }
            });
        }

        let mut rng = Rng(mix(!a.seed));
        let result = (|| -> Result<()> {
            loop {
                let done = Instant::now() >= deadline || stop.load(Ordering::Relaxed);
                if done {
                    stop.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(rng.below(a.flush_interval_ms.max(1))));
                flush_and_log(&image, &completed, &mut log)?;
            }
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    // The writers have stopped: this flush covers every write they completed.
    flush_and_log(&image, &completed, &mut log)?;
    image.close()?;
    Ok(0)
}

/// Flushes the image, then logs every write completed before the flush started.
fn flush_and_log(
    image: &qed::Image,
    completed: &Mutex<Vec<Record>>,
    log: &mut std::fs::File,
) -> Result<()> {
    let batch = std::mem::take(&mut *completed.lock().unwrap_or_else(|p| p.into_inner()));
    image.flush()?;
    if batch.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for r in &batch {
        text += &format!("{} {} {} {}\n", r.slot, r.gen, r.first, r.sectors);
    }
    log.write_all(text.as_bytes())
        .and_then(|()| log.sync_data())
        .context("writing the log")
}
