//! Direct I/O on the extents the devices hand out ([`crate::BlockDevice::begin_read`],
//! [`crate::BlockDevice::begin_write`]) through io_uring, for the callers that carry out
//! reads and writes themselves: the benchmark's request loop, the NBD server's
//! connections and the FUSE export's ring thread.
//!
//! [`DirectQueue`] is the one loop they share: a request begins on the device, goes to
//! the kernel, is reaped and finished (a write's allocation settled) in one place, and
//! the caller only frames its requests and answers. What the queue refuses runs on the
//! device's own path, on a [`WorkerPool`] or the caller's own threads.

mod pool;
mod queue;
mod uring;

pub use pool::WorkerPool;
pub use queue::{DirectDone, DirectEvent, DirectQueue};
pub use uring::Waker;
