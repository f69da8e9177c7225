//! Arbitrary bytes through the consistency check and both repairs. Nothing may panic,
//! hang or allocate without bound; a repair that reports success must leave a clean
//! image, and repairing that image again must change nothing.

#![no_main]

#[path = "common.rs"]
mod common;

use common::{assert_repaired, open, Capped};
use libfuzzer_sys::fuzz_target;
use qed::RepairMode;

fuzz_target!(|data: &[u8]| {
    let storage = Capped::new(data);
    if let Ok(image) = open(&storage, true, false) {
        let _ = image.check();
    }
    for mode in [RepairMode::Leaks, RepairMode::All] {
        let storage = Capped::new(data);
        let Ok(mut image) = open(&storage, false, false) else {
            continue;
        };
        let Ok(report) = image.repair(mode) else {
            continue;
        };
        if mode == RepairMode::Leaks {
            continue;
        }
        assert_repaired(&image, &report);
        if report.check_errors == 0 && report.corruptions_remaining() == 0 {
            let again = image
                .repair(RepairMode::All)
                .expect("repairing a clean image");
            // Leaks it could not fill may be counted again; corruptions may not.
            assert_eq!(
                (again.corruptions, again.corruptions_fixed),
                (0, 0),
                "a second repair found work after {report:?}: {again:?}"
            );
        }
    }
});
