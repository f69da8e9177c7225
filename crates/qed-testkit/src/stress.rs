//! The stress writer: concurrent writes with periodic flushes, logging what each flush
//! made durable, for tests that kill the process at random moments.
//!
//! The image is divided into `slots` slots of `slot_size` bytes, slot `i` starting at
//! `i * stride` (see [`stride`]), so that slots spread over many L2 tables. Writer
//! thread `t` owns the slots `i` with `i % threads == t`, so writes to one slot never
//! race. Each write covers whole 512-byte sectors of one slot; every sector it writes is
//! self-describing (see [`sector`]), so a reader can tell, sector by sector, which write
//! it holds and that it is in the right place.
//!
//! After each successful flush, the writes that completed before the flush started are
//! appended to the log, one line each, and the log is fsync'd:
//! `SLOT GENERATION FIRST_SECTOR SECTORS` (sectors counted from the start of the slot).
//! Generations start at `seed << 32` and grow with every write of a run, so a later run
//! with a larger seed outranks every earlier one.
//!
//! A kill test runs the writer as a process of its own (see [`main`]), because only a
//! process can be killed at an arbitrary instruction.

use anyhow::{bail, Context, Result};
use qed::BlockDevice;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes per self-describing sector.
pub const SECTOR: u64 = 512;

/// What a run writes, and where it logs it.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "stress", no_binary_name = true)]
pub struct Options {
    /// The image (opened read-write; repaired first if NEED_CHECK is set).
    pub image: PathBuf,
    /// Seeds the choice of writes, and the generations (seed << 32 onwards): from 1 to
    /// 2^31 - 1.
    #[arg(long)]
    pub seed: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 4)]
    pub threads: u64,
    /// File the durable writes are appended to.
    #[arg(long)]
    pub log: PathBuf,
    /// Number of slots.
    #[arg(long, default_value_t = 256)]
    pub slots: u64,
    /// Bytes per slot: a positive multiple of 512 (k and M suffixes are binary units).
    #[arg(long, default_value = "128k", value_parser = parse_size)]
    pub slot_size: u64,
    /// Longest pause between flushes, in milliseconds (each pause is random up to it).
    #[arg(long, default_value_t = 20)]
    pub flush_interval_ms: u64,
    /// Stop (flushing, logging and closing the image) after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
}

/// Parses `65536`, `64k` or `1M`.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.strip_suffix(['k', 'K']) {
        Some(num) => (num, 10),
        None => match s.strip_suffix('M') {
            Some(num) => (num, 20),
            None => (s, 0),
        },
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("invalid size '{s}': expected a number of bytes, k or M"))
}

/// Runs the writer with a command line such as `IMAGE --seed 1 --log log.txt`, as a
/// process's `main`: a process that exits 0 when the run ends by itself, and otherwise
/// says why it failed on stderr.
pub fn main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let opts = <Options as clap::Parser>::parse_from(args);
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stress: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where slot `i` starts is `i * stride`: the image divided evenly among the slots,
/// rounded down to a multiple of the slot size.
pub const fn stride(image_size: u64, slots: u64, slot_size: u64) -> u64 {
    image_size / slots / slot_size * slot_size
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
/// then bytes derived from all three. `out` is one sector long.
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

/// A counter passed through splitmix64: cheap, reproducible from its seed, and good enough
/// to pick writes and delays.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }

    /// The next number, reduced below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One completed write.
struct Record {
    slot: u64,
    gen: u64,
    first: u64,
    sectors: u64,
}

/// What the writer threads and the flushing thread share.
struct Shared<'a> {
    opts: &'a Options,
    image: qed::Image,
    stride: u64,
    sectors_per_slot: u64,
    deadline: Instant,
    stop: AtomicBool,
    completed: Mutex<Vec<Record>>,
    failed: Mutex<Option<anyhow::Error>>,
}

/// Writes from `opts.threads` threads until `opts.seconds` have passed, flushing at
/// random intervals and logging what each flush made durable; then flushes, logs and
/// closes the image.
pub fn run(opts: &Options) -> Result<()> {
    validate(opts)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&opts.log)
        .with_context(|| format!("opening {}", opts.log.display()))?;
    let image = open_image(&opts.image)?;
    let stride = stride(image.size(), opts.slots, opts.slot_size);
    if stride == 0 {
        bail!(
            "{} slots of {} bytes do not fit in the image",
            opts.slots,
            opts.slot_size
        );
    }
    let shared = Shared {
        opts,
        image,
        stride,
        sectors_per_slot: opts.slot_size / SECTOR,
        deadline: Instant::now() + Duration::from_secs_f64(opts.seconds),
        stop: AtomicBool::new(false),
        completed: Mutex::new(Vec::new()),
        failed: Mutex::new(None),
    };
    std::thread::scope(|s| {
        for t in 0..opts.threads.min(opts.slots) {
            let shared = &shared;
            s.spawn(move || shared.write_until_stopped(t));
        }
        let result = shared.flush_until_deadline(&mut log);
        shared.stop.store(true, Ordering::Relaxed);
        result
    })?;
    if let Some(e) = shared
        .failed
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(e);
    }
    // The writers have stopped: this flush covers every write they completed.
    flush_and_log(&shared.image, &shared.completed, &mut log)?;
    shared.image.close()?;
    Ok(())
}

fn validate(opts: &Options) -> Result<()> {
    if opts.seed == 0 || opts.seed >= 1 << 31 {
        bail!("--seed must be from 1 to 2^31 - 1");
    }
    if opts.threads == 0 || opts.slots == 0 {
        bail!("--threads and --slots must be at least 1");
    }
    if opts.slot_size == 0 || opts.slot_size % SECTOR != 0 {
        bail!("--slot-size must be a positive multiple of 512");
    }
    Ok(())
}

/// Opens the image read-write. An image left by a kill has NEED_CHECK set and is
/// repaired by the open; saying so on stderr helps when a later run fails.
fn open_image(path: &Path) -> Result<qed::Image> {
    let image = qed::Image::open(path, &qed::OpenOptions::default())
        .with_context(|| format!("opening {}", path.display()))?;
    if let Some(r) = image.open_repair() {
        eprintln!(
            "stress: {}: NEED_CHECK was set; the check repaired {} corruptions and \
             reclaimed {} leaked clusters",
            path.display(),
            r.corruptions_fixed,
            r.leaks_fixed
        );
    }
    Ok(image)
}

impl Shared<'_> {
    /// Writer thread `t`: random writes to its own slots until told to stop. A failed
    /// write stops every thread.
    fn write_until_stopped(&self, t: u64) {
        let (seed, threads) = (self.opts.seed, self.opts.threads);
        let mut rng = Rng(mix(seed) ^ mix(t + 1));
        let mut gen = seed << 32;
        let owned = (self.opts.slots - t).div_ceil(threads);
        let mut buf = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let slot = t + rng.below(owned) * threads;
            let (first, sectors) = self.pick_sectors(&mut rng);
            gen += 1;
            let at = slot * self.stride + first * SECTOR;
            buf.resize((sectors * SECTOR) as usize, 0);
            for (k, out) in buf.chunks_mut(SECTOR as usize).enumerate() {
                sector(slot, gen, at / SECTOR + k as u64, out);
            }
            if let Err(e) = self.image.write_at(&buf, at) {
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(anyhow::Error::from(e).context(format!("writing at {at}")));
                self.stop.store(true, Ordering::Relaxed);
                return;
            }
            let record = Record {
                slot,
                gen,
                first,
                sectors,
            };
            self.completed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(record);
        }
    }

    /// The first sector and sector count of a write within a slot: mostly small writes
    /// (which leave partly written clusters), some up to half a slot, some whole slots.
    fn pick_sectors(&self, rng: &mut Rng) -> (u64, u64) {
        let per_slot = self.sectors_per_slot;
        let sectors = match rng.below(10) {
            0..=4 => 1 + rng.below(16),
            5..=7 => 1 + rng.below((per_slot / 2).max(1)),
            _ => per_slot,
        }
        .min(per_slot);
        (rng.below(per_slot - sectors + 1), sectors)
    }

    /// Flushes and logs after random pauses until the deadline, or until a writer
    /// fails; then tells the writers to stop.
    fn flush_until_deadline(&self, log: &mut std::fs::File) -> Result<()> {
        let mut rng = Rng(mix(!self.opts.seed));
        let longest_pause = self.opts.flush_interval_ms.max(1);
        loop {
            if Instant::now() >= self.deadline || self.stop.load(Ordering::Relaxed) {
                self.stop.store(true, Ordering::Relaxed);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(rng.below(longest_pause)));
            flush_and_log(&self.image, &self.completed, log)?;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("1G").is_err());
        assert!(parse_size("k").is_err());
    }

    #[test]
    fn sectors_describe_themselves() {
        let mut a = [0u8; SECTOR as usize];
        let mut b = [0u8; SECTOR as usize];
        sector(3, 7 << 32, 99, &mut a);
        assert_eq!(u64::from_le_bytes(a[0..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(a[8..16].try_into().unwrap()), 7 << 32);
        assert_eq!(u64::from_le_bytes(a[16..24].try_into().unwrap()), 99);
        sector(3, 7 << 32, 100, &mut b);
        assert_ne!(a[24..], b[24..]);
    }

    /// A short run over a small image: every logged write reads back, since nothing
    /// kills it.
    #[test]
    fn a_run_logs_what_it_wrote() {
        let dir = std::env::temp_dir().join(format!("qed-testkit-stress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (img, log) = (dir.join("img.qed"), dir.join("log.txt"));
        let size = 64 << 20;
        qed::Image::create(&img, &qed::CreateOptions::new(size)).unwrap();
        let code = main([
            img.to_str().unwrap(),
            "--seed",
            "5",
            "--slots",
            "16",
            "--slot-size",
            "64k",
            "--log",
            log.to_str().unwrap(),
            "--flush-interval-ms",
            "5",
            "--seconds",
            "0.2",
        ]);
        assert_eq!(code, ExitCode::SUCCESS);
        let text = std::fs::read_to_string(&log).unwrap();
        let image = qed::Image::open(&img, &qed::OpenOptions::read_only()).unwrap();
        let stride = stride(size, 16, 64 << 10);
        let mut latest = std::collections::HashMap::new();
        for line in text.lines() {
            let f: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            for s in f[2]..f[2] + f[3] {
                let e = latest.entry((f[0], s)).or_insert(0);
                *e = f[1].max(*e);
            }
        }
        assert!(!latest.is_empty());
        let (mut got, mut want) = ([0u8; SECTOR as usize], [0u8; SECTOR as usize]);
        for (&(slot, s), &gen) in &latest {
            let abs = slot * stride / SECTOR + s;
            image.read_at(&mut got, abs * SECTOR).unwrap();
            sector(slot, gen, abs, &mut want);
            assert_eq!(got, want, "slot {slot} sector {s}");
        }
        drop(image);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
