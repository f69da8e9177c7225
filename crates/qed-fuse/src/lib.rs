#![warn(missing_docs)]
//! A FUSE export of the `qed` library's devices: while mounted, a regular file (or one
//! file in a directory) reads and writes as the disk, in the manner of
//! qemu-storage-daemon's FUSE export.
//!
//! The mounted file behaves as a disk: its size is the device's and never changes, a
//! write at its end finds no space, `fsync` flushes the image, `fallocate` with
//! PUNCH_HOLE or ZERO_RANGE makes a range read as zeros, and `lseek` with SEEK_DATA and
//! SEEK_HOLE answers from the backing chain's block status, so copies stay sparse.
//!
//! Requests are read by a few threads and carried out by a fixed pool of workers; at
//! most [`Config::max_requests`] requests and [`Config::max_bytes`] bytes of their data
//! are in flight, whatever the client does. No async runtime and no libfuse: the mount
//! is made with mount(2) as root and through `fusermount3` otherwise.
//!
//! ```no_run
//! use qed_fuse::{check_fuse_device, check_mountpoint, Config, DiscardMode, Export, Mount};
//! use std::sync::Arc;
//!
//! // Check the place first, so that nothing is opened for a mount that cannot happen.
//! let place = check_mountpoint("disk.raw".as_ref())?;
//! check_fuse_device()?;
//! let image = qed::Image::open("disk.qed", &qed::OpenOptions::default())?;
//! let device: Arc<dyn qed::BlockDevice> = Arc::new(image);
//! let export = Export {
//!     device: device.clone(),
//!     read_only: false,
//!     discard: DiscardMode::Ignore,
//!     direct_io: false,
//!     allow_other: false,
//!     file_name: "disk.qed".into(),
//!     allocation_from: Some("disk.qed".into()),
//! };
//! let mount = Mount::new(export, place, Config::default())?;
//! let report = mount.run()?; // until `fusermount3 -u disk.raw`
//! device.flush()?;
//! # let _ = report;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod admission;
mod error;
mod export;
mod fs;
mod mount;
mod mountpoint;
mod ops;
mod replies;
mod ring;
mod tally;

pub use error::{Error, Result};
pub use export::{Config, DiscardMode, Export, MAX_REQUEST};
pub use mount::{Mount, Report, Stopper};
pub use mountpoint::{check_fuse_device, check_mountpoint, Mountpoint};
