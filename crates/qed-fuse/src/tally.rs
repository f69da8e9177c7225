//! What the export keeps count of across requests: whether data was written since the
//! last flush a close made, and the requests the device failed.

use crate::ops::{self, Failure};
use fuser::Errno;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Counts shared by every thread that answers requests.
#[derive(Default)]
pub(crate) struct Tally {
    /// Data was written since the last flush a close made.
    dirty: AtomicBool,
    failures: AtomicU64,
    first_failure: OnceLock<String>,
}

impl Tally {
    /// Notes that data was written (or may have been: a failed write may have changed
    /// part of its range), for the next close to flush.
    pub(crate) fn wrote(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Whether anything was written since the last call; a flush follows, and on failure
    /// gives it back with [`Tally::wrote`].
    pub(crate) fn take_written(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// The errno for a failed request, remembering device failures for the report.
    pub(crate) fn errno(&self, f: Failure) -> Errno {
        match f {
            Failure::Refused(e) => e,
            Failure::Device(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let errno = ops::errno(&e);
                let _ = self.first_failure.set(e.to_string());
                errno
            }
        }
    }

    /// How many requests the device failed, and the first such failure.
    pub(crate) fn failures(&self) -> (u64, Option<String>) {
        (
            self.failures.load(Ordering::Relaxed),
            self.first_failure.get().cloned(),
        )
    }
}
