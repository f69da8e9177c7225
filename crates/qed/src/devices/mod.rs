//! Devices beside the QED engine: raw files, and qcow2 images read-only.

#[cfg(feature = "qcow2")]
mod qcow2;
mod qcow2_header;
mod raw;

#[cfg(feature = "qcow2")]
pub use qcow2::Qcow2Device;
pub use qcow2_header::Qcow2Facts;
pub use raw::RawDevice;
