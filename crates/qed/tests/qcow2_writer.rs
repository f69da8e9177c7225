//! New qcow2 images written out of order, flushed, written again and dropped: QEMU must
//! find them clean (no corruption, no leak) and reading what a model of the writes says.

use qed::{create_qcow2, open_device, BlockDevice, Format, OpenOptions, Qcow2CreateOptions};
use std::path::Path;
use std::process::Command;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

fn qemu_img(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img (qemu-utils) is needed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// What the image is written with, applied to `model` too.
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Flush,
}

fn apply(dev: &dyn BlockDevice, model: &mut [u8], ops: &[Op]) {
    for op in ops {
        match *op {
            Op::Write(off, len, b) => {
                let data = vec![b; len as usize];
                dev.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero(off, len) => {
                dev.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => dev.flush().unwrap(),
        }
    }
}

fn ops() -> Vec<Op> {
    vec![
        Op::Write(3 * M, 64 * K, 0x11),
        Op::Write(100 * K, 3 * K, 0x12),
        Op::Write(0, 512, 0x13),
        Op::Flush,
        // After a flush: in place, into new clusters, zeros.
        Op::Write(100 * K + 512, 1024, 0x14),
        Op::Write(5 * M - 4 * K, 8 * K, 0x15),
        Op::Zero(3 * M, 64 * K),
        Op::Zero(2 * M, M),
        Op::Write(2 * M + 10, 10, 0x16),
        Op::Flush,
        Op::Write(7 * M, 300 * K, 0x17),
    ]
}

fn check_against(dir: &Path, image: &str, model: &[u8]) {
    let (code, text) = qemu_img(dir, &["check", image]);
    assert_eq!(code, 0, "{text}");
    std::fs::write(dir.join("model.raw"), model).unwrap();
    let (code, text) = qemu_img(dir, &["compare", "-f", "raw", "model.raw", image]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn written_out_of_order_and_again_after_flushes() {
    for cs in [512, 4 * K, 64 * K, 2 * M] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.qcow2");
        let size = 8 * M;
        let opts = Qcow2CreateOptions {
            cluster_size: cs,
            ..Qcow2CreateOptions::new(size)
        };
        let mut model = vec![0u8; size as usize];
        {
            let dev = create_qcow2(&path, &opts, None, &OpenOptions::default()).unwrap();
            apply(&dev, &mut model, &ops());
            // Dropped without a last flush: the drop completes the image.
        }
        check_against(dir.path(), "new.qcow2", &model);
    }
}

#[test]
fn written_over_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * M;
    let base: Vec<u8> = (0..size).map(|p| (p >> 9) as u8 | 1).collect();
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    for cs in [4 * K, 64 * K] {
        let path = dir.path().join(format!("top-{cs}.qcow2"));
        let backing = open_device(
            &dir.path().join("base.raw"),
            Some(Format::Raw),
            &OpenOptions::read_only(),
        )
        .unwrap();
        let opts = Qcow2CreateOptions {
            cluster_size: cs,
            backing_file: Some("base.raw".into()),
            backing_format: Some(Format::Raw),
            ..Qcow2CreateOptions::new(size)
        };
        let mut model = base.clone();
        let dev = create_qcow2(&path, &opts, Some(backing), &OpenOptions::default()).unwrap();
        apply(&dev, &mut model, &ops());
        dev.flush().unwrap();
        let mut back = vec![0u8; size as usize];
        dev.read_at(&mut back, 0).unwrap();
        assert!(back == model, "reads back what was written");
        drop(dev);
        check_against(dir.path(), &format!("top-{cs}.qcow2"), &model);
    }
}

#[test]
fn refusals_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.qcow2");
    for cs in [0, 256, 3 * K, 4 * M] {
        let opts = Qcow2CreateOptions {
            cluster_size: cs,
            ..Qcow2CreateOptions::new(M)
        };
        let e = create_qcow2(&path, &opts, None, &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("bad.qcow2"), "{e}");
        assert!(!path.exists());
    }
    // A name without the device it names.
    let opts = Qcow2CreateOptions {
        backing_file: Some("base.raw".into()),
        ..Qcow2CreateOptions::new(M)
    };
    assert!(create_qcow2(&path, &opts, None, &OpenOptions::default()).is_err());
    assert!(!path.exists());
    // Empty and odd-sized images.
    for size in [0, 1000] {
        let name = format!("s{size}.qcow2");
        let dev = create_qcow2(
            &dir.path().join(&name),
            &Qcow2CreateOptions::new(size),
            None,
            &OpenOptions::default(),
        )
        .unwrap();
        assert_eq!(dev.size(), size.next_multiple_of(512));
        drop(dev);
        let (code, text) = qemu_img(dir.path(), &["check", &name]);
        assert_eq!(code, 0, "{text}");
    }
}
