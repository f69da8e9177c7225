//! Copying one device's contents into another, sparsely.

use super::step::{is_zero, read_padded, Progress, STEP};
use crate::block::BlockDevice;
use crate::chain::describe;
use crate::error::{Error, Result};
use crate::storage::AlignedBuf;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

/// How to copy.
#[derive(Debug, Clone, Copy)]
pub struct ConvertOptions<'a> {
    /// Runs of zeros at least this long (and aligned to it) are not written as data;
    /// 0 writes every byte, as `qemu-img convert -S 0`.
    pub sparse_size: u64,
    /// The destination reads as zeros everywhere before the copy (a new image with no
    /// backing file), so zero runs need not be written at all.
    pub target_is_zero: bool,
    /// What the destination reads where it has no data of its own (its new backing file):
    /// only bytes that differ from it are written.
    pub target_backing: Option<&'a dyn BlockDevice>,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        Self {
            sparse_size: 4096,
            target_is_zero: false,
            target_backing: None,
        }
    }
}

/// Threads reading the source. A cold source is read in the runs that hold data (see
/// [`read_step`]), each a wait for the disk, so many steps are read at once: copying
/// 64 KiB runs from a cold source, the writer waited for 8 readers two thirds of the
/// time, for 16 about a fifth.
const READERS: usize = 16;
/// Step buffers (2 MiB each): one for each reader, and a few steps read ahead of the
/// one being written.
const BUFFERS: usize = READERS + 4;
/// Zero runs at least this long are not read: below it, reading them along with the
/// data around them costs less than a request of its own for that data.
const MIN_SKIP: u64 = 64 << 10;

/// Copies all of `src` into `dst`, which must be at least as large.
///
/// Sixteen threads (`READERS`) read the source (and the destination's new backing file) ahead
/// while this one writes, in order: reading waits on the source's disk and writing on
/// the destination's, and neither waits for the other.
pub fn convert(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    opts: &ConvertOptions<'_>,
    progress: Progress<'_>,
) -> Result<()> {
    let size = src.size();
    if dst.size() < size {
        return Err(Error::invalid_argument(format!(
            "the destination ({} bytes) is smaller than the source ({size} bytes)",
            dst.size()
        )));
    }
    progress(0, size);
    let steps = size.div_ceil(STEP);
    let (free_tx, free_rx) = mpsc::channel::<Buffers>();
    let pool = Pool {
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        free: Mutex::new((free_rx, 0)),
    };
    std::thread::scope(|s| {
        // Owned here, so that when the writer stops, a reader waiting for a buffer is
        // told.
        let free_tx = free_tx;
        let (done_tx, done_rx) = mpsc::channel::<(u64, Result<Step>)>();
        for _ in 0..READERS {
            let done = done_tx.clone();
            let pool = &pool;
            s.spawn(move || read_steps(src, opts, pool, &done));
        }
        drop(done_tx);
        // Steps that came in before those ahead of them.
        let mut early = BTreeMap::new();
        let mut want = 0;
        let result = (|| {
            while want < steps {
                let step = match early.remove(&want) {
                    Some(step) => step,
                    // Only a reader that panicked leaves a step unsent; the scope then
                    // panics in turn.
                    None => match done_rx.recv() {
                        Ok((i, step)) if i == want => step,
                        Ok((i, step)) => {
                            early.insert(i, step);
                            continue;
                        }
                        Err(_) => break,
                    },
                };
                let step = step?;
                if let Some(bufs) = step.bufs {
                    let n = step.len as usize;
                    let base = bufs.under.as_ref().map(|u| &u[..n]);
                    copy_chunk(dst, &bufs.data[..n], &bufs.zeros, base, step.pos, opts)?;
                    let _ = free_tx.send(bufs);
                }
                progress(step.pos + step.len, size);
                want += 1;
            }
            Ok(())
        })();
        pool.stop.store(true, Ordering::Relaxed);
        result
    })?;
    dst.flush()
}

/// What the readers share.
struct Pool {
    /// The next step to read.
    next: AtomicU64,
    /// Set when the copy stops early: readers stop too.
    stop: AtomicBool,
    /// Buffers the writer is done with, and how many buffers were made.
    free: Mutex<(mpsc::Receiver<Buffers>, usize)>,
}

/// The buffers of one step: the source's bytes (aligned, so that a destination opened
/// with O_DIRECT takes them as they are), and the new backing file's.
struct Buffers {
    data: AlignedBuf,
    under: Option<Vec<u8>>,
    /// Ranges of `data`, in order, filled with zeros instead of read: known to be
    /// zeros without looking.
    zeros: Vec<(usize, usize)>,
}

/// One step of the copy, read; `bufs` is `None` for a step skipped without reading.
struct Step {
    pos: u64,
    len: u64,
    bufs: Option<Buffers>,
}

/// A reader: takes a buffer, then the next step (in that order, so that the step the
/// writer waits for always has its buffer), reads it and sends it. Stops after an
/// error, or when the copy stops.
fn read_steps(
    src: &dyn BlockDevice,
    opts: &ConvertOptions<'_>,
    pool: &Pool,
    done: &mpsc::Sender<(u64, Result<Step>)>,
) {
    let size = src.size();
    // The buffer of a step skipped without reading, for the next one.
    let mut spare = None;
    while !pool.stop.load(Ordering::Relaxed) {
        let Some(mut bufs) = spare.take().or_else(|| take_buffer(pool, opts)) else {
            return;
        };
        let i = pool.next.fetch_add(1, Ordering::Relaxed);
        let pos = i * STEP;
        if pos >= size {
            return;
        }
        let n = (size - pos).min(STEP);
        let step = match read_step(src, opts, pos, &mut bufs, n) {
            Ok(true) => Ok(Step {
                pos,
                len: n,
                bufs: Some(bufs),
            }),
            Ok(false) => {
                spare = Some(bufs);
                Ok(Step {
                    pos,
                    len: n,
                    bufs: None,
                })
            }
            Err(e) => Err(e),
        };
        let failed = step.is_err();
        if done.send((i, step)).is_err() || failed {
            pool.stop.store(true, Ordering::Relaxed);
            return;
        }
    }
}

/// A free buffer, or a new one while fewer than [`BUFFERS`] exist. `None` once the
/// writer is gone.
fn take_buffer(pool: &Pool, opts: &ConvertOptions<'_>) -> Option<Buffers> {
    let mut free = pool.free.lock().unwrap_or_else(|p| p.into_inner());
    if let Ok(b) = free.0.try_recv() {
        return Some(b);
    }
    if free.1 < BUFFERS {
        free.1 += 1;
        return Some(Buffers {
            data: AlignedBuf::new(STEP as usize),
            under: opts.target_backing.map(|_| vec![0u8; STEP as usize]),
            zeros: Vec::new(),
        });
    }
    free.0.recv().ok()
}

/// Reads the step of `n` bytes at `pos` into `bufs`. Runs the source's chain knows to
/// read as zeros are not read but filled with zeros: reading them through the page
/// cache would fill a page with zeros for every 4 KiB of a hole. `false` when the whole
/// step is such a run and the destination needs nothing written there.
fn read_step(
    src: &dyn BlockDevice,
    opts: &ConvertOptions<'_>,
    pos: u64,
    bufs: &mut Buffers,
    n: u64,
) -> Result<bool> {
    let end = pos + n;
    // Runs to read, as (start, end), with zero runs too short to skip merged in.
    let mut reads: Vec<(u64, u64)> = Vec::new();
    let mut p = pos;
    while p < end {
        let e = describe(src, p, end - p, 0)?;
        let run_end = p + e.length;
        if !e.zero || e.length < MIN_SKIP {
            match reads.last_mut() {
                Some(last) if last.1 == p => last.1 = run_end,
                _ => reads.push((p, run_end)),
            }
        }
        p = run_end;
    }
    let skip_whole = reads.is_empty()
        && opts.sparse_size > 0
        && opts.target_is_zero
        && opts.target_backing.is_none();
    if skip_whole {
        return Ok(false);
    }
    let data = &mut bufs.data[..n as usize];
    bufs.zeros.clear();
    let mut zero_from = 0;
    for &(a, b) in &reads {
        let (a, b) = ((a - pos) as usize, (b - pos) as usize);
        if zero_from < a {
            fill_zero_run(data, zero_from, a, pos, opts);
            bufs.zeros.push((zero_from, a));
        }
        src.read_at(&mut data[a..b], pos + a as u64)?;
        zero_from = b;
    }
    if zero_from < data.len() {
        fill_zero_run(data, zero_from, data.len(), pos, opts);
        bufs.zeros.push((zero_from, data.len()));
    }
    if let (Some(u), Some(b)) = (&mut bufs.under, opts.target_backing) {
        read_padded(b, &mut u[..n as usize], pos)?;
    }
    Ok(true)
}

/// Fills `data[a..b]`, a run known to read as zeros, with zeros where the copy will look
/// at it: everywhere when every byte is written as data (`-S 0`) or compared with the
/// new backing file, otherwise only where a block of [`copy_chunk`] holds bytes outside
/// the run too. Blocks wholly inside the run are known zeros and never looked at, and
/// filling them cost a tenth of a copy's CPU time (half of a half-full disk is such
/// runs).
fn fill_zero_run(data: &mut [u8], a: usize, b: usize, pos: u64, opts: &ConvertOptions<'_>) {
    if opts.sparse_size == 0 || opts.target_backing.is_some() {
        data[a..b].fill(0);
        return;
    }
    let len = data.len();
    let block = block_len(opts, len);
    let on_boundary = |i: usize| (pos + i as u64) % block as u64 == 0;
    let head = if a == 0 || on_boundary(a) {
        a
    } else {
        block_end(pos, a, block, len).min(b)
    };
    let tail = if b == len || on_boundary(b) {
        b
    } else {
        // The start of the block that holds byte b - 1.
        let start = ((pos + b as u64) / block as u64 * block as u64).saturating_sub(pos);
        (start as usize).max(head)
    };
    data[a..head].fill(0);
    data[tail..b].fill(0);
}

/// The length of the blocks [`copy_chunk`] decides on, in a chunk of `len` bytes.
fn block_len(opts: &ConvertOptions<'_>, len: usize) -> usize {
    if opts.sparse_size == 0 {
        len
    } else {
        opts.sparse_size.min(len as u64) as usize
    }
}

/// Where the block holding byte `i` of the chunk at guest offset `pos` ends: blocks are
/// aligned to the guest offset, as qemu-img aligns them, and cut at the chunk's end.
fn block_end(pos: u64, i: usize, block: usize, len: usize) -> usize {
    let end = ((pos + i as u64) / block as u64 + 1) * block as u64 - pos;
    (end as usize).min(len)
}

/// What to do with one block of a chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Skip,
    Zero,
    Data,
}

/// Writes one chunk, block by block (blocks of `sparse_size`), merging neighbours that
/// need the same action into one request. `zeros` are ranges of the chunk, in order,
/// known to hold zeros: blocks inside them are not scanned.
fn copy_chunk(
    dst: &dyn BlockDevice,
    chunk: &[u8],
    zeros: &[(usize, usize)],
    base: Option<&[u8]>,
    pos: u64,
    opts: &ConvertOptions<'_>,
) -> Result<()> {
    let block = block_len(opts, chunk.len());
    let mut zeros = zeros.iter().peekable();
    let mut action = |start: usize, end: usize| -> Action {
        let data = &chunk[start..end];
        if let Some(b) = base {
            if data == &b[start..end] {
                return Action::Skip;
            }
        }
        while zeros.next_if(|z| z.1 <= start).is_some() {}
        let known_zero = zeros.peek().is_some_and(|z| z.0 <= start && end <= z.1);
        if opts.sparse_size == 0 || !(known_zero || is_zero(data)) {
            Action::Data
        } else if opts.target_is_zero && base.is_none() {
            Action::Skip
        } else {
            Action::Zero
        }
    };
    let mut run_start = 0;
    let mut run_action = None;
    let mut i = 0;
    while i < chunk.len() {
        let end = block_end(pos, i, block, chunk.len());
        let a = action(i, end);
        if run_action != Some(a) {
            if let Some(prev) = run_action {
                apply(dst, chunk, prev, run_start, i, pos)?;
            }
            run_start = i;
            run_action = Some(a);
        }
        i = end;
    }
    if let Some(prev) = run_action {
        apply(dst, chunk, prev, run_start, chunk.len(), pos)?;
    }
    Ok(())
}

fn apply(
    dst: &dyn BlockDevice,
    chunk: &[u8],
    action: Action,
    start: usize,
    end: usize,
    pos: u64,
) -> Result<()> {
    match action {
        Action::Skip => Ok(()),
        Action::Zero => dst.write_zeroes(pos + start as u64, (end - start) as u64),
        Action::Data => dst.write_at(&chunk[start..end], pos + start as u64),
    }
}
