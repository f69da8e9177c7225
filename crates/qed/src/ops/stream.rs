//! Streaming: copying into an image everything its backing chain supplies above a base,
//! then making that base (or nothing) its backing file.
//!
//! The job runs while the image is in use: each run of clusters is filled through the
//! same claim as a guest write ([`Image::populate`]), so a guest write always wins, and
//! the header changes only once every copied cluster is durable. Stopped at any point
//! (killed, cancelled, a failing server), the image is consistent and still names its
//! old backing file; a new run skips what is already copied.

use super::step::{Progress, STEP};
use crate::block::BlockDevice;
use crate::chain::{describe, Location};
use crate::engine::Image;
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a stream runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamOptions<'a> {
    /// The layer of the backing chain that stays the backing file (1 is the image's
    /// backing file; see [`stream_base`]); `None` copies everything and leaves no
    /// backing file.
    pub base: Option<u32>,
    /// Bytes copied per second at most (`None`: as fast as it goes).
    pub rate: Option<u64>,
    /// Set to stop the job between steps.
    pub cancel: Option<&'a AtomicBool>,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Everything is copied and the header names the base (or no backing file).
    Done {
        /// Bytes copied into the image.
        copied: u64,
    },
    /// Cancelled: what was copied stays, the header is unchanged.
    Cancelled {
        /// Bytes copied into the image.
        copied: u64,
    },
}

/// Finds the layer of `image`'s backing chain named `base`, for
/// [`StreamOptions::base`]: 1 for its backing file, 2 for that file's, and so on.
/// `base` is a URL or a path, relative to the current directory or, as a backing file
/// name in a header is, to the image's directory (a server's current directory is
/// rarely where its client is).
pub fn stream_base(image: &Image, base: &str) -> Result<u32> {
    let identity = |name: &str| Location::named(Path::new(name)).identity().ok();
    let wants = [
        identity(base),
        Location::backing(Path::new(image.filename()), base)
            .identity()
            .ok(),
    ];
    let mut layer = image.backing();
    let mut depth = 1;
    while let Some(dev) = layer {
        let have = identity(dev.filename());
        if have.is_some() && wants.contains(&have) {
            return Ok(depth);
        }
        layer = dev.backing();
        depth += 1;
    }
    Err(Error::invalid_argument(format!(
        "{base} is not in the backing chain of {}: name one of its backing files (qed map \
         shows them)",
        image.filename()
    )))
}

/// Copies into `image` every cluster its backing chain supplies above `opts.base`,
/// then rewrites the header to name that base (or none). `progress` is called with the
/// bytes of the image gone through so far and its size.
///
/// Workers take the image a segment at a time, so that fetching from a slow backing
/// file (a server) overlaps with writing what came before; each cluster is still filled
/// once, under its claim.
pub fn stream(
    image: &Image,
    opts: &StreamOptions<'_>,
    progress: Progress<'_>,
) -> Result<StreamEnd> {
    if image.is_read_only() {
        return Err(Error::ReadOnly);
    }
    let new_name = match opts.base {
        Some(depth) => Some((depth, base_name(image, depth)?)),
        None => None,
    };
    let size = image.size();
    let cancelled = || opts.cancel.is_some_and(|c| c.load(Ordering::Acquire));
    let pacer = Pacer::new(opts.rate);
    // Unpaced, a whole segment at a time where the chain allows: a slow server answers
    // one large request about as soon as a small one. Paced, a step at a time, so that
    // the pace is kept (and a stop seen) within a step's bytes.
    let step = if pacer.rate.is_some() { STEP } else { SEGMENT };
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let running = AtomicUsize::new(STREAM_WORKERS);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let stop = || cancelled() || failed.lock().map_or(true, |f| f.is_some());
    progress(0, size);
    std::thread::scope(|s| {
        for _ in 0..STREAM_WORKERS {
            s.spawn(|| {
                while !stop() {
                    let start = next.fetch_add(SEGMENT, Ordering::AcqRel);
                    if start >= size {
                        break;
                    }
                    let end = (start + SEGMENT).min(size);
                    let result =
                        stream_segment(image, start, end, step, opts.base, &pacer, &stop, &done);
                    if let Err(e) = result {
                        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert(e);
                    }
                }
                running.fetch_sub(1, Ordering::AcqRel);
            });
        }
        while running.load(Ordering::Acquire) > 0 {
            progress(done.load(Ordering::Acquire), size);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let copied = pacer.copied();
    if cancelled() {
        return Ok(StreamEnd::Cancelled { copied });
    }
    progress(size, size);
    image.flush()?;
    image.cut_backing(new_name.as_ref().map(|(d, n)| (*d, n.as_str())))?;
    Ok(StreamEnd::Done { copied })
}

/// Workers a stream runs: enough to keep a few requests to a server in flight while
/// others write.
const STREAM_WORKERS: usize = 4;
/// Guest bytes a worker takes at a time.
const SEGMENT: u64 = 8 << 20;

/// Streams guest bytes `start..end`, at most `step` at a time; stops early when `stop`
/// says so.
#[allow(clippy::too_many_arguments)]
fn stream_segment(
    image: &Image,
    start: u64,
    end: u64,
    step: u64,
    base: Option<u32>,
    pacer: &Pacer,
    stop: &dyn Fn() -> bool,
    done: &AtomicU64,
) -> Result<()> {
    let mut pos = start;
    while pos < end && !stop() {
        let run = describe(image, pos, (end - pos).min(step), 0)?;
        let copy = run.depth > 0
            && run.present
            && match base {
                // Below no base, zeros need no copy: they read as zeros without one.
                None => !run.zero,
                Some(base) => run.depth < base,
            };
        let n = if !copy {
            run.length
        } else {
            match image.populate_up_to(pos, run.length, step)? {
                Some(n) => {
                    pacer.add(n, stop);
                    n
                }
                // A guest write got there first: look again.
                None => continue,
            }
        };
        pos += n;
        done.fetch_add(n, Ordering::AcqRel);
    }
    Ok(())
}

/// The name to store for the layer at `depth`: the image's own backing file keeps the
/// name its header has; a deeper one is stored as an absolute path (a relative name in
/// a lower image's header is relative to that image, not to this one) or its URL.
fn base_name(image: &Image, depth: u32) -> Result<String> {
    if depth == 1 {
        if let Some(name) = image.header_backing_name() {
            return Ok(name);
        }
    }
    let mut layer = image.backing();
    for _ in 1..depth {
        layer = layer.and_then(|d| d.backing());
    }
    let dev = layer.filter(|_| depth >= 1).ok_or_else(|| {
        Error::invalid_argument(format!(
            "{}: its backing chain has no layer {depth}",
            image.filename()
        ))
    })?;
    let at = Location::named(Path::new(dev.filename()));
    if at.is_remote() {
        return Ok(dev.filename().to_string());
    }
    let path = at.identity()?;
    path.to_str().map(str::to_string).ok_or_else(|| {
        Error::invalid_argument(format!("{}: the base's path is not UTF-8", path.display()))
    })
}

/// Keeps a job at or under a rate, shared by its workers: each sleeps after a step
/// until the bytes copied so far are due (in slices, so that a stop is seen within a
/// tenth of a second).
struct Pacer {
    rate: Option<u64>,
    start: Instant,
    copied: AtomicU64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Self {
        Self {
            rate: rate.filter(|r| *r > 0),
            start: Instant::now(),
            copied: AtomicU64::new(0),
        }
    }

    fn copied(&self) -> u64 {
        self.copied.load(Ordering::Acquire)
    }

    fn add(&self, n: u64, stop: &dyn Fn() -> bool) {
        let total = self.copied.fetch_add(n, Ordering::AcqRel) + n;
        let Some(rate) = self.rate else {
            return;
        };
        let due = Duration::from_secs_f64(total as f64 / rate as f64);
        while !stop() {
            let Some(wait) = due.checked_sub(self.start.elapsed()) else {
                return;
            };
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
    }
}
