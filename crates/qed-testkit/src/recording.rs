//! Storage that records every change, so that tests can rebuild the bytes a crash could
//! leave behind.
//!
//! The crash model: a flush makes every operation issued before it durable; operations
//! issued after the last flush before the crash are "in flight" and each may or may not
//! have reached the disk. Of a multi-sector write (or zeroing), each 512-byte-aligned
//! piece may or may not have reached it independently: disks and filesystems promise
//! nothing more than sector atomicity. In-flight operations that did reach the disk are
//! applied in the order they were issued, as a page cache that keeps only the newest
//! copy of each block would write them back.

use qed::Storage;
/// The unit a disk writes whole.
const SECTOR_SIZE: u64 = 512;
use std::io;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

/// Growth limit, as for [`MemoryStorage`](qed::MemoryStorage): a test over a corrupt
/// image must not exhaust memory.
const LIMIT: u64 = 1 << 30;

/// One mutating operation, as issued to a [`RecordingStorage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedOp {
    /// `data` written at `offset` (the file grows if the write ends past its end).
    Write {
        /// File offset of the first byte.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// `len` bytes at `offset` made to read as zeros, without changing the file length.
    /// Recorded as its effect: the range is already clipped to the length the file had,
    /// because a hole punched past the end of a file does nothing.
    Zero {
        /// File offset of the first byte.
        offset: u64,
        /// Bytes zeroed.
        len: u64,
    },
    /// The file length set to this many bytes.
    SetLen(u64),
    /// A flush: every operation before it is durable.
    Flush,
}

impl RecordedOp {
    /// The byte range an operation changes, for writes and zeroings.
    fn range(&self) -> Option<Range<u64>> {
        match self {
            RecordedOp::Write { offset, data } => Some(*offset..offset + data.len() as u64),
            RecordedOp::Zero { offset, len } => Some(*offset..offset + len),
            RecordedOp::SetLen(_) | RecordedOp::Flush => None,
        }
    }

    /// How many pieces a crash can apply independently: one per 512-byte-aligned sector
    /// touched by a write or a zeroing, one for a length change, none for a flush.
    pub fn pieces(&self) -> usize {
        match self.range() {
            Some(r) if r.is_empty() => 0,
            Some(r) => (r.end.div_ceil(SECTOR_SIZE) - r.start / SECTOR_SIZE) as usize,
            None if matches!(self, RecordedOp::SetLen(_)) => 1,
            None => 0,
        }
    }

    /// The file byte range of piece `piece` (writes and zeroings only).
    fn piece_range(&self, piece: usize) -> Option<Range<u64>> {
        let r = self.range()?;
        let first_sector = r.start / SECTOR_SIZE + piece as u64;
        let start = (first_sector * SECTOR_SIZE).max(r.start);
        let end = ((first_sector + 1) * SECTOR_SIZE).min(r.end);
        (start < end).then_some(start..end)
    }

    /// Applies piece `piece` of this operation to `bytes`.
    fn apply_piece(&self, bytes: &mut Vec<u8>, piece: usize) {
        match self {
            RecordedOp::Write { offset, data } => {
                let Some(r) = self.piece_range(piece) else {
                    return;
                };
                if (bytes.len() as u64) < r.end {
                    bytes.resize(r.end as usize, 0);
                }
                let src = (r.start - offset) as usize..(r.end - offset) as usize;
                bytes[r.start as usize..r.end as usize].copy_from_slice(&data[src]);
            }
            RecordedOp::Zero { .. } => {
                let Some(r) = self.piece_range(piece) else {
                    return;
                };
                // Like a punched hole: never past the end of the file as it is now (an
                // earlier length change may not have reached the disk).
                let end = r.end.min(bytes.len() as u64);
                if r.start < end {
                    bytes[r.start as usize..end as usize].fill(0);
                }
            }
            RecordedOp::SetLen(len) => bytes.resize(*len as usize, 0),
            RecordedOp::Flush => {}
        }
    }

    /// Applies the whole operation to `bytes`.
    fn apply(&self, bytes: &mut Vec<u8>) {
        for piece in 0..self.pieces() {
            self.apply_piece(bytes, piece);
        }
    }
}

/// The bytes and the log, changed together under one lock so that the log order is the
/// order in which the changes happened.
#[derive(Debug)]
struct State {
    bytes: Vec<u8>,
    ops: Vec<RecordedOp>,
}

/// In-memory storage that records every mutating operation in order, for crash testing.
///
/// It behaves like [`MemoryStorage`](qed::MemoryStorage); [`RecordingStorage::log`]
/// takes the initial bytes and the operations so far, from which [`CrashLog`] rebuilds
/// every state a crash could leave.
///
/// ```
/// use qed::Storage;
/// use qed_testkit::RecordingStorage;
///
/// let storage = RecordingStorage::new(vec![0; 1024]);
/// storage.write_at(&[1; 1024], 0)?;
/// storage.flush()?;
/// storage.write_at(&[2; 1024], 0)?;
/// let log = storage.log();
/// // A crash after every operation: the first write is durable, the second in flight
/// // and torn: only its first sector reached the disk.
/// let bytes = log.crash_state(log.len(), |_op, piece| piece == 0);
/// assert_eq!(&bytes[..512], &[2; 512][..]);
/// assert_eq!(&bytes[512..], &[1; 512][..]);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct RecordingStorage {
    initial: Vec<u8>,
    state: Mutex<State>,
}

impl RecordingStorage {
    /// Storage holding `initial`, which every crash state starts from (it is taken as
    /// durable).
    pub fn new(initial: Vec<u8>) -> Self {
        Self {
            state: Mutex::new(State {
                bytes: initial.clone(),
                ops: Vec::new(),
            }),
            initial,
        }
    }

    /// How many operations have been recorded: the log position a crash "now" would be at.
    pub fn position(&self) -> usize {
        self.lock().ops.len()
    }

    /// A copy of the current contents (as if nothing were lost).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// The initial bytes and every operation recorded so far.
    pub fn log(&self) -> CrashLog {
        CrashLog {
            initial: self.initial.clone(),
            ops: self.lock().ops.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn check_limit(end: Option<u64>) -> io::Result<u64> {
    match end {
        Some(e) if e <= LIMIT => Ok(e),
        _ => Err(io::Error::new(
            io::ErrorKind::StorageFull,
            "recording storage limit reached",
        )),
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.lock();
        let len = st.bytes.len() as u64;
        let avail = if offset >= len {
            0
        } else {
            (len - offset).min(buf.len() as u64) as usize
        };
        if avail > 0 {
            let o = offset as usize;
            buf[..avail].copy_from_slice(&st.bytes[o..o + avail]);
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_limit(offset.checked_add(buf.len() as u64))?;
        let op = RecordedOp::Write {
            offset,
            data: buf.to_vec(),
        };
        let mut st = self.lock();
        op.apply(&mut st.bytes);
        st.ops.push(op);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.lock().ops.push(RecordedOp::Flush);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().bytes.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        check_limit(Some(len))?;
        let op = RecordedOp::SetLen(len);
        let mut st = self.lock();
        op.apply(&mut st.bytes);
        st.ops.push(op);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        let size = st.bytes.len() as u64;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            // Nothing inside the file: no effect, nothing a crash could lose.
            return Ok(());
        }
        let op = RecordedOp::Zero {
            offset,
            len: end - offset,
        };
        op.apply(&mut st.bytes);
        st.ops.push(op);
        Ok(())
    }
}

/// The initial bytes of a [`RecordingStorage`] and the operations issued to it: the
/// material to rebuild crash states from.
///
/// A crash at `point` (0 to [`len`](Self::len)) happens after the first `point`
/// operations were issued. Everything before the last flush among them is durable; the
/// operations after that flush are in flight (see [`in_flight`](Self::in_flight)).
#[derive(Debug, Clone)]
pub struct CrashLog {
    initial: Vec<u8>,
    ops: Vec<RecordedOp>,
}

impl CrashLog {
    /// The bytes the storage started with.
    pub fn initial(&self) -> &[u8] {
        &self.initial
    }

    /// Every recorded operation, in order.
    pub fn ops(&self) -> &[RecordedOp] {
        &self.ops
    }

    /// Number of recorded operations; crash points run from 0 to this.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Index of the last flush issued before a crash at `point`, if any.
    pub fn last_flush(&self, point: usize) -> Option<usize> {
        self.ops[..point.min(self.ops.len())]
            .iter()
            .rposition(|op| *op == RecordedOp::Flush)
    }

    /// The operations that may or may not have reached the disk in a crash at `point`:
    /// those after the last flush before it. None of them is a flush.
    pub fn in_flight(&self, point: usize) -> Range<usize> {
        let point = point.min(self.ops.len());
        self.last_flush(point).map_or(0, |f| f + 1)..point
    }

    /// Applies operations `range` in full to `bytes`.
    pub fn replay(&self, bytes: &mut Vec<u8>, range: Range<usize>) {
        for op in &self.ops[range] {
            op.apply(bytes);
        }
    }

    /// The durable bytes at a crash at `point`: the initial bytes and every operation
    /// before the last flush.
    pub fn durable_state(&self, point: usize) -> Vec<u8> {
        let mut bytes = self.initial.clone();
        self.replay(&mut bytes, 0..self.in_flight(point).start);
        bytes
    }

    /// Applies to `bytes` (the [`durable_state`](Self::durable_state) at `point`) the
    /// in-flight pieces that `applied(op index, piece index)` chooses, in log order.
    /// `applied` is asked about every piece of every in-flight operation, in order.
    pub fn apply_in_flight(
        &self,
        bytes: &mut Vec<u8>,
        point: usize,
        mut applied: impl FnMut(usize, usize) -> bool,
    ) {
        for i in self.in_flight(point) {
            let op = &self.ops[i];
            for piece in 0..op.pieces() {
                if applied(i, piece) {
                    op.apply_piece(bytes, piece);
                }
            }
        }
    }

    /// The bytes a crash at `point` leaves when exactly the in-flight pieces chosen by
    /// `applied(op index, piece index)` reached the disk.
    pub fn crash_state(&self, point: usize, applied: impl FnMut(usize, usize) -> bool) -> Vec<u8> {
        let mut bytes = self.durable_state(point);
        self.apply_in_flight(&mut bytes, point, applied);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_replays_in_order() {
        let s = RecordingStorage::new(vec![9; 100]);
        s.set_len(1024).unwrap();
        s.write_at(&[1; 700], 300).unwrap();
        s.flush().unwrap();
        s.zero_range(0, 5000).unwrap();
        s.set_len(600).unwrap();
        let log = s.log();
        assert_eq!(log.len(), 5);
        assert_eq!(
            log.ops()[3],
            RecordedOp::Zero {
                offset: 0,
                len: 1024
            }
        );
        assert_eq!(log.in_flight(5), 3..5);
        assert_eq!(log.crash_state(5, |_, _| true), s.to_bytes());
        let durable = log.durable_state(5);
        assert_eq!(durable.len(), 1024);
        assert_eq!(&durable[..100], &[9; 100][..]);
        assert_eq!(&durable[300..1000], &[1; 700][..]);
    }

    #[test]
    fn pieces_are_aligned_sectors() {
        let w = RecordedOp::Write {
            offset: 100,
            data: vec![7; 1000],
        };
        // [100, 512), [512, 1024), [1024, 1100)
        assert_eq!(w.pieces(), 3);
        let mut bytes = vec![0; 2048];
        w.apply_piece(&mut bytes, 1);
        assert!(bytes[..512].iter().all(|&b| b == 0));
        assert!(bytes[512..1024].iter().all(|&b| b == 7));
        assert!(bytes[1024..].iter().all(|&b| b == 0));
        assert_eq!(RecordedOp::SetLen(5).pieces(), 1);
        assert_eq!(RecordedOp::Flush.pieces(), 0);
    }

    #[test]
    fn zeroing_never_grows_the_file() {
        let s = RecordingStorage::new(vec![5; 1024]);
        s.set_len(512).unwrap();
        s.set_len(1024).unwrap();
        s.zero_range(0, 1024).unwrap();
        let log = s.log();
        // Only the shrink and the zeroing reached the disk: the file stays short.
        let bytes = log.crash_state(3, |i, _| i != 1);
        assert_eq!(bytes, vec![0; 512]);
    }
}
