//! Whole-image operations over devices. None of them prints: long ones report progress
//! through a callback.

mod bench;
mod commit;
mod compare;
mod convert;
mod in_place;
mod measure;
mod rebase;
mod reorganize;
mod sequential;
mod step;
mod stream;

pub use bench::{bench, BenchParams, Engine};
pub use commit::{commit, commit_into};
pub use compare::{compare, Difference};
pub use convert::{convert, ConvertOptions};
pub use in_place::{convert_in_place, InPlaceOptions, InPlacePlan};
pub use measure::{measure, Measure};
pub use rebase::rebase;
pub use reorganize::{compact, defrag, Reorganization, ReorganizeEnd, ReorganizeOptions};
pub use sequential::{SequentialImage, SequentialOptions};
pub use step::{no_progress, Progress};
pub use stream::{stream, stream_base, StreamEnd, StreamOptions};
