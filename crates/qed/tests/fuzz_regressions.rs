//! Images the fuzz targets (fuzz/) found breaking an invariant, rebuilt by hand so that
//! each stays fixed without the fuzzer.

mod support;

use qed::RepairMode;
use qed::{CreateOptions, Image, OpenOptions};
use qed::{MemoryStorage, Storage};
use std::path::Path;
use std::sync::Arc;
use support::write_u64;

const CS: u64 = 4096;

/// Two L2 tables overlapping by a cluster. The repair gives the second its own copy at
/// the end of the file, then moves that copy down into the free clusters just under it.
/// The scan for more units to move went on into the copy's new place, took its upper
/// cluster for a data cluster, moved it into a lower hole and truncated the file under
/// the table: the repair reported success and left an L1 entry past the end of the file.
#[test]
fn a_table_moved_by_a_repair_is_not_moved_again_in_pieces() {
    let storage = Arc::new(MemoryStorage::new());
    let mut opts = CreateOptions::new(8 << 20);
    opts.cluster_size = CS as u32;
    opts.table_size = 2;
    Image::create_on(&*storage, &opts).unwrap();
    // Header at cluster 0, L1 at clusters 1-2. Table A at clusters 4-5, table B at 3-4;
    // clusters 6 and 7 unused.
    let l1 = CS;
    write_u64(&storage, l1, 4 * CS);
    write_u64(&storage, l1 + 8, 3 * CS);
    storage.set_len(8 * CS).unwrap();

    let opts = OpenOptions {
        image: qed::ImageOptions {
            repair_on_open: false,
            ..qed::ImageOptions::default()
        },
        ..OpenOptions::default()
    };
    let mut image =
        Image::open_storage(Box::new(storage.clone()), Path::new("x.qed"), &opts).unwrap();
    let report = image.repair(RepairMode::All).unwrap();
    assert_eq!(
        (report.corruptions_remaining(), report.check_errors),
        (0, 0),
        "{report:?}"
    );
    let after = image.check().unwrap();
    assert_eq!(after.corruptions, 0, "after {report:?}: {after:?}");
    drop(image);
    let again = Image::open_storage(
        Box::new(storage.clone()),
        Path::new("x.qed"),
        &OpenOptions::read_only(),
    )
    .unwrap()
    .check()
    .unwrap();
    assert_eq!((again.corruptions, again.check_errors), (0, 0), "{again:?}");
}
