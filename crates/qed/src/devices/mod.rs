//! Devices beside the QED engine: raw files, qcow2 images (read through imago, and new
//! ones written sequentially).

#[cfg(feature = "qcow2")]
mod qcow2;
mod qcow2_header;
mod qcow2_layout;
mod qcow2_writer;
mod raw;

#[cfg(feature = "qcow2")]
pub use qcow2::Qcow2Device;
pub use qcow2_header::Qcow2Facts;
pub use qcow2_layout::{Qcow2CreateOptions, QCOW2_MAX_CLUSTER, QCOW2_MIN_CLUSTER};
pub use qcow2_writer::Qcow2Writer;
pub use raw::RawDevice;
