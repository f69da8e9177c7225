//! Storage that fails on purpose, for fault-injection tests.
//!
//! [`FaultyStorage`] counts the operations that change or persist the storage (writes,
//! `set_len`, `zero_range`, flushes), and reads too when asked, and makes the Nth one
//! fail. Tests sweep N over every operation a workload issues, so that each error path
//! of the caller runs once.

use qed::Storage;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes that a disk writes all or nothing of. A short write stops on such a boundary
/// of the storage (not of the buffer), as a real device does.
const SECTOR: u64 = 512;

/// How an injected fault behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Nothing happens; the operation fails with `EIO`.
    Eio,
    /// Nothing happens; the operation fails with `ENOSPC`.
    NoSpace,
    /// A write or `zero_range` takes effect on a prefix of its range, ending on a
    /// 512-byte boundary of the storage, then fails (`ErrorKind::WriteZero`, as
    /// `write_all_at` reports a write that stopped short). A flush, `set_len` or read
    /// has no partial form and fails with `EIO` having done nothing.
    ShortWrite,
    /// The operation takes full effect, then reports `EIO`: the caller cannot tell
    /// whether it happened.
    EioAfterEffect,
}

impl FaultKind {
    /// Every kind, for sweeps.
    pub const ALL: [FaultKind; 4] = [
        FaultKind::Eio,
        FaultKind::NoSpace,
        FaultKind::ShortWrite,
        FaultKind::EioAfterEffect,
    ];
}

/// Which operations fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// The counted operation (1-based) that fails first; `None` never fails.
    pub at: Option<u64>,
    /// How it fails.
    pub kind: FaultKind,
    /// After the first fault, every later counted operation fails too (a device that
    /// went away, a full disk that stays full); otherwise only the one.
    pub sticky: bool,
    /// Count reads, and fail them too.
    pub count_reads: bool,
}

impl FaultPlan {
    /// Counts operations and never fails.
    pub fn none() -> Self {
        Self {
            at: None,
            kind: FaultKind::Eio,
            sticky: false,
            count_reads: false,
        }
    }

    /// Fails the `n`th counted operation (1-based) with `kind`, once.
    pub fn at(n: u64, kind: FaultKind) -> Self {
        Self {
            at: Some(n),
            kind,
            ..Self::none()
        }
    }
}

/// The kind of an operation, for the log of injected faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `set_len`.
    SetLen,
    /// `zero_range`.
    ZeroRange,
}

/// A storage wrapper that fails the operations a [`FaultPlan`] names.
#[derive(Debug)]
pub struct FaultyStorage<S> {
    inner: S,
    plan: Mutex<FaultPlan>,
    ops: AtomicU64,
    injected: AtomicU64,
    tripped: AtomicBool,
    first_fault: Mutex<Option<(u64, OpKind)>>,
}

impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner`, failing as `plan` says. Counting starts at 0.
    pub fn new(inner: S, plan: FaultPlan) -> Self {
        Self {
            inner,
            plan: Mutex::new(plan),
            ops: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            tripped: AtomicBool::new(false),
            first_fault: Mutex::new(None),
        }
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Counted operations so far (failed ones included).
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// The number and kind of the operation that failed first, if any did.
    pub fn first_fault(&self) -> Option<(u64, OpKind)> {
        *self.first_fault.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the plan; the operation count is kept, so `at` stays absolute.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
        self.tripped.store(false, Ordering::SeqCst);
    }

    /// Stops failing: every later operation goes through.
    pub fn heal(&self) {
        self.set_plan(FaultPlan {
            at: None,
            ..self.plan()
        });
    }

    fn plan(&self) -> FaultPlan {
        *self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one operation; returns the fault to inject into it, if any.
    fn next(&self, op: OpKind) -> Option<FaultKind> {
        let plan = self.plan();
        if op == OpKind::Read && !plan.count_reads {
            return None;
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        let at = plan.at?;
        let fail = n == at || (plan.sticky && n > at && self.tripped.load(Ordering::SeqCst));
        if !fail {
            return None;
        }
        self.tripped.store(true, Ordering::SeqCst);
        self.injected.fetch_add(1, Ordering::SeqCst);
        self.first_fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert((n, op));
        Some(plan.kind)
    }
}

fn os_error(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn no_partial(kind: FaultKind) -> io::Error {
    os_error(if kind == FaultKind::NoSpace {
        libc::ENOSPC
    } else {
        libc::EIO
    })
}

/// How many bytes of a `len`-byte range at `offset` a short write covers: about half,
/// cut back to a sector boundary of the storage (possibly nothing).
fn short_len(offset: u64, len: u64) -> u64 {
    let cut = (offset + len / 2) / SECTOR * SECTOR;
    cut.saturating_sub(offset).min(len)
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.next(OpKind::Read) {
            None => self.inner.read_at(buf, offset),
            Some(FaultKind::EioAfterEffect) => {
                self.inner.read_at(buf, offset)?;
                Err(os_error(libc::EIO))
            }
            Some(kind) => Err(no_partial(kind)),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.next(OpKind::Write) {
            None => self.inner.write_at(buf, offset),
            Some(FaultKind::ShortWrite) => {
                let n = short_len(offset, buf.len() as u64) as usize;
                if n > 0 {
                    self.inner.write_at(&buf[..n], offset)?;
                }
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write whole buffer",
                ))
            }
            Some(FaultKind::EioAfterEffect) => {
                self.inner.write_at(buf, offset)?;
                Err(os_error(libc::EIO))
            }
            Some(kind) => Err(no_partial(kind)),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self.next(OpKind::Flush) {
            None => self.inner.flush(),
            Some(FaultKind::EioAfterEffect) => {
                self.inner.flush()?;
                Err(os_error(libc::EIO))
            }
            Some(kind) => Err(no_partial(kind)),
        }
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match self.next(OpKind::SetLen) {
            None => self.inner.set_len(len),
            Some(FaultKind::EioAfterEffect) => {
                self.inner.set_len(len)?;
                Err(os_error(libc::EIO))
            }
            Some(kind) => Err(no_partial(kind)),
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.next(OpKind::ZeroRange) {
            None => self.inner.zero_range(offset, len),
            Some(FaultKind::ShortWrite) => {
                let n = short_len(offset, len);
                if n > 0 {
                    self.inner.zero_range(offset, n)?;
                }
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to zero the whole range",
                ))
            }
            Some(FaultKind::EioAfterEffect) => {
                self.inner.zero_range(offset, len)?;
                Err(os_error(libc::EIO))
            }
            Some(kind) => Err(no_partial(kind)),
        }
    }

    fn zero_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.inner.zero_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qed::MemoryStorage;

    #[test]
    fn the_nth_operation_fails_once() {
        let s = FaultyStorage::new(MemoryStorage::new(), FaultPlan::at(2, FaultKind::NoSpace));
        s.write_at(b"abc", 0).unwrap();
        let e = s.write_at(b"def", 3).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        s.flush().unwrap();
        let mut buf = [0u8; 6];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc\0\0\0");
        assert_eq!((s.ops(), s.injected()), (3, 1));
        assert_eq!(s.first_fault(), Some((2, OpKind::Write)));
    }

    #[test]
    fn a_short_write_stops_on_a_sector_boundary() {
        let s = FaultyStorage::new(
            MemoryStorage::new(),
            FaultPlan::at(1, FaultKind::ShortWrite),
        );
        let e = s.write_at(&[7u8; 2000], 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
        // Half of 2000 bytes from 100 ends at 1100; the sector boundary before it is 1024.
        assert_eq!(s.len().unwrap(), 1024);
        let mut buf = vec![0u8; 1024];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0));
        assert!(buf[100..].iter().all(|&b| b == 7));
    }

    #[test]
    fn sticky_faults_fail_everything_after_the_first() {
        let plan = FaultPlan {
            sticky: true,
            ..FaultPlan::at(2, FaultKind::Eio)
        };
        let s = FaultyStorage::new(MemoryStorage::new(), plan);
        s.set_len(10).unwrap();
        assert!(s.flush().is_err());
        assert!(s.write_at(b"x", 0).is_err());
        let mut b = [0u8; 1];
        s.read_at(&mut b, 0).unwrap();
        s.heal();
        s.write_at(b"x", 0).unwrap();
        assert_eq!(s.injected(), 2);
    }

    #[test]
    fn reads_are_counted_only_when_asked() {
        let plan = FaultPlan {
            count_reads: true,
            ..FaultPlan::at(1, FaultKind::EioAfterEffect)
        };
        let s = FaultyStorage::new(MemoryStorage::from_bytes(vec![1, 2]), plan);
        let mut b = [0u8; 2];
        assert!(s.read_at(&mut b, 0).is_err());
        assert_eq!(b, [1, 2]);
        let s = FaultyStorage::new(MemoryStorage::new(), FaultPlan::at(1, FaultKind::Eio));
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(s.ops(), 0);
    }
}
