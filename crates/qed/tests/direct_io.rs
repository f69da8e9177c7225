//! O_DIRECT file storage under concurrency: read-modify-writes of shared blocks lose no
//! bytes, and a hold on blocks (`Storage::try_hold_blocks`, taken by callers that write
//! whole blocks through io_uring) keeps read-modify-writes off them until it is dropped.

use qed::{FileStorage, Storage};
use std::sync::mpsc;
use std::time::Duration;

fn direct_file(name: &str, len: u64) -> (tempfile::TempDir, FileStorage) {
    // On the build's own filesystem: a tmpfs /tmp would refuse O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join(name);
    FileStorage::create(&path).unwrap().set_len(len).unwrap();
    let storage = FileStorage::open_direct(&path, false).unwrap();
    (dir, storage)
}

#[test]
fn unaligned_writes_to_shared_blocks_lose_nothing() {
    let (_dir, storage) = direct_file("rmw.img", 64 << 10);
    // Eight writers, each owning every eighth 100-byte piece of the first 16 KiB, so each
    // block is read, modified and written back by all of them at once.
    std::thread::scope(|s| {
        for w in 0..8u8 {
            let storage = &storage;
            s.spawn(move || {
                for round in 0..50u8 {
                    for piece in (w as u64..160).step_by(8) {
                        let byte = w.wrapping_mul(31).wrapping_add(round) | 1;
                        storage.write_at(&[byte; 100], piece * 100).unwrap();
                    }
                }
            });
        }
    });
    let mut all = vec![0u8; 16000];
    storage.read_at(&mut all, 0).unwrap();
    for piece in 0..160u64 {
        let w = (piece % 8) as u8;
        let want = w.wrapping_mul(31).wrapping_add(49) | 1;
        let got = &all[(piece * 100) as usize..(piece * 100 + 100) as usize];
        assert!(
            got.iter().all(|&b| b == want),
            "piece {piece} of writer {w} reads {:?}, expected {want}",
            &got[..4]
        );
    }
}

#[test]
fn a_hold_keeps_read_modify_writes_off_its_blocks() {
    let (_dir, storage) = direct_file("hold.img", 64 << 10);
    let hold = storage
        .try_hold_blocks(4096, 8192)
        .expect("nothing else holds them");
    // Whole-block writes (aligned in memory too) share the hold, and so does another
    // hold on the same blocks.
    assert!(storage.try_hold_blocks(4096, 4096).is_some());
    let mut block = vec![7u8; 8192];
    let at = block.as_ptr().align_offset(4096);
    storage.write_at(&block[at..at + 4096], 8192).unwrap();
    block.clear();
    std::thread::scope(|s| {
        let (done_tx, done_rx) = mpsc::channel();
        let storage = &storage;
        s.spawn(move || {
            storage.write_at(&[9u8; 100], 4096 + 50).unwrap();
            done_tx.send(()).unwrap();
        });
        assert!(
            done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a read-modify-write ran inside a held block"
        );
        drop(hold);
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the read-modify-write went on once the hold was dropped");
    });
    let mut b = vec![0u8; 200];
    storage.read_at(&mut b, 4096).unwrap();
    assert!(b[..50].iter().all(|&x| x == 0) && b[50..150].iter().all(|&x| x == 9));
}

#[test]
fn begin_write_never_waits_to_mark_the_image() {
    use qed::{BlockDevice, CreateOptions, Image, OpenOptions};
    const K: u64 = 1 << 10;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("mark.qed");
    Image::create(&path, &CreateOptions::new(64 << 20)).unwrap();
    let opts = OpenOptions {
        direct: true,
        ..OpenOptions::default()
    };
    let image = Image::open(&path, &opts).unwrap();
    // Data clusters until one sits in the file where its block shares the header
    // block's lock stripe (every 256 KiB of the file).
    let mut shared_stripe = None;
    for cluster in 0..16u64 {
        image.write_at(&[1u8; 4096], cluster * 64 * K).unwrap();
        let x = image.begin_read(cluster * 64 * K, 4096).unwrap().extent;
        if x.offset % (256 * K) == 0 {
            shared_stripe = Some(cluster * 64 * K);
            break;
        }
    }
    let guest = shared_stripe.expect("a data cluster 256 KiB-aligned in the file");
    // Clean again: the next allocation has to set NEED_CHECK, rewriting the header.
    image.flush().unwrap();
    // An io_uring caller's write in place, in flight, holds that stripe...
    let in_place = image.begin_write(guest, 4096).expect("a write in place");
    // ...and its next allocation must not wait for it (it could never be reaped).
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let pending = image.begin_write(32 << 20, 64 * K);
            tx.send(pending.is_some()).unwrap();
        });
        let answered = rx.recv_timeout(Duration::from_secs(10));
        drop(in_place);
        assert_eq!(
            answered,
            Ok(false),
            "begin_write waited, or allocated without NEED_CHECK set"
        );
    });
    // The blocking path marks the image; then io_uring callers allocate again.
    image.write_at(&[2u8; 4096], 40 << 20).unwrap();
    assert!(image.begin_write(48 << 20, 64 * K).is_some());
}

#[test]
fn begin_write_leaves_a_write_back_to_the_blocking_path() {
    use qed::{BlockDevice, CreateOptions, Image, OpenOptions};
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("dirty.qed");
    let mut create = CreateOptions::new(64 * M);
    create.cluster_size = 4096;
    create.table_size = 16;
    Image::create(&path, &create).unwrap();
    // The smallest cache: 16 pages, written back past 8 dirty ones.
    let opts = OpenOptions {
        image: qed::ImageOptions {
            l2_cache_bytes: 0,
            ..qed::ImageOptions::default()
        },
        direct: true,
        ..OpenOptions::default()
    };
    let image = Image::open(&path, &opts).unwrap();
    // One table (32 MiB of guest space), then a cluster in each of 8 pages of it (a page
    // of entries maps 2 MiB): 8 dirty pages, at the limit but not past it.
    image.write_at(&[1u8; 4096], 0).unwrap();
    for page in 0..8u64 {
        image.write_at(&[1u8; 4096], page * 2 * M + 4 * K).unwrap();
    }
    // Mapping one more cluster would pass the limit and write back table sectors, which
    // under O_DIRECT may wait for an io_uring caller's own writes: it is declined.
    assert!(
        image.begin_write(16 * M, 4096).is_none(),
        "an allocation at the dirty limit was taken by a caller that must not wait"
    );
    // Once a flush wrote the entries back (and a blocking allocation marked the image
    // again), such callers allocate again.
    image.flush().unwrap();
    image.write_at(&[2u8; 4096], 20 * M).unwrap();
    let pending = image
        .begin_write(16 * M, 4096)
        .expect("an allocation after the write-back");
    drop(pending);
}
