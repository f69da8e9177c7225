//! Read, write and create QED (QEMU Enhanced Disk) images, byte-compatible with QEMU.
//!
//! The crate is layered from the bytes up:
//! - [`format`]: pure on-disk types (header, geometry, table entries), no I/O;
//! - [`storage`]: the bytes under an image (a file, memory, test wrappers);
//! - [`engine`]: one QED image over a storage ([`Image`]);
//! - [`device`]: anything that behaves like a disk ([`BlockDevice`]), and backing chains;
//! - [`ops`]: whole-image operations such as `map` and `check`.
//!
//! ```no_run
//! use qed::{BlockDevice, CreateOptions, Image, OpenOptions};
//!
//! Image::create("disk.qed", &CreateOptions::new(1 << 30))?;
//! let image = Image::open("disk.qed", &OpenOptions::default())?;
//! image.write_at(b"hello", 4096)?;
//! let mut buf = [0u8; 5];
//! image.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! image.close()?;
//! # Ok::<(), qed::Error>(())
//! ```

pub mod device;
pub mod engine;
pub mod error;
pub mod format;
pub mod ops;
#[cfg(target_os = "linux")]
pub mod ring;
pub mod storage;

pub use device::{open_device, BlockDevice, BlockStatus, Format, OpenOptions};
pub use engine::{CheckReport, CreateOptions, Image, Mapping};
pub use error::{Error, Result};
