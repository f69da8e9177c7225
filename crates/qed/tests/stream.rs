//! Streaming into an image while it stays open: successive jobs on one open image.

use qed::{BlockDevice, CreateOptions, Image, OpenOptions, StreamEnd, StreamOptions};
use std::path::Path;

const M: u64 = 1 << 20;

fn create(path: &Path, backing: Option<&str>, fill: Option<(u8, u64)>) {
    let mut opts = CreateOptions::new(4 * M);
    opts.backing_file = backing.map(str::to_string);
    Image::create(path, &opts).unwrap();
    if let Some((byte, at)) = fill {
        let image = Image::open(path, &OpenOptions::default()).unwrap();
        image.write_at(&vec![byte; M as usize], at).unwrap();
        image.close().unwrap();
    }
}

fn read(image: &Image, at: u64) -> Vec<u8> {
    let mut buf = vec![0u8; M as usize];
    image.read_at(&mut buf, at).unwrap();
    buf
}

#[test]
fn a_second_stream_names_the_layer_the_first_one_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(&dir.join("base.qed"), None, Some((0xbb, 0)));
    create(&dir.join("mid.qed"), Some("base.qed"), Some((0xcc, M)));
    create(&dir.join("top.qed"), Some("mid.qed"), Some((0xdd, 2 * M)));

    let top = dir.join("top.qed");
    let image = Image::open(&top, &OpenOptions::default()).unwrap();
    let base = qed::stream_base(&image, dir.join("base.qed").to_str().unwrap()).unwrap();
    assert_eq!(base, 2);
    let run = |base| {
        let opts = StreamOptions {
            base: Some(base),
            ..Default::default()
        };
        qed::stream(&image, &opts, &mut qed::no_progress).unwrap()
    };
    assert!(matches!(run(base), StreamEnd::Done { .. }));
    // Now base.qed is the backing file: layer 1, whose name must be base.qed's, not
    // the name mid.qed had in the header the image was opened with.
    assert_eq!(
        qed::stream_base(&image, dir.join("base.qed").to_str().unwrap()).unwrap(),
        1
    );
    assert!(matches!(run(1), StreamEnd::Done { .. }));
    assert_eq!(read(&image, 0), vec![0xbb; M as usize]);
    assert_eq!(read(&image, M), vec![0xcc; M as usize]);
    image.close().unwrap();

    let image = Image::open(&top, &OpenOptions::default()).unwrap();
    let named = image.backing_file().expect("a backing file").name.clone();
    assert_eq!(
        Path::new(&named).canonicalize().unwrap(),
        dir.join("base.qed").canonicalize().unwrap(),
        "the header names {named}"
    );
    assert_eq!(read(&image, 0), vec![0xbb; M as usize]);
    assert_eq!(read(&image, M), vec![0xcc; M as usize]);
    assert_eq!(read(&image, 2 * M), vec![0xdd; M as usize]);
    assert_eq!(read(&image, 3 * M), vec![0; M as usize]);
}

#[test]
fn a_base_is_found_relative_to_the_image_as_well() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(&dir.join("base.qed"), None, None);
    create(&dir.join("top.qed"), Some("base.qed"), None);
    let image = Image::open(dir.join("top.qed"), &OpenOptions::default()).unwrap();
    // The tests' directory is not the image's: only the image's directory has it.
    assert!(!Path::new("base.qed").exists());
    assert_eq!(qed::stream_base(&image, "base.qed").unwrap(), 1);
    let err = qed::stream_base(&image, "other.qed").unwrap_err();
    assert!(
        err.to_string().contains("not in the backing chain"),
        "{err}"
    );
}
