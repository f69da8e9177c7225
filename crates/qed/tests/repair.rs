//! Repairs that must leave nothing behind: every owner keeps its data, and nothing leaks.

mod support;

use qed::RepairMode;
use qed::{BlockDevice, CreateOptions, Image, OpenOptions};
use qed::{MemoryStorage, Storage};
use std::path::Path;
use std::sync::Arc;
use support::read_u64;

#[test]
fn data_entry_pointing_into_a_later_table_is_copied_not_the_table() {
    let storage = Arc::new(MemoryStorage::new());
    let opts = CreateOptions::new(4 << 30);
    Image::create_on(&*storage, &opts).unwrap();
    let image = Image::open_storage(
        Box::new(storage.clone()),
        Path::new("x.qed"),
        &OpenOptions::default(),
    )
    .unwrap();
    image.write_at(&[0x11; 65536], 0).unwrap();
    image.write_at(&[0x22; 65536], 2 << 30).unwrap();
    image.close().unwrap();

    let cs = 65536;
    let t1 = read_u64(&*storage, cs);
    let t2 = read_u64(&*storage, cs + 8);
    assert!(t1 != 0 && t2 > t1);
    // The second entry of the first table now claims the second table's first cluster.
    storage.write_at(&t2.to_le_bytes(), t1 + 8).unwrap();
    let mut table_bytes = vec![0u8; 65536];
    storage.read_at(&mut table_bytes, t2).unwrap();

    let mut image = Image::open_storage(
        Box::new(storage.clone()),
        Path::new("x.qed"),
        &OpenOptions::default(),
    )
    .unwrap();
    let before = image.check().unwrap();
    assert_eq!(before.corruptions, 1, "{before:?}");
    let fixed = image.repair(RepairMode::All).unwrap();
    assert_eq!(fixed.corruptions_fixed, 1, "{fixed:?}");
    let after = image.check().unwrap();
    assert_eq!(
        (after.corruptions, after.leaks, after.check_errors),
        (0, 0, 0),
        "{after:?}"
    );

    // Every owner reads what it read before the repair.
    let mut buf = vec![0u8; 65536];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    image.read_at(&mut buf, cs).unwrap();
    assert_eq!(buf, table_bytes);
    image.read_at(&mut buf, 2 << 30).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
}
