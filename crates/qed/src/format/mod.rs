//! Pure on-disk types: header, feature bits, geometry and table entries. No I/O; every
//! rule of the format lives here once.

pub mod geometry;
pub mod header;
pub mod pin;
pub mod qcow2;
pub mod table;

pub use geometry::Geometry;
pub use header::{features, Header, MAGIC};
pub use table::L2Entry;
