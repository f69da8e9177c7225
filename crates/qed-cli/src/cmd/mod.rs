//! One module per subcommand.

pub mod bench;
pub mod cache;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
mod convert_in_place;
mod convert_plan;
pub mod create;
mod daemon;
pub mod info;
pub mod io;
pub mod job;
pub mod map;
pub mod measure;
pub mod mount;
mod publish;
pub mod rebase;
pub mod reorganize;
pub mod resize;
pub mod serve;
pub mod stream;
