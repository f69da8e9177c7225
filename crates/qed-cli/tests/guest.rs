//! A real Linux guest on our disks.
//!
//! QEMU's system emulator boots the host's Debian kernel with an initramfs built from
//! `tests/guest/` (busybox, e2fsprogs, the virtio and ext4 modules, and an `/init` that
//! takes its job from the kernel command line). The guest makes an ext4 filesystem on its
//! virtio disk, writes a scratch file, fills the disk with random data and a copy of its
//! own tree, lists their md5 sums, deletes the scratch file, discards the free space,
//! unmounts and runs `e2fsck -fn`; a second guest checks every file against the list. The
//! disk is either `qed serve` (QEMU's NBD client) or an image file QEMU's own qed driver
//! opens; most scenarios cross the two, so that what one wrote, the other reads back.
//! Two scenarios convert the disk in place between the guests, qcow2 to QED and QED to
//! qcow2, the qcow2 disk on QEMU's own qcow2 driver.
//!
//! Through `qed serve --discard=unmap` the discards free the scratch file's clusters: they
//! must be unmapped, no cluster still mapped may be an empty hole, and what the close left
//! unused in the file must be holes that both checkers count as leaks. A compaction (run
//! offline, online through the control socket, or started by `--compact-free`) gives
//! them back. Afterwards `qemu-img check` and `qed check` must find the image clean, and
//! QEMU's driver and `qed serve` (and `qed convert`) must read the same guest contents.
//!
//! The emulator runs without KVM: it is slower, but it does not depend on the host's
//! virtualization (this machine's /dev/kvm hangs a stock kernel early in boot). Boots
//! take turns, since two emulated CPUs on a small machine slow each other down more than
//! running them one after the other costs; one scenario alone boots several guests at
//! once on purpose: overlays on one base behind a web server, each served by its own
//! `qed serve`, whose processes share one host cache, so that the base crosses the
//! network about once however many guests read it.
//!
//! A missing tool, kernel or busybox fails these tests with what to install (`tests/run`
//! installs all of them); skipping would report an unexercised suite as passing.

use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

mod common;

use common::qemu::phantom_leaks;
use common::served::Served;
use common::{
    describe, exited_within, exits, install_hint, new_dir, ok, run, Killed, QED, QEMU_IMG,
};

const QEMU: &str = "qemu-system-x86_64";

const M: u64 = 1 << 20;

/// The guest's disk: room for the data set (about 80 MiB), the 32 MiB scratch file and
/// the overlay's additions, with ext4's journal and tables.
const DISK_SIZE: &str = "256M";

/// How long one boot may take before the guest counts as hung: ten times what the
/// longest takes on a 2-core machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);

/// What each guest must have discarded at least: the scratch file it deleted.
const SCRATCH: u64 = 32 * M;

// ---------------------------------------------------------------------------------------
// Running tools.

fn md5(dir: &Path, file: &str) -> String {
    let out = ok(dir, "md5sum", &[file]);
    out.split_whitespace()
        .next()
        .expect("md5sum output")
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// The kernel and the initramfs.

struct Kit {
    kernel: PathBuf,
    initramfs: PathBuf,
}

/// The kit of this test process, built (or found in the cache) once.
fn kit() -> &'static Kit {
    static KIT: OnceLock<Result<Kit, String>> = OnceLock::new();
    match KIT.get_or_init(prepare_kit) {
        Ok(kit) => kit,
        Err(e) => panic!("the guest kit is not available: {e}"),
    }
}

fn kit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest")
}

fn prepare_kit() -> Result<Kit, String> {
    for prog in [QEMU, QEMU_IMG] {
        if let Err(e) = Command::new(prog).arg("--version").output() {
            return Err(format!("cannot run {prog}: {e}{}", install_hint(prog)));
        }
    }
    let (version, kernel) = pick_kernel()?;
    // QEMU reads the kernel itself; a kernel only root may read fails there less clearly.
    File::open(&kernel).map_err(|e| format!("cannot read {}: {e}", kernel.display()))?;

    // The archive depends on the kit's files, the kernel's modules and the host tools
    // copied into it: any change to them builds a new one.
    let mut key = Fnv::new();
    key.add(version.as_bytes());
    let mut files: Vec<PathBuf> = fs::read_dir(kit_dir())
        .map_err(|e| format!("{}: {e}", kit_dir().display()))?
        .map(|e| e.expect("read tests/guest").path())
        .collect();
    files.sort();
    for f in &files {
        key.add(f.file_name().unwrap().as_encoded_bytes());
        key.add(&fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    let modules_dep = format!("/lib/modules/{version}/modules.dep");
    for f in [
        "/bin/busybox",
        "/sbin/mke2fs",
        "/sbin/e2fsck",
        "/sbin/filefrag",
        "/etc/mke2fs.conf",
        &modules_dep,
    ] {
        if let Ok(m) = fs::metadata(f) {
            key.add(&m.len().to_le_bytes());
            key.add(&m.mtime().to_le_bytes());
        }
    }
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest");
    fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let name = format!("initramfs-{version}-{:016x}.cpio", key.0);
    let initramfs = cache.join(&name);
    if initramfs.exists() {
        eprintln!("guest: initramfs from the cache: {}", initramfs.display());
    } else {
        let t = Instant::now();
        let script = kit_dir().join("build-initramfs");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&version)
            .arg(&initramfs)
            .output()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        if !out.status.success() {
            return Err(describe(
                "bash",
                &[
                    script.as_os_str(),
                    OsStr::new(&version),
                    initramfs.as_os_str(),
                ],
                &out,
            ));
        }
        eprintln!(
            "guest: built {} in {:.1} s",
            initramfs.display(),
            t.elapsed().as_secs_f64()
        );
        // Archives of older kits are never used again.
        for e in fs::read_dir(&cache).into_iter().flatten().flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with("initramfs-") && n != name {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(Kit { kernel, initramfs })
}

/// The newest `/boot/vmlinuz-VERSION` whose modules are installed.
fn pick_kernel() -> Result<(String, PathBuf), String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/boot").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("vmlinuz-") {
            if Path::new("/lib/modules")
                .join(version)
                .join("modules.dep")
                .exists()
            {
                found.push((version.to_owned(), e.path()));
            }
        }
    }
    found.sort_by_key(|(version, _)| version_key(version));
    found.pop().ok_or_else(|| {
        "no /boot/vmlinuz-VERSION with its modules in /lib/modules/VERSION \
         (apt-get install linux-image-amd64, or run tests/run)"
            .to_owned()
    })
}

/// Orders versions by their numbers (6.1.0-10 after 6.1.0-9).
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let text = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        key.push((num.parse().unwrap_or(0), tail[..text].to_owned()));
        rest = &tail[text..];
    }
    key
}

/// FNV-1a: stable across builds, unlike std's hasher, so the cache key is too.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Booting a guest.

#[derive(Clone, Copy)]
enum Job<'a> {
    /// mkfs.ext4 with this block size, a scratch file of `scratch` bytes, then the data
    /// set; then the scratch file is deleted and the free space trimmed.
    Write { block: u32, scratch: u64 },
    /// Checks the data set whose list has this md5, changes it and lists it anew; then
    /// writes, deletes and trims a scratch file of [`SCRATCH`] bytes.
    Modify { sums: &'a str },
    /// Checks the data set whose list has this md5, read-only.
    Verify { sums: &'a str },
}

impl Job<'_> {
    fn name(&self) -> &'static str {
        match self {
            Job::Write { .. } => "write",
            Job::Modify { .. } => "modify",
            Job::Verify { .. } => "verify",
        }
    }

    fn words(&self) -> String {
        match self {
            Job::Write { block, scratch } => format!(
                "qedguest.job=write qedguest.block={block} qedguest.scratch={}",
                scratch / M
            ),
            Job::Modify { sums } => format!(
                "qedguest.job=modify qedguest.sums={sums} qedguest.scratch={}",
                SCRATCH / M
            ),
            Job::Verify { sums } => format!("qedguest.job=verify qedguest.sums={sums}"),
        }
    }
}

/// What a guest reported: the `key=value` words of its result line.
struct Outcome(BTreeMap<String, String>);

impl Outcome {
    fn get(&self, key: &str) -> &str {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("the guest's result has no {key}: {:?}", self.0))
    }

    fn number(&self, key: &str) -> u64 {
        self.get(key).parse().expect("a number")
    }

    fn files(&self) -> u64 {
        self.number("files")
    }

    fn sums(&self) -> &str {
        self.get("sums")
    }

    /// Where the deleted scratch file lay on the disk: (start, length) in bytes.
    fn scratch_extents(&self) -> Vec<(u64, u64)> {
        self.get("scratch").split(',').map(start_length).collect()
    }

    /// Where the filesystem's first block group starts and how long each is, in bytes.
    fn groups(&self) -> (u64, u64) {
        start_length(self.get("groups"))
    }
}

fn start_length(s: &str) -> (u64, u64) {
    let (start, len) = s.split_once('+').expect("START+LENGTH");
    (
        start.parse().expect("a start"),
        len.parse().expect("a length"),
    )
}

/// Boots a guest on `drive` (QEMU's -drive option) to run `job`, and returns its result.
/// Panics, with the end of its console, when it fails, hangs or reports no result.
fn boot(dir: &Path, label: &str, drive: &str, job: Job) -> Outcome {
    try_boot(dir, label, drive, job).unwrap_or_else(|failed| panic!("{}", failed.report))
}

/// Why a boot failed: what the console and QEMU said, and whether QEMU itself aborted on
/// one of its qed driver's assertions.
struct Failed {
    report: String,
    qemu_qed_assertion: bool,
}

/// Boots take turns: see the module's comment.
static TURN: Mutex<()> = Mutex::new(());

/// The memory of a guest, in MiB.
const MEMORY: u32 = 256;

/// [`boot`], returning the failure instead of panicking.
fn try_boot(dir: &Path, label: &str, drive: &str, job: Job) -> Result<Outcome, Failed> {
    kit();
    let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    launch(dir, label, drive, job, MEMORY).wait(BOOT_DEADLINE)
}

/// A guest QEMU is running: its console and QEMU's own output go to files in the test's
/// directory.
struct Guest {
    label: String,
    drive: String,
    job: &'static str,
    console: PathBuf,
    log: PathBuf,
    qemu: Killed,
    started: Instant,
}

/// Starts a guest of `memory` MiB on `drive` (QEMU's -drive option) to run `job`, without
/// waiting for it or for any other guest's turn.
fn launch(dir: &Path, label: &str, drive: &str, job: Job, memory: u32) -> Guest {
    let kit = kit();
    let console = dir.join(format!("{label}.console"));
    let log = dir.join(format!("{label}.qemu.log"));
    // Kernel messages stay on: when a guest hangs, they are what tells where.
    let append = format!("console=ttyS0 panic=-1 {}", job.words());
    // The console goes to a file the test reads after the guest stopped.
    let serial = format!("file:{}", console.display());
    let disk = disk_args(drive, memory);
    let memory = memory.to_string();
    let mut args: Vec<&OsStr> = vec![
        "-nodefaults".as_ref(),
        "-no-user-config".as_ref(),
        "-display".as_ref(),
        "none".as_ref(),
        "-accel".as_ref(),
        "tcg".as_ref(),
        "-m".as_ref(),
        memory.as_ref(),
        "-no-reboot".as_ref(),
        "-kernel".as_ref(),
        kit.kernel.as_os_str(),
        "-initrd".as_ref(),
        kit.initramfs.as_os_str(),
        "-append".as_ref(),
        append.as_ref(),
        "-serial".as_ref(),
        serial.as_ref(),
    ];
    args.extend(disk.iter().map(OsStr::new));
    let started = Instant::now();
    let qemu_log = File::create(&log).expect("create the QEMU log");
    let child = Command::new(QEMU)
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().unwrap())
        .stderr(qemu_log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {QEMU}: {e}{}", install_hint(QEMU)));
    Guest {
        label: label.to_owned(),
        drive: drive.to_owned(),
        job: job.name(),
        console,
        log,
        qemu: Killed(child),
        started,
    }
}

impl Guest {
    /// Waits for the guest to power off, at most `deadline` from its start, and returns
    /// its result; a guest still running then is killed.
    fn wait(mut self, deadline: Duration) -> Result<Outcome, Failed> {
        let left = deadline.saturating_sub(self.started.elapsed());
        let status = exited_within(&mut self.qemu.0, left);
        let secs = self.started.elapsed().as_secs_f64();
        self.conclude(status, secs, deadline)
    }

    /// [`Guest::wait`] for several guests running at once: each one's time is taken when
    /// it stops, not when its turn to be waited for comes.
    fn wait_all(guests: Vec<Guest>, deadline: Duration) -> Vec<Result<Outcome, Failed>> {
        let mut ended: Vec<Option<(ExitStatus, f64)>> = vec![None; guests.len()];
        let mut guests = guests;
        loop {
            for (guest, end) in guests.iter_mut().zip(&mut ended) {
                if end.is_none() {
                    if let Some(status) = guest.qemu.0.try_wait().expect("look at QEMU") {
                        *end = Some((status, guest.started.elapsed().as_secs_f64()));
                    }
                }
            }
            let late = guests.iter().all(|g| g.started.elapsed() > deadline);
            if ended.iter().all(Option::is_some) || late {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        guests
            .into_iter()
            .zip(ended)
            .map(|(guest, end)| {
                let secs = guest.started.elapsed().as_secs_f64();
                match end {
                    Some((status, secs)) => guest.conclude(Some(status), secs, deadline),
                    None => guest.conclude(None, secs, deadline),
                }
            })
            .collect()
    }

    /// The result of a guest that stopped with `status` after `secs` seconds, or (`None`)
    /// was still running at `deadline`, when it is killed.
    fn conclude(
        self,
        status: Option<ExitStatus>,
        secs: f64,
        deadline: Duration,
    ) -> Result<Outcome, Failed> {
        let Guest {
            label,
            drive,
            job,
            console,
            log,
            qemu,
            ..
        } = self;
        drop(qemu);
        let text = String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned();
        let qemu_said = fs::read_to_string(&log).unwrap_or_default();
        let fail = |what: String| {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            Err(Failed {
                report: format!(
                    "{what}: guest {label} on {drive}\n--- last lines of its console:\n{tail}\n\
                     --- QEMU's output:\n{qemu_said}"
                ),
                qemu_qed_assertion: qemu_said.contains("block/qed.c")
                    && qemu_said.contains("Assertion"),
            })
        };
        let Some(status) = status else {
            return fail(format!(
                "the guest did not stop within {deadline:?} and was killed"
            ));
        };
        if !status.success() {
            return fail(format!("QEMU exited with {status}"));
        }
        let Some(result) = text
            .lines()
            .filter_map(|l| l.split_once("QEDGUEST RESULT ").map(|(_, r)| r.trim_end()))
            .next_back()
        else {
            return fail("the guest printed no result".into());
        };
        let mut words = result.split_whitespace();
        let (ran, verdict) = (words.next(), words.next());
        if verdict != Some("ok") {
            return fail("the guest failed".into());
        }
        if ran != Some(job) {
            return fail(format!("the guest ran {ran:?}, not {job}"));
        }
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        eprintln!("guest: {}: {label}: {secs:.1} s: {result}", test_name());
        Ok(Outcome(fields))
    }
}

/// How many times a boot in which QEMU's own qed driver writes is run when QEMU aborts
/// on an assertion of that driver (`s->allocating_acb == NULL` in qed_aio_write_alloc,
/// a race in QEMU's driver: it failed three boots in a row once on this machine).
const QEMU_QED_ATTEMPTS: u32 = 6;

/// A guest writes a new image through QEMU's own qed driver: `qed create` with
/// `create_args` makes `image`, then the guest runs `job` on it. QEMU 10.0's qed driver
/// now and then aborts on its own assertion (`s->allocating_acb == NULL` in
/// `qed_aio_write_alloc`, a race of its allocating-write queue that TCG's timing brings
/// out); only then is the image made again and the boot rerun, and the test says so. Any
/// other failure, of the guest or of our tools, fails the test at once.
fn qemu_writes(
    dir: &Path,
    label: &str,
    create_args: &[&str],
    image: &str,
    cache: &str,
    job: Job,
) -> Outcome {
    let mut args = create_args.to_vec();
    args.extend([image, DISK_SIZE]);
    for attempt in 1..=QEMU_QED_ATTEMPTS {
        create(dir, &args);
        match try_boot(dir, label, &qed_drive(dir, image, cache, false), job) {
            Ok(outcome) => return outcome,
            Err(failed) if failed.qemu_qed_assertion && attempt < QEMU_QED_ATTEMPTS => {
                eprintln!(
                    "guest: {}: {label}: QEMU's qed driver aborted on its own assertion \
                     (attempt {attempt} of {QEMU_QED_ATTEMPTS}); making the image again:\n{}",
                    test_name(),
                    failed.report
                );
            }
            Err(failed) => panic!("{}", failed.report),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// A virtio disk on an image file through QEMU's own qed driver.
fn qed_drive(dir: &Path, image: &str, cache: &str, read_only: bool) -> String {
    file_drive(dir, image, "qed", cache, read_only)
}

/// A virtio disk on an image file through QEMU's own driver for `format`.
fn file_drive(dir: &Path, image: &str, format: &str, cache: &str, read_only: bool) -> String {
    let path = dir.join(image);
    let path = path.to_str().expect("a UTF-8 path");
    assert!(!path.contains(','), "QEMU's option syntax: {path}");
    let ro = if read_only { ",readonly=on" } else { "" };
    format!("file={path},format={format},if=virtio,cache={cache},discard=unmap{ro}")
}

/// QEMU's options for the guest's disk: `-drive DRIVE`, or for a
/// `vhost-user-blk:SOCKET:QUEUES` drive ([`vhost_drive`]) a vhost-user-blk device on the
/// socket with guest memory shared (a memfd) and a vCPU per queue.
fn disk_args(drive: &str, memory: u32) -> Vec<String> {
    let Some(rest) = drive.strip_prefix("vhost-user-blk:") else {
        return vec!["-drive".into(), drive.into()];
    };
    let (socket, queues) = rest.rsplit_once(':').expect("vhost-user-blk:SOCKET:QUEUES");
    vec![
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-smp".into(),
        queues.into(),
        "-chardev".into(),
        format!("socket,id=vu,path={socket},reconnect-ms=500"),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev=vu,num-queues={queues}"),
    ]
}

// ---------------------------------------------------------------------------------------
// `qed serve`.

/// A virtio disk on `server`'s vhost-user-blk export, with `queues` queues (and vCPUs).
fn vhost_drive(server: &Served, queues: u16) -> String {
    let path = server.socket().to_str().expect("a UTF-8 path");
    assert!(
        !path.contains(',') && !path.contains(':'),
        "QEMU's option syntax: {path}"
    );
    format!("vhost-user-blk:{path}:{queues}")
}

/// A virtio disk on `server`'s export through QEMU's NBD client.
fn nbd_drive(server: &Served, read_only: bool) -> String {
    let path = server.socket().to_str().expect("a UTF-8 path");
    assert!(!path.contains(','), "QEMU's option syntax: {path}");
    let ro = if read_only { ",readonly=on" } else { "" };
    format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={path},\
         if=virtio,discard=unmap{ro}"
    )
}

/// SIGTERM to a server that must still be running, then a clean exit; returns what the
/// server printed.
fn stop(mut server: Served) -> String {
    server.assert_alive();
    server.stop()
}

// ---------------------------------------------------------------------------------------
// Judging an image.

/// `PROG check --output=json IMAGE`, which must exit with `code`.
fn check_report(dir: &Path, prog: &str, image: &str, code: i32) -> Value {
    let args = ["check", "--output=json", image];
    let out = run(dir, prog, &args);
    let what = || describe(prog, &args, &out);
    assert_eq!(out.status.code(), Some(code), "{}", what());
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", what()))
}

fn count(j: &Value, key: &str) -> u64 {
    j.get(key).map_or(0, |v| v.as_u64().expect("a count"))
}

/// Both checkers find the image clean, its NEED_CHECK bit (dirty flag) is clear, and QEMU's driver
/// reads what `qed serve` serves and `qed convert` copies.
fn assert_sound(dir: &Path, image: &str) {
    let ours = check_report(dir, QED, image, 0);
    for key in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(count(&ours, key), 0, "{key} in {image}: {ours:#}");
    }
    // Exactly the leaks QEMU's arithmetic invents must be its only ones.
    let info: Value = serde_json::from_str(&ok(dir, QED, &["info", "--output=json", image]))
        .expect("qed info JSON");
    let cluster = info["cluster-size"].as_u64().expect("a cluster size");
    let phantom = phantom_leaks(fs::metadata(dir.join(image)).unwrap().len(), cluster);
    let theirs = check_report(dir, QEMU_IMG, image, if phantom > 0 { 3 } else { 0 });
    assert_eq!(count(&theirs, "check-errors"), 0, "{theirs:#}");
    assert_eq!(count(&theirs, "corruptions"), 0, "{theirs:#}");
    assert_eq!(
        count(&theirs, "leaks"),
        phantom,
        "qemu-img check of {image} finds leaks besides the {phantom} its arithmetic \
         invents: {theirs:#}"
    );
    assert_eq!(
        theirs["allocated-clusters"], ours["allocated-clusters"],
        "qemu-img check (left) and qed check (right) count different clusters in use"
    );
    assert_eq!(
        info["dirty-flag"], false,
        "{image} still has NEED_CHECK set after its writer closed it"
    );

    let server = Served::unix(dir, &["-r"], image);
    let uri = server.uri();
    let same = ok(
        dir,
        QEMU_IMG,
        &["compare", "-f", "qed", image, "-F", "raw", &uri],
    );
    assert!(same.contains("Images are identical."), "{same}");
    server.finish();

    let copy = format!("{image}.raw");
    ok(dir, QED, &["convert", "-O", "raw", image, &copy]);
    let same = ok(
        dir,
        QEMU_IMG,
        &["compare", "-f", "qed", image, "-F", "raw", &copy],
    );
    assert!(same.contains("Images are identical."), "{same}");
    fs::remove_file(dir.join(copy)).expect("remove the copy");
}

/// What an image's own tables say, read straight from the file rather than through our
/// tools, so that their answers have something independent to be held against.
struct Layout {
    cluster: u64,
    /// The bytes of one table (L1 or L2).
    table: u64,
    header_bytes: u64,
    l1_offset: u64,
    l2_offsets: Vec<u64>,
    /// Guest cluster index to the file offset of its data cluster; zero clusters and
    /// unallocated ones are not here.
    data: BTreeMap<u64, u64>,
    file_len: u64,
}

impl Layout {
    fn read(dir: &Path, image: &str) -> Layout {
        let f = File::open(dir.join(image)).expect("open the image");
        let at = |offset: u64, len: u64| {
            let mut buf = vec![0; len as usize];
            f.read_exact_at(&mut buf, offset)
                .unwrap_or_else(|e| panic!("read {len} bytes at {offset} of {image}: {e}"));
            buf
        };
        let le32 =
            |b: &[u8], i: usize| u64::from(u32::from_le_bytes(b[i..i + 4].try_into().unwrap()));
        let le64 = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let h = at(0, 64);
        assert_eq!(&h[..4], b"QED\0", "{image} is not a QED image");
        let cluster = le32(&h, 4);
        let table = le32(&h, 8) * cluster;
        let l1_offset = le64(&h, 40);
        let entries = table / 8;
        let mut l2_offsets = Vec::new();
        let mut data = BTreeMap::new();
        let l1 = at(l1_offset, table);
        for i in 0..entries {
            let l2 = le64(&l1, i as usize * 8);
            if l2 == 0 {
                continue;
            }
            l2_offsets.push(l2);
            let t = at(l2, table);
            for j in 0..entries {
                // 0 is unallocated, 1 a zero cluster.
                let e = le64(&t, j as usize * 8);
                if e > 1 {
                    data.insert(i * entries + j, e);
                }
            }
        }
        Layout {
            cluster,
            table,
            header_bytes: le32(&h, 12) * cluster,
            l1_offset,
            l2_offsets,
            data,
            file_len: f.metadata().unwrap().len(),
        }
    }

    /// The bytes a file with nothing but the header, the tables and the data clusters
    /// would take: where a compaction can cut it.
    fn needed(&self) -> u64 {
        self.header_bytes
            + self.table * (1 + self.l2_offsets.len() as u64)
            + self.cluster * self.data.len() as u64
    }

    /// The file's clusters that nothing uses: not the header, a table or a data cluster.
    fn unused(&self) -> Vec<u64> {
        let mut used = vec![false; self.file_len.div_ceil(self.cluster) as usize];
        let mut mark = |offset: u64, len: u64| {
            for c in offset / self.cluster..(offset + len).div_ceil(self.cluster) {
                if let Some(u) = used.get_mut(c as usize) {
                    *u = true;
                }
            }
        };
        mark(0, self.header_bytes);
        mark(self.l1_offset, self.table);
        for &t in &self.l2_offsets {
            mark(t, self.table);
        }
        for &d in self.data.values() {
            mark(d, self.cluster);
        }
        used.iter()
            .enumerate()
            .filter(|(_, u)| !**u)
            .map(|(c, _)| c as u64 * self.cluster)
            .collect()
    }
}

/// Whether the file has data (not a hole) anywhere in `[offset, offset + len)`.
fn has_data(f: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor this function borrows for the call.
    let next = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if next < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENXIO),
            "SEEK_DATA at {offset}: {e}"
        );
        return false;
    }
    (next as u64) < offset + len
}

/// The guest's discards of its deleted scratch file of `scratch` bytes freed the image's
/// clusters under it: none of them takes disk space any more (the close parked those
/// nothing reused back under their entries, as holes), no more clusters are parked or
/// leaked than the guest discarded, and the clusters left unused in the file take no
/// disk space and are exactly what both checkers call leaks. Returns the image's layout.
fn assert_freed(dir: &Path, image: &str, wrote: &Outcome, scratch: u64) -> Layout {
    let trimmed = wrote.number("trimmed");
    assert!(
        trimmed >= scratch,
        "the guest discarded {trimmed} bytes, less than its {scratch}-byte scratch file"
    );
    let extents = wrote.scratch_extents();
    assert_eq!(
        extents.iter().map(|(_, len)| len).sum::<u64>(),
        scratch,
        "the scratch file's extents {extents:?} do not add up to its size"
    );
    let layout = Layout::read(dir, image);
    let cluster = layout.cluster;

    // A discard frees only the clusters it covers whole, and fstrim discards each block
    // group's free space on its own: the clusters a piece of the file within one group
    // covers whole were freed. The others may be shared with live data, or lie across
    // a group boundary (with 1 KiB blocks, groups start 1 KiB past a cluster).
    let (first_group, group) = wrote.groups();
    let mut pieces = Vec::new();
    for &(start, len) in &extents {
        let mut at = start;
        while at < start + len {
            let next_group = if at < first_group {
                first_group
            } else {
                first_group + ((at - first_group) / group + 1) * group
            };
            let end = next_group.min(start + len);
            pieces.push((at, end));
            at = end;
        }
    }
    // Freed while served; at close, what nothing reused went back under its entry,
    // punched (parked), unless the file's end was cut off. Either way it takes no space.
    let f = File::open(dir.join(image)).unwrap();
    let mut covered = 0;
    let mut parked = 0;
    for &(start, end) in &pieces {
        for g in start.div_ceil(cluster)..end / cluster {
            if let Some(&offset) = layout.data.get(&g) {
                assert!(
                    !has_data(&f, offset, cluster),
                    "{image} maps guest cluster {g} (at {:#x}) of the deleted and trimmed \
                     scratch file at file offset {offset:#x}, and it still takes disk space",
                    g * cluster
                );
                parked += 1;
            }
            covered += cluster;
        }
    }
    // A file of a few pieces loses at most a cluster at each end of each.
    assert!(
        covered >= scratch * 3 / 4,
        "the scratch file's pieces {pieces:?} cover only {covered} bytes of whole clusters"
    );

    // Our tools see the tables as the file holds them.
    let map: Value =
        serde_json::from_str(&ok(dir, QED, &["map", "--output=json", image])).expect("map JSON");
    let mapped: u64 = map
        .as_array()
        .expect("a list of runs")
        .iter()
        .filter(|r| r["data"] == true && r["depth"] == 0)
        .map(|r| r["length"].as_u64().unwrap())
        .sum();
    assert_eq!(
        mapped,
        layout.data.len() as u64 * cluster,
        "qed map's data and the L2 tables of {image} disagree"
    );

    // Data clusters that are holes were parked at close: freed by a discard, not
    // reused, and pointed back at by the entry that dropped them. Only what the guest
    // discarded can be parked.
    let empty: Vec<u64> = layout
        .data
        .values()
        .copied()
        .filter(|&offset| !has_data(&f, offset, cluster))
        .collect();
    assert!(
        empty.len() as u64 * cluster <= trimmed,
        "{image} maps {} data clusters that are holes in the file, more than the {trimmed} \
         bytes the guest discarded, the first at file offset {:#x}",
        empty.len(),
        empty[0]
    );
    let unused = layout.unused();
    let taking_space: Vec<u64> = unused
        .iter()
        .copied()
        .filter(|&offset| has_data(&f, offset, cluster))
        .collect();
    assert!(
        taking_space.is_empty(),
        "{image} has {} unused clusters that still take disk space, the first at {:#x}",
        taking_space.len(),
        taking_space[0]
    );

    let leaks = unused.len() as u64;
    let expected = if leaks > 0 { 3 } else { 0 };
    let ours = check_report(dir, QED, image, expected);
    assert_eq!(count(&ours, "leaks"), leaks, "{ours:#}");
    assert_eq!(count(&ours, "corruptions"), 0, "{ours:#}");
    assert_eq!(
        count(&ours, "allocated-clusters"),
        layout.data.len() as u64,
        "{ours:#}"
    );
    let phantom = phantom_leaks(layout.file_len, cluster);
    let theirs = check_report(
        dir,
        QEMU_IMG,
        image,
        if leaks + phantom > 0 { 3 } else { 0 },
    );
    assert_eq!(count(&theirs, "leaks"), leaks + phantom, "{theirs:#}");
    assert_eq!(count(&theirs, "corruptions"), 0, "{theirs:#}");
    // Leaks and parked clusters are clusters discards freed: no more than the guest
    // discarded.
    let parked_all = empty.len() as u64;
    assert!(
        (leaks + parked_all) * cluster <= trimmed,
        "{image} leaks {leaks} clusters and parked {parked_all} but the guest discarded \
         only {trimmed} bytes"
    );
    eprintln!(
        "guest: {}: {image}: {:.1} MiB mapped as data; {:.1} MiB of the deleted scratch \
         file's clusters freed ({parked} parked at close); {} data clusters parked in all; \
         {leaks} unused clusters ({:.1} MiB) left as holes; {:.1} MiB long, {:.1} MiB on disk",
        test_name(),
        mapped as f64 / M as f64,
        covered as f64 / M as f64,
        empty.len(),
        (leaks * cluster) as f64 / M as f64,
        layout.file_len as f64 / M as f64,
        (f.metadata().unwrap().blocks() * 512) as f64 / M as f64,
    );
    layout
}

fn create(dir: &Path, args: &[&str]) {
    let mut all = vec!["create", "-q"];
    all.extend(args);
    ok(dir, QED, &all);
}

fn finished(scenario: &str, t: Instant) {
    eprintln!(
        "guest: {}: scenario {scenario}: {:.1} s",
        test_name(),
        t.elapsed().as_secs_f64()
    );
}

/// The test's name, which the harness gives its thread, for lines printed while other
/// tests print theirs.
fn test_name() -> String {
    std::thread::current().name().unwrap_or("main").to_owned()
}

// ---------------------------------------------------------------------------------------
// The scenarios.

/// One persistent server, two connections: the guest writes through the first and a
/// second guest checks through the second.
#[test]
fn served_disk_written_and_verified_over_two_connections() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    create(d, &["disk.qed", DISK_SIZE]);
    let control = d.join("control.sock");
    let control = control.to_str().expect("a UTF-8 path");
    let mut server = Served::unix(
        d,
        &["-t", "--discard=unmap", "--control", control],
        "disk.qed",
    );
    let wrote = boot(
        d,
        "write",
        &nbd_drive(&server, false),
        Job::Write {
            block: 4096,
            scratch: SCRATCH,
        },
    );
    server.assert_alive();
    // Compacted online between the guests: the second reads every file from wherever
    // the compaction moved it, through the same server.
    let id = ok(d, QED, &["job", control, "compact", "--wait"]);
    let checked = boot(
        d,
        "verify",
        &nbd_drive(&server, true),
        Job::Verify { sums: wrote.sums() },
    );
    let log = stop(server);
    assert!(
        log.contains(&format!("job '{}' (compact) completed", id.trim())),
        "{log}"
    );
    assert_eq!(checked.files(), wrote.files());
    assert_freed(d, "disk.qed", &wrote, SCRATCH);
    assert_sound(d, "disk.qed");
    finished("served disk, two connections", t);
}

/// A guest with two vCPUs writes through our vhost-user-blk export with two queues,
/// trims, and a second boot on a fresh server verifies every file; the trim freed the
/// scratch file's clusters and both checkers find the image clean.
#[test]
fn vhost_user_blk_disk_written_trimmed_and_verified() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    create(d, &["disk.qed", DISK_SIZE]);
    let server = Served::vhost(d, &["--discard=unmap", "--num-queues", "2"], "disk.qed");
    let wrote = boot(
        d,
        "write",
        &vhost_drive(&server, 2),
        Job::Write {
            block: 4096,
            scratch: SCRATCH,
        },
    );
    let log = stop(server);
    let per_queue = queue_counts(&log);
    assert!(
        per_queue.len() == 2 && per_queue.iter().all(|&n| n > 0),
        "both queues carried requests: {per_queue:?}\n{log}"
    );
    assert_freed(d, "disk.qed", &wrote, SCRATCH);
    let server = Served::vhost(d, &["-r"], "disk.qed");
    let checked = boot(
        d,
        "verify",
        &vhost_drive(&server, 1),
        Job::Verify { sums: wrote.sums() },
    );
    stop(server);
    assert_eq!(checked.files(), wrote.files());
    assert_sound(d, "disk.qed");
    finished("vhost-user-blk disk", t);
}

/// The requests each queue completed, from the line a vhost-user-blk server ends with.
fn queue_counts(log: &str) -> Vec<u64> {
    let line = log
        .lines()
        .find_map(|l| l.split_once("requests completed per queue: "))
        .unwrap_or_else(|| panic!("no count of requests per queue in:\n{log}"))
        .1;
    line.split(", ")
        .map(|n| n.trim().parse().expect("a count"))
        .collect()
}

/// A guest changes a filesystem through our vhost-user-blk export of an overlay while a
/// stream (the overlay takes in its base) and then a compaction run through the control
/// socket; a boot on the overlay alone, its base moved away, finds every change.
#[test]
fn vhost_user_blk_guest_writes_while_jobs_run() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    create(d, &["base.qed", DISK_SIZE]);
    // The file system is made on a disk of 4096-byte sectors, and then used on one of
    // 512.
    let server = Served::vhost(
        d,
        &["--discard=unmap", "--logical-block-size", "4096"],
        "base.qed",
    );
    let base = boot(
        d,
        "base-write",
        &vhost_drive(&server, 1),
        Job::Write {
            block: 4096,
            scratch: SCRATCH,
        },
    );
    stop(server);
    create(d, &["-b", "base.qed", "-F", "qed", "overlay.qed"]);
    let control = d.join("ctl.sock");
    let control = control.to_str().expect("a UTF-8 path");
    let server = Served::vhost(
        d,
        &["--discard=unmap", "--control", control, "--num-queues", "2"],
        "overlay.qed",
    );
    kit();
    let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    let mut guest = launch(
        d,
        "overlay-modify",
        &vhost_drive(&server, 2),
        Job::Modify { sums: base.sums() },
        MEMORY,
    );
    // The guest is under way once it has written into the overlay.
    let overlay = d.join("overlay.qed");
    while fs::metadata(&overlay).map(|m| m.len()).unwrap_or(0) < 4 * M {
        assert!(
            guest.qemu.0.try_wait().unwrap().is_none(),
            "the guest stopped early"
        );
        assert!(
            t.elapsed() < BOOT_DEADLINE,
            "the guest wrote nothing in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stream = ok(d, QED, &["job", control, "stream", "--wait"]);
    let compact = ok(d, QED, &["job", control, "compact", "--wait"]);
    let changed = guest
        .wait(BOOT_DEADLINE)
        .unwrap_or_else(|failed| panic!("{}", failed.report));
    drop(turn);
    let log = stop(server);
    for (id, kind) in [(&stream, "stream"), (&compact, "compact")] {
        assert!(
            log.contains(&format!("job '{}' ({kind}) completed", id.trim())),
            "{log}"
        );
    }
    assert_ne!(changed.sums(), base.sums(), "the guest changed nothing");
    fs::rename(d.join("base.qed"), d.join("base.moved")).unwrap();
    let server = Served::vhost(d, &["-r"], "overlay.qed");
    let checked = boot(
        d,
        "overlay-verify",
        &vhost_drive(&server, 1),
        Job::Verify {
            sums: changed.sums(),
        },
    );
    stop(server);
    assert_eq!(checked.files(), changed.files());
    assert_sound(d, "overlay.qed");
    finished("vhost-user-blk guest writes while jobs run", t);
}

/// The vhost-user-blk backend killed (SIGKILL) while a guest writes, and started again
/// on the same socket: QEMU reconnects, the guest's writes go on, and a second boot finds
/// every file it wrote and synced.
#[test]
fn vhost_user_blk_guest_survives_a_killed_backend() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    create(d, &["disk.qed", DISK_SIZE]);
    let args = ["--discard=unmap"];
    let mut server = Served::vhost(d, &args, "disk.qed");
    let socket = server.socket().to_path_buf();
    kit();
    let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    let job = Job::Write {
        block: 4096,
        scratch: SCRATCH,
    };
    let mut guest = launch(d, "write", &vhost_drive(&server, 1), job, MEMORY);
    // Killed in the middle of the guest's 64 MiB file.
    let image = d.join("disk.qed");
    let grown = |len: u64| fs::metadata(&image).map(|m| m.len()).unwrap_or(0) >= len;
    while !grown(40 * M) {
        assert!(
            guest.qemu.0.try_wait().unwrap().is_none(),
            "the guest stopped before the backend was killed"
        );
        assert!(
            t.elapsed() < BOOT_DEADLINE,
            "the guest wrote too little in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        guest.qemu.0.try_wait().unwrap().is_none(),
        "QEMU died with its backend"
    );
    let server = Served::vhost_at(d, &socket, &args, "disk.qed");
    let wrote = match guest.wait(BOOT_DEADLINE) {
        Ok(wrote) => wrote,
        // What the restarted backend saw of QEMU's reconnection tells a hang apart.
        Err(failed) => panic!(
            "{}\n--- the restarted backend's log:\n{}",
            failed.report,
            server.stop()
        ),
    };
    drop(turn);
    stop(server);
    let server = Served::vhost(d, &["-r"], "disk.qed");
    let checked = boot(
        d,
        "verify",
        &vhost_drive(&server, 1),
        Job::Verify { sums: wrote.sums() },
    );
    stop(server);
    assert_eq!(checked.files(), wrote.files());
    assert_sound(d, "disk.qed");
    finished("vhost-user-blk backend killed and restarted", t);
}

/// QEMU's qed driver writes the image, `qed serve` gives it to the checking guest.
fn qemu_writes_and_qed_serve_verifies(scenario: &str, create_args: &[&str], cache: &str) {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    // 1 KiB blocks make ext4 write in pieces smaller than any cluster.
    let wrote = qemu_writes(
        d,
        "write",
        create_args,
        "disk.qed",
        cache,
        Job::Write {
            block: 1024,
            scratch: SCRATCH,
        },
    );
    assert_sound(d, "disk.qed");
    let before = md5(d, "disk.qed");
    let server = Served::unix(d, &["-r"], "disk.qed");
    let checked = boot(
        d,
        "verify",
        &nbd_drive(&server, true),
        Job::Verify { sums: wrote.sums() },
    );
    server.finish();
    assert_eq!(checked.files(), wrote.files());
    assert_eq!(
        md5(d, "disk.qed"),
        before,
        "a read-only export changed the file"
    );
    assert_sound(d, "disk.qed");
    finished(scenario, t);
}

#[test]
fn qemu_writes_small_clusters_and_qed_serve_verifies() {
    qemu_writes_and_qed_serve_verifies(
        "QEMU writes 4 KiB clusters (table_size 2), qed serve verifies",
        &["-o", "cluster_size=4k,table_size=2"],
        "none",
    );
}

#[test]
fn qemu_writes_default_clusters_and_qed_serve_verifies() {
    qemu_writes_and_qed_serve_verifies(
        "QEMU writes default clusters, qed serve verifies",
        &[],
        "writeback",
    );
}

/// `qed serve` writes the image, QEMU's qed driver gives it to the checking guest.
#[test]
fn qed_serve_writes_and_qemu_verifies() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    create(d, &["disk.qed", DISK_SIZE]);
    let server = Served::unix(d, &["--discard=unmap"], "disk.qed");
    let wrote = boot(
        d,
        "write",
        &nbd_drive(&server, false),
        Job::Write {
            block: 1024,
            scratch: SCRATCH,
        },
    );
    server.finish();
    assert_freed(d, "disk.qed", &wrote, SCRATCH);
    // What the close left as leaks goes back offline; QEMU then reads the moved clusters.
    ok(d, QED, &["compact", "disk.qed"]);
    assert_sound(d, "disk.qed");
    let before = md5(d, "disk.qed");
    let checked = boot(
        d,
        "verify",
        &qed_drive(d, "disk.qed", "none", true),
        Job::Verify { sums: wrote.sums() },
    );
    assert_eq!(checked.files(), wrote.files());
    assert_eq!(
        md5(d, "disk.qed"),
        before,
        "a read-only QEMU disk changed the file"
    );
    assert_sound(d, "disk.qed");
    finished("qed serve writes, QEMU verifies", t);
}

/// A guest changes a filesystem through an overlay `qed serve` serves; the base stays as
/// it was, and QEMU reads the changed filesystem through the overlay.
#[test]
fn overlay_takes_the_changes_and_the_base_is_unchanged() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    let base = qemu_writes(
        d,
        "base-write",
        &[],
        "base.qed",
        "writeback",
        Job::Write {
            block: 4096,
            scratch: SCRATCH,
        },
    );
    assert_sound(d, "base.qed");
    let base_md5 = md5(d, "base.qed");

    create(d, &["-b", "base.qed", "-F", "qed", "overlay.qed"]);
    let server = Served::unix(d, &["--discard=unmap"], "overlay.qed");
    let changed = boot(
        d,
        "overlay-modify",
        &nbd_drive(&server, false),
        Job::Modify { sums: base.sums() },
    );
    server.finish();
    assert_ne!(changed.sums(), base.sums(), "the guest changed nothing");
    // Freed over a base, the scratch file's clusters become zero clusters, not data.
    assert_freed(d, "overlay.qed", &changed, SCRATCH);
    ok(d, QED, &["compact", "overlay.qed"]);
    assert_eq!(
        md5(d, "base.qed"),
        base_md5,
        "writing the overlay changed its base"
    );

    let checked = boot(
        d,
        "overlay-verify",
        &qed_drive(d, "overlay.qed", "writeback", true),
        Job::Verify {
            sums: changed.sums(),
        },
    );
    assert_eq!(checked.files(), changed.files());
    assert_eq!(
        md5(d, "base.qed"),
        base_md5,
        "reading the overlay changed its base"
    );
    assert_sound(d, "overlay.qed");
    assert_sound(d, "base.qed");
    let (differ, _) = exits(d, QEMU_IMG, &["compare", "base.qed", "overlay.qed"], 1);
    assert!(differ.contains("Content mismatch"), "{differ}");
    finished("overlay over a base QEMU wrote", t);
}

/// A guest boots from an overlay on a base behind a web server while `qed serve
/// --stream` copies the base in; once the stream has concluded and the web server is
/// gone, a second guest verifies everything through the overlay alone.
#[test]
fn guest_on_an_http_base_while_it_streams_then_without_the_server() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    create(d, &["base.qed", DISK_SIZE]);
    let server = Served::unix(d, &["--discard=unmap"], "base.qed");
    let base = boot(
        d,
        "base-write",
        &nbd_drive(&server, false),
        Job::Write {
            block: 4096,
            scratch: SCRATCH,
        },
    );
    server.finish();
    assert_freed(d, "base.qed", &base, SCRATCH);
    ok(d, QED, &["compact", "base.qed"]);
    assert_sound(d, "base.qed");

    let mut nginx = common::nginx::Nginx::start();
    fs::copy(d.join("base.qed"), nginx.root().join("base.qed")).expect("copy the base");
    let url = nginx.url("base.qed");
    create(d, &["-b", &url, "-F", "qed", "overlay.qed"]);
    let control = d.join("control.sock");
    let control = control.to_str().expect("a UTF-8 path");
    // Slow enough that the guest runs while the stream does.
    let server = Served::unix(
        d,
        &[
            "-t",
            "--discard=unmap",
            "--control",
            control,
            "--stream",
            "--stream-rate",
            "4M",
        ],
        "overlay.qed",
    );
    let changed = boot(
        d,
        "overlay-modify",
        &nbd_drive(&server, false),
        Job::Modify { sums: base.sums() },
    );
    let jobs = || -> Value {
        serde_json::from_str(&ok(d, QED, &["job", control, "query", "--output", "json"]))
            .expect("query-jobs JSON")
    };
    let during = jobs();
    let deadline = Instant::now() + BOOT_DEADLINE;
    let job = loop {
        let j = jobs();
        let job = j
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .expect("a job");
        if job["status"] == "concluded" {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not conclude: {j}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(job.get("error").is_none(), "the stream failed: {job}");
    stop(server);
    eprintln!("{}: stream while the guest ran: {during}", test_name());
    assert_freed(d, "overlay.qed", &changed, SCRATCH);
    ok(d, QED, &["compact", "overlay.qed"]);

    nginx.stop();
    let info: Value =
        serde_json::from_str(&ok(d, QEMU_IMG, &["info", "--output=json", "overlay.qed"]))
            .expect("qemu-img info JSON");
    assert!(info.get("backing-filename").is_none(), "{info}");
    let server = Served::unix(d, &[], "overlay.qed");
    let checked = boot(
        d,
        "overlay-verify",
        &nbd_drive(&server, true),
        Job::Verify {
            sums: changed.sums(),
        },
    );
    server.finish();
    assert_eq!(checked.files(), changed.files());
    assert_sound(d, "overlay.qed");
    finished("a guest on an http base while it streams", t);
}

/// The scratch file of the compaction scenario: large enough that freeing it passes a
/// quarter of the file (the data set of about 80 MiB and ext4's 16 MiB journal besides).
const BIG_SCRATCH: u64 = 64 * M;

/// Waits until `qed serve` behind `control` has run at least one compaction and none is
/// running; every one must have completed. Returns the jobs.
fn compactions_settled(dir: &Path, control: &str) -> Vec<Value> {
    let query = || -> Vec<Value> {
        let out = ok(dir, QED, &["job", control, "query", "--output", "json"]);
        serde_json::from_str::<Value>(&out)
            .expect("query-jobs JSON")
            .as_array()
            .expect("a list of jobs")
            .clone()
    };
    let settled =
        |jobs: &[Value]| !jobs.is_empty() && jobs.iter().all(|j| j["status"] == "concluded");
    // The guest has gone: the watcher has seen what it freed within 200 ms, and moving
    // under 100 MiB takes seconds.
    let limit = Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    let jobs = loop {
        let jobs = query();
        // The watcher looks every 200 ms: a second look a while later tells a settled
        // list from one that is about to get another compaction.
        if settled(&jobs) {
            std::thread::sleep(Duration::from_secs(1));
            let again = query();
            if settled(&again) && again.len() == jobs.len() {
                break again;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no compaction started and ran to its end within {limit:?}: {jobs:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for j in &jobs {
        assert_eq!(j["type"], "compact", "{j}");
        assert!(j.get("error").is_none(), "the compaction failed: {j}");
    }
    jobs
}

/// A guest writes a scratch file and its data set, then deletes the scratch file and
/// trims; the file is large enough that `qed serve --compact-free=25` compacts the image
/// on its own, moving the data set down into its place. Afterwards no cluster the image
/// maps is an empty hole, the file is within a tenth of its header, tables and data
/// clusters, both checkers find it clean, and a guest on QEMU's driver reads every file.
#[test]
fn trim_past_a_quarter_compacts_the_served_image() {
    trim_past_a_quarter_compacts(false);
}

/// The same through a vhost-user-blk export.
#[test]
fn trim_past_a_quarter_compacts_the_vhost_user_blk_export() {
    trim_past_a_quarter_compacts(true);
}

fn trim_past_a_quarter_compacts(vhost: bool) {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    create(d, &["disk.qed", DISK_SIZE]);
    let control = d.join("control.sock");
    let control = control.to_str().expect("a UTF-8 path");
    let args = ["--discard=unmap", "--compact-free=25", "--control", control];
    // -t keeps the NBD server after the guest has gone, so that a compaction still
    // running then is not cancelled by the server's exit; a vhost-user-blk export waits
    // for the next frontend anyway.
    let (server, drive) = if vhost {
        let server = Served::vhost(d, &args, "disk.qed");
        let drive = vhost_drive(&server, 1);
        (server, drive)
    } else {
        let server = Served::unix(d, &[&["-t"][..], &args].concat(), "disk.qed");
        let drive = nbd_drive(&server, false);
        (server, drive)
    };
    let wrote = boot(
        d,
        "write",
        &drive,
        Job::Write {
            block: 4096,
            scratch: BIG_SCRATCH,
        },
    );
    let jobs = compactions_settled(d, control);
    let log = stop(server);
    for j in &jobs {
        let id = j["id"].as_str().expect("a job id");
        assert!(
            log.contains(&format!("job '{id}' (compact) completed")),
            "{log}"
        );
    }
    eprintln!(
        "guest: {}: compactions the server started: {}",
        test_name(),
        serde_json::to_string(&jobs).unwrap()
    );

    let layout = assert_freed(d, "disk.qed", &wrote, BIG_SCRATCH);
    // The compaction took every freed cluster: none was left for the close to park.
    let f = File::open(d.join("disk.qed")).unwrap();
    let holes = layout
        .data
        .values()
        .filter(|&&offset| !has_data(&f, offset, layout.cluster))
        .count();
    assert_eq!(
        holes, 0,
        "disk.qed maps {holes} data clusters that are holes"
    );
    let needed = layout.needed();
    let len = layout.file_len;
    eprintln!(
        "guest: {}: disk.qed is {len} bytes; header {} + L1 {} + {} L2 tables of {} + {} \
         data clusters of {} = {needed} bytes; bound {} bytes",
        test_name(),
        layout.header_bytes,
        layout.table,
        layout.l2_offsets.len(),
        layout.table,
        layout.data.len(),
        layout.cluster,
        needed + needed / 10,
    );
    assert!(
        len >= needed,
        "disk.qed is {len} bytes, shorter than the {needed} its tables reference"
    );
    assert!(
        len <= needed + needed / 10,
        "after compaction disk.qed is {len} bytes, more than a tenth over the {needed} \
         bytes of its header, tables and data clusters"
    );
    assert_sound(d, "disk.qed");

    let before = md5(d, "disk.qed");
    let checked = boot(
        d,
        "verify",
        &qed_drive(d, "disk.qed", "none", true),
        Job::Verify { sums: wrote.sums() },
    );
    assert_eq!(checked.files(), wrote.files());
    assert_eq!(
        md5(d, "disk.qed"),
        before,
        "a read-only QEMU disk changed the file"
    );
    finished("a trim past a quarter compacts the served image", t);
}

/// The guest contents of `copy` (format `copy_fmt`) and `image` (format `fmt`) are the
/// same to qemu-img.
fn assert_same_disk(dir: &Path, copy: (&str, &str), image: (&str, &str)) {
    let same = ok(
        dir,
        QEMU_IMG,
        &["compare", "-f", copy.1, "-F", image.1, copy.0, image.0],
    );
    assert!(same.contains("Images are identical."), "{same}");
}

/// `qemu-img info -f FORMAT` of `image`: it must be of that format, and clean.
fn assert_format(dir: &Path, image: &str, format: &str) -> Value {
    let info: Value = serde_json::from_str(&ok(dir, QEMU_IMG, &["info", "--output=json", image]))
        .expect("qemu-img info JSON");
    assert_eq!(info["format"], format, "{info:#}");
    assert_eq!(info["dirty-flag"], false, "{info:#}");
    info
}

/// A guest fills a qcow2 disk through QEMU's own qcow2 driver (discarding its scratch
/// file); `qed convert --in-place` makes the file QED, and a second guest checks every
/// file through `qed serve`.
#[test]
fn qcow2_converted_in_place_to_qed_and_served() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    ok(
        d,
        QEMU_IMG,
        &["create", "-q", "-f", "qcow2", "disk.img", DISK_SIZE],
    );
    let wrote = boot(
        d,
        "write",
        &file_drive(d, "disk.img", "qcow2", "writeback", false),
        Job::Write {
            block: 4096,
            scratch: SCRATCH,
        },
    );
    check_report(d, QEMU_IMG, "disk.img", 0);
    ok(d, "cp", &["--sparse=always", "disk.img", "disk.qcow2"]);
    let took = Instant::now();
    ok(d, QED, &["convert", "--in-place", "disk.img"]);
    eprintln!(
        "guest: {}: qcow2 to QED in place: {:.2} s",
        test_name(),
        took.elapsed().as_secs_f64()
    );
    assert_format(d, "disk.img", "qed");
    assert_same_disk(d, ("disk.qcow2", "qcow2"), ("disk.img", "qed"));
    assert_sound(d, "disk.img");

    let before = md5(d, "disk.img");
    let server = Served::unix(d, &["-r", "-f", "qed"], "disk.img");
    let checked = boot(
        d,
        "verify",
        &nbd_drive(&server, true),
        Job::Verify { sums: wrote.sums() },
    );
    server.finish();
    assert_eq!(checked.files(), wrote.files());
    assert_eq!(
        md5(d, "disk.img"),
        before,
        "a read-only export changed the file"
    );
    finished(
        "qcow2 from QEMU, converted in place to QED, qed serve verifies",
        t,
    );
}

/// A guest fills a QED disk through `qed serve --discard=unmap` (its close leaves what
/// the discards freed as leaks); `qed convert --in-place -O qcow2` makes the file qcow2,
/// without leaks, and a second guest, on QEMU's own qcow2 driver, checks every file,
/// changes the data set and trims; the image stays clean.
#[test]
fn qed_converted_in_place_to_qcow2_and_booted_by_qemu() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    create(d, &["disk.img", DISK_SIZE]);
    let server = Served::unix(d, &["--discard=unmap"], "disk.img");
    let wrote = boot(
        d,
        "write",
        &nbd_drive(&server, false),
        Job::Write {
            block: 4096,
            scratch: SCRATCH,
        },
    );
    server.finish();
    ok(d, "cp", &["--sparse=always", "disk.img", "disk.qed"]);
    let took = Instant::now();
    ok(
        d,
        QED,
        &["convert", "--in-place", "-O", "qcow2", "disk.img"],
    );
    eprintln!(
        "guest: {}: QED to qcow2 in place: {:.2} s",
        test_name(),
        took.elapsed().as_secs_f64()
    );
    let info = assert_format(d, "disk.img", "qcow2");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{info:#}");
    assert_same_disk(d, ("disk.qed", "qed"), ("disk.img", "qcow2"));
    let report = check_report(d, QEMU_IMG, "disk.img", 0);
    for key in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(count(&report, key), 0, "{key}: {report:#}");
    }

    let changed = boot(
        d,
        "modify",
        &file_drive(d, "disk.img", "qcow2", "none", false),
        Job::Modify { sums: wrote.sums() },
    );
    // The guest checked every file of the list before it changed anything.
    assert_ne!(changed.sums(), wrote.sums(), "the guest changed nothing");
    let report = check_report(d, QEMU_IMG, "disk.img", 0);
    for key in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(count(&report, key), 0, "{key}: {report:#}");
    }
    assert_format(d, "disk.img", "qcow2");
    finished(
        "QED converted in place to qcow2, QEMU's qcow2 driver checks and changes it",
        t,
    );
}

/// How many guests boot at once from one base behind a web server.
const STORM_GUESTS: usize = 4;

/// The memory of each guest of the storm, in MiB: four run at once, and their job needs
/// little.
const STORM_MEMORY: u32 = 160;

/// How long each guest of the storm may take: four emulated machines share the host's
/// cores, so each takes several times what it takes alone.
const STORM_DEADLINE: Duration = Duration::from_secs(600);

/// The data set of the storm: a few MiB of random files and small files, so that four
/// emulated guests checking it at once stay quick.
const STORM_DATA: &[(&str, usize)] = &[
    ("data/random-1", 4 << 20),
    ("data/random-2", 4 << 20),
    ("data/random-3", 3 << 20),
    ("data/odd", (1 << 20) + 4321),
];

/// Makes `image`, a raw ext4 filesystem of `size` with the storm's data set and, at its
/// root, the list of the set's md5 sums that the guest's verify job checks (made on the
/// host by `mke2fs -d`, not by a guest: a boot less). Returns the number of files, the
/// md5 of the list and how many bytes of the files are not zero.
fn filesystem_with_data(dir: &Path, image: &str, size: &str) -> (u64, String, u64) {
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("data/small")).expect("make the data set's directories");
    let mut names = Vec::new();
    let mut bytes = 0;
    // The data has runs of zeros, which the base need not hold.
    let nonzero = |data: &[u8]| data.iter().filter(|&&b| b != 0).count() as u64;
    for (i, (name, len)) in STORM_DATA.iter().enumerate() {
        let data = common::test_bytes(*len, 7 + i as u64);
        fs::write(tree.join(name), &data).expect("write data");
        names.push((*name).to_owned());
        bytes += nonzero(&data);
    }
    for i in 1..=32u64 {
        let name = format!("data/small/{i}");
        let len = ((i * 37) % 61 + 1) * 1000;
        let data = common::test_bytes(len as usize, 100 + i);
        fs::write(tree.join(&name), &data).expect("write a small file");
        names.push(name);
        bytes += nonzero(&data);
    }
    names.sort();
    fs::write(tree.join("SUMS"), ok(&tree, "md5sum", &names)).expect("write the list of sums");
    let tree_arg = tree.to_str().expect("a UTF-8 path");
    ok(
        dir,
        "mke2fs",
        &[
            "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree_arg, image, size,
        ],
    );
    (names.len() as u64, md5(&tree, "SUMS"), bytes)
}

/// Four guests boot at once, each from its own overlay on one base behind nginx, each
/// overlay served by its own `qed serve`, the four servers sharing one host cache
/// directory; every guest checks every file of the base's data set. nginx must send the
/// base's bytes about once: at most 1.2 times what one guest alone, through a server
/// with a fresh cache of its own, made it send.
#[test]
fn guests_at_once_on_one_http_base_fetch_it_once() {
    let t = Instant::now();
    let dir = new_dir();
    let d = dir.path();
    let (files, sums, data) = filesystem_with_data(d, "base.raw", "48M");
    ok(d, QED, &["convert", "-O", "qed", "base.raw", "base.qed"]);
    fs::remove_file(d.join("base.raw")).expect("remove the raw filesystem");

    let nginx = common::nginx::Nginx::start();
    fs::copy(d.join("base.qed"), nginx.root().join("base.qed")).expect("copy the base");
    let url = nginx.url("base.qed");
    let overlays: Vec<String> = (0..=STORM_GUESTS)
        .map(|i| format!("overlay-{i}.qed"))
        .collect();
    for overlay in &overlays {
        // No host cache here: the guests' servers start with empty ones.
        let args = ["create", "-q", "-b", &url, "-F", "qed", overlay];
        let out = Command::new(QED)
            .args(args)
            .current_dir(d)
            .env("QED_CACHE_DIR", "none")
            .output()
            .expect("run qed create");
        assert!(out.status.success(), "{}", describe(QED, &args, &out));
    }
    let opened = nginx.settled_bytes_sent("base.qed");
    let cache = |name: &str| {
        let path = d.join(name);
        fs::create_dir(&path).expect("make a cache directory");
        path
    };
    let serve = |overlay: &str, cache: &Path| {
        Served::start_env(
            d,
            true,
            &[("QED_CACHE_DIR", cache.as_os_str())],
            &["-r"],
            overlay,
        )
    };
    let verify = Job::Verify { sums: &sums };
    kit();
    // Other scenarios' guests wait until this one's are done.
    let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);

    // One guest alone, through a server with a cache of its own: what one guest's reads
    // take from the web server.
    let server = serve(&overlays[0], &cache("cache-alone"));
    let alone = launch(d, "alone", &nbd_drive(&server, true), verify, STORM_MEMORY)
        .wait(BOOT_DEADLINE)
        .unwrap_or_else(|failed| panic!("{}", failed.report));
    server.finish();
    assert_eq!(alone.files(), files);
    let one = nginx.settled_bytes_sent("base.qed") - opened;
    // The files' bytes live in the base alone: the guest cannot have checked them
    // without the web server sending them.
    assert!(
        one >= data,
        "nginx sent {one} bytes of the base for one guest, less than the {data} bytes that \
         are not zero in the files it checked"
    );

    let shared = cache("cache-shared");
    let servers: Vec<Served> = overlays[1..].iter().map(|o| serve(o, &shared)).collect();
    let storm = Instant::now();
    let guests: Vec<Guest> = servers
        .iter()
        .enumerate()
        .map(|(i, server)| {
            launch(
                d,
                &format!("storm-{i}"),
                &nbd_drive(server, true),
                verify,
                STORM_MEMORY,
            )
        })
        .collect();
    // Every guest is waited for (or killed) before the first failure is reported.
    let outcomes = Guest::wait_all(guests, STORM_DEADLINE);
    let storm_secs = storm.elapsed().as_secs_f64();
    for outcome in outcomes {
        let outcome = outcome.unwrap_or_else(|failed| panic!("{}", failed.report));
        assert_eq!(outcome.files(), files);
    }
    for server in servers {
        server.finish();
    }
    let all = nginx.settled_bytes_sent("base.qed") - opened - one;
    eprintln!(
        "guest: {}: nginx sent {one} bytes of the base for one guest alone, {all} for \
         {STORM_GUESTS} at once ({:.2}x) in {storm_secs:.1} s; the files hold {data} bytes \
         that are not zero",
        test_name(),
        all as f64 / one as f64
    );
    assert!(
        all * 5 <= one * 6,
        "nginx sent {all} bytes of the base for {STORM_GUESTS} guests at once on one host \
         cache, more than 1.2 times the {one} it sent for one guest alone"
    );
    finished("guests at once on one http base", t);
}
