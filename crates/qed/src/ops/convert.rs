//! Copying one device's contents into another, sparsely.

use super::step::{is_zero, read_padded, Progress, STEP};
use crate::block::BlockDevice;
use crate::chain::known_zero;
use crate::error::{Error, Result};
use crate::storage::AlignedBuf;
use std::sync::mpsc;

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

/// Steps read ahead of the one being written.
const READ_AHEAD: usize = 4;

/// Copies all of `src` into `dst`, which must be at least as large.
///
/// A thread reads the source (and the destination's new backing file) up to
/// [`READ_AHEAD`] steps ahead while this one writes, in order: reading waits on the
/// source's disk and writing on the destination's, and neither waits for the other.
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
    std::thread::scope(|s| {
        let (read_tx, read_rx) = mpsc::sync_channel::<Result<Step>>(READ_AHEAD);
        let (free_tx, free_rx) = mpsc::channel::<Buffers>();
        s.spawn(move || read_steps(src, opts, &read_tx, &free_rx));
        for step in read_rx {
            let step = step?;
            if let Some(bufs) = step.bufs {
                let n = step.len as usize;
                let base = bufs.under.as_ref().map(|u| &u[..n]);
                copy_chunk(dst, &bufs.data[..n], base, step.pos, opts)?;
                let _ = free_tx.send(bufs);
            }
            progress(step.pos + step.len, size);
        }
        Ok(())
    })?;
    dst.flush()
}

/// The buffers of one step: the source's bytes (aligned, so that a destination opened
/// with O_DIRECT takes them as they are), and the new backing file's.
struct Buffers {
    data: AlignedBuf,
    under: Option<Vec<u8>>,
}

/// One step of the copy, read; `bufs` is `None` for a step skipped without reading.
struct Step {
    pos: u64,
    len: u64,
    bufs: Option<Buffers>,
}

/// Reads the steps in order and sends them, taking buffers back from the writer. Stops
/// after the first error, or when the writer stops listening.
fn read_steps(
    src: &dyn BlockDevice,
    opts: &ConvertOptions<'_>,
    out: &mpsc::SyncSender<Result<Step>>,
    free: &mpsc::Receiver<Buffers>,
) {
    let size = src.size();
    // Enough for the steps queued, the one being read and the one being written.
    let mut spare = READ_AHEAD + 2;
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(STEP);
        let step = (|| -> Result<Option<Step>> {
            let skip_whole = opts.sparse_size > 0
                && opts.target_is_zero
                && opts.target_backing.is_none()
                && known_zero(src, pos, n)?;
            if skip_whole {
                return Ok(Some(Step {
                    pos,
                    len: n,
                    bufs: None,
                }));
            }
            let mut bufs = match free.try_recv() {
                Ok(b) => b,
                Err(_) if spare > 0 => {
                    spare -= 1;
                    Buffers {
                        data: AlignedBuf::new(STEP as usize),
                        under: opts.target_backing.map(|_| vec![0u8; STEP as usize]),
                    }
                }
                Err(_) => match free.recv() {
                    Ok(b) => b,
                    Err(_) => return Ok(None), // the writer has stopped
                },
            };
            src.read_at(&mut bufs.data[..n as usize], pos)?;
            if let (Some(u), Some(b)) = (&mut bufs.under, opts.target_backing) {
                read_padded(b, &mut u[..n as usize], pos)?;
            }
            Ok(Some(Step {
                pos,
                len: n,
                bufs: Some(bufs),
            }))
        })();
        let step = match step {
            Ok(Some(step)) => Ok(step),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        let failed = step.is_err();
        if out.send(step).is_err() || failed {
            return;
        }
        pos += n;
    }
}

/// What to do with one block of a chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Skip,
    Zero,
    Data,
}

/// Writes one chunk, block by block (blocks of `sparse_size`), merging neighbours that
/// need the same action into one request.
fn copy_chunk(
    dst: &dyn BlockDevice,
    chunk: &[u8],
    base: Option<&[u8]>,
    pos: u64,
    opts: &ConvertOptions<'_>,
) -> Result<()> {
    let block = if opts.sparse_size == 0 {
        chunk.len()
    } else {
        opts.sparse_size.min(chunk.len() as u64) as usize
    };
    let action = |start: usize, end: usize| -> Action {
        let data = &chunk[start..end];
        if let Some(b) = base {
            if data == &b[start..end] {
                return Action::Skip;
            }
        }
        if opts.sparse_size == 0 || !is_zero(data) {
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
        // Blocks are aligned to the guest offset, as qemu-img aligns them.
        let end = (((pos + i as u64) / block as u64 + 1) * block as u64 - pos) as usize;
        let end = end.min(chunk.len());
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
