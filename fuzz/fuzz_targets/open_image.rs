//! Arbitrary bytes as an image: open read-only and read-write, read up to a cap, write a
//! little, check, repair. Nothing may panic, hang or allocate without bound, and a
//! repair that reports success must leave a clean image.

#![no_main]

#[path = "common.rs"]
mod common;

use common::{assert_repaired, open, Capped, Rng, READ_CAP};
use libfuzzer_sys::fuzz_target;
use qed::RepairMode;
use qed::BlockDevice;

fuzz_target!(|data: &[u8]| {
    let mut rng = Rng::from(data);
    for read_only in [true, false] {
        let storage = Capped::new(data);
        let Ok(mut image) = open(&storage, read_only, true) else {
            continue;
        };
        if let Some(report) = image.open_repair().cloned() {
            assert_repaired(&image, &report);
        }
        let span = image.size().min(READ_CAP);
        let mut buf = vec![0u8; 256 << 10];
        let mut pos = 0;
        while pos < span {
            let n = (span - pos).min(buf.len() as u64);
            let _ = image.read_at(&mut buf[..n as usize], pos);
            pos += n;
        }
        let mut pos = 0;
        while pos < span {
            match image.block_status(pos, span - pos) {
                Ok(st) => {
                    assert!(st.len > 0 && st.len <= span - pos, "{st:?} at {pos}");
                    pos += st.len;
                }
                Err(_) => pos += 4096,
            }
        }
        let _ = image.check();
        if read_only || span == 0 {
            continue;
        }
        let cs = image.geometry().cluster_size();
        for _ in 0..4 {
            let len = 1 + rng.below((2 * cs).min(64 << 10)).min(span - 1);
            let at = rng.below(span - len + 1);
            let _ = match rng.below(5) {
                0 | 1 => image.write_at(&vec![0xa5; len as usize], at),
                2 => image.write_zeroes(at, len),
                3 => image.discard(at, len),
                _ => image.flush(),
            };
            let n = len.min(buf.len() as u64) as usize;
            let _ = image.read_at(&mut buf[..n], at);
        }
        if let Ok(report) = image.repair(RepairMode::All) {
            assert_repaired(&image, &report);
        }
        let _ = image.close();
        if let Ok(again) = open(&storage, true, false) {
            let _ = again.check();
        }
    }
});
