//! A real Linux guest on our disks.
//!
//! QEMU's system emulator boots the host's Debian kernel with an initramfs built from
//! `tests/guest/` (busybox, e2fsprogs, the virtio and ext4 modules, and an `/init` that
//! takes its job from the kernel command line). The guest makes an ext4 filesystem on its
//! virtio disk, fills it with random data and a copy of its own tree, lists their md5
//! sums, writes and deletes a file, discards the free space, unmounts and runs
//! `e2fsck -fn`; a second guest checks every file against the list. The disk is either
//! `qed serve` (QEMU's NBD client) or an image file QEMU's own qed driver opens; most
//! scenarios cross the two, so that what one wrote, the other reads back.
//!
//! Afterwards `qemu-img check` and `qed check` must find the image clean, and QEMU's
//! driver and `qed serve` (and `qed convert`) must read the same guest contents.
//!
//! The emulator runs without KVM: it is slower, but it does not depend on the host's
//! virtualization (this machine's /dev/kvm hangs a stock kernel early in boot). Boots
//! take turns, since two emulated CPUs on a small machine slow each other down more than
//! running them one after the other costs.
//!
//! A missing tool, kernel or busybox fails these tests with what to install (`tests/run`
//! installs all of them); skipping would report an unexercised suite as passing.

use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

mod common;

use common::{describe, install_hint, new_dir, ok, run, QED, QEMU_IMG};

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

/// Runs `prog` and asserts its exit code; returns its stdout.
fn exits<S: AsRef<OsStr>>(dir: &Path, prog: &str, args: &[S], code: i32) -> String {
    let out = run(dir, prog, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit code {code} from {}",
        describe(prog, args, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn md5(dir: &Path, file: &str) -> String {
    let out = ok(dir, "md5sum", &[file]);
    out.split_whitespace()
        .next()
        .expect("md5sum output")
        .to_owned()
}

/// A child process killed when dropped, so that a failing test leaves nothing running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for the child until `limit`; `None` if it is still running then.
fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait for a child") {
            return Some(st);
        }
        if t.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
    /// mkfs.ext4 with this block size, then the data set.
    Write { block: u32 },
    /// Checks the data set whose list has this md5, changes it and lists it anew.
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
            Job::Write { block } => format!("qedguest.job=write qedguest.block={block}"),
            Job::Modify { sums } => format!("qedguest.job=modify qedguest.sums={sums}"),
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

/// [`boot`], returning the failure instead of panicking.
fn try_boot(dir: &Path, label: &str, drive: &str, job: Job) -> Result<Outcome, Failed> {
    static TURN: Mutex<()> = Mutex::new(());
    let kit = kit();
    let console = dir.join(format!("{label}.console"));
    let log = dir.join(format!("{label}.qemu.log"));
    // Kernel messages stay on: when a guest hangs, they are what tells where.
    let append = format!("console=ttyS0 panic=-1 {}", job.words());
    // The console goes to a file the test reads after the guest stopped.
    let serial = format!("file:{}", console.display());
    let args: Vec<&OsStr> = vec![
        "-nodefaults".as_ref(),
        "-no-user-config".as_ref(),
        "-display".as_ref(),
        "none".as_ref(),
        "-accel".as_ref(),
        "tcg".as_ref(),
        "-m".as_ref(),
        "256".as_ref(),
        "-no-reboot".as_ref(),
        "-kernel".as_ref(),
        kit.kernel.as_os_str(),
        "-initrd".as_ref(),
        kit.initramfs.as_os_str(),
        "-append".as_ref(),
        append.as_ref(),
        "-serial".as_ref(),
        serial.as_ref(),
        "-drive".as_ref(),
        drive.as_ref(),
    ];
    let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    let t = Instant::now();
    let qemu_log = File::create(&log).expect("create the QEMU log");
    let child = Command::new(QEMU)
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().unwrap())
        .stderr(qemu_log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {QEMU}: {e}{}", install_hint(QEMU)));
    let mut qemu = Killed(child);
    let status = wait_until(&mut qemu.0, BOOT_DEADLINE);
    let secs = t.elapsed().as_secs_f64();
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
            "the guest did not stop within {BOOT_DEADLINE:?} and was killed"
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
    if ran != Some(job.name()) {
        return fail(format!("the guest ran {ran:?}, not {}", job.name()));
    }
    let fields = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    eprintln!("guest: {}: {label}: {secs:.1} s: {result}", test_name());
    Ok(Outcome(fields))
}

/// How many times a boot in which QEMU's own qed driver writes is run when QEMU aborts
/// on an assertion of that driver.
const QEMU_QED_ATTEMPTS: u32 = 3;

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
    let path = dir.join(image);
    let path = path.to_str().expect("a UTF-8 path");
    assert!(!path.contains(','), "QEMU's option syntax: {path}");
    let ro = if read_only { ",readonly=on" } else { "" };
    format!("file={path},format=qed,if=virtio,cache={cache},discard=unmap{ro}")
}

// ---------------------------------------------------------------------------------------
// `qed serve`.

/// A running `qed serve` on a Unix socket; killed when dropped.
struct Served {
    child: Killed,
    socket: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Served {
    /// Starts `qed serve` in `dir` with `args` before the image name; returns once it
    /// listens.
    fn start(dir: &Path, args: &[&str], image: &str) -> Served {
        static NEXT: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut next = NEXT.lock().unwrap_or_else(PoisonError::into_inner);
            *next += 1;
            *next
        };
        let socket = dir.join(format!("nbd-{n}.sock"));
        let (child, log, banner) = common::spawn_server(
            Command::new(QED)
                .arg("serve")
                .arg("-k")
                .arg(&socket)
                .args(args)
                .arg(image)
                .current_dir(dir),
        );
        // The banner comes once the socket listens.
        assert!(banner.contains("unix socket"), "banner: {banner}");
        let child = Killed(child);
        Served { child, socket, log }
    }

    /// A virtio disk on this export through QEMU's NBD client.
    fn drive(&self, read_only: bool) -> String {
        let path = self.socket.to_str().expect("a UTF-8 path");
        assert!(!path.contains(','), "QEMU's option syntax: {path}");
        let ro = if read_only { ",readonly=on" } else { "" };
        format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={path},\
             if=virtio,discard=unmap{ro}"
        )
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn assert_alive(&mut self) {
        if let Some(st) = self.child.0.try_wait().unwrap() {
            panic!("qed serve died ({st}):\n{}", self.log.lock().unwrap());
        }
    }

    /// A server without `-t` stops by itself once its client has gone; it must do so
    /// cleanly.
    fn finish(mut self) {
        self.assert_exit();
    }

    /// SIGTERM, then a clean exit.
    fn stop(mut self) {
        self.assert_alive();
        let st = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM failed");
        self.assert_exit();
    }

    fn assert_exit(&mut self) {
        let st = wait_until(&mut self.child.0, Duration::from_secs(30)).unwrap_or_else(|| {
            panic!(
                "qed serve did not exit within 30 s:\n{}",
                self.log.lock().unwrap()
            )
        });
        assert!(
            st.success(),
            "qed serve exited with {st}:\n{}",
            self.log.lock().unwrap()
        );
    }
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
    // QEMU's check divides by cluster_size - 1 where it means cluster_size, so it counts
    // clusters past the end of a file of cluster_size - 1 clusters or more (16 MiB with
    // 4 KiB clusters) as leaked. Exactly those must be its only leaks.
    let info: Value = serde_json::from_str(&ok(dir, QED, &["info", "--output=json", image]))
        .expect("qed info JSON");
    let cluster = info["cluster-size"].as_u64().expect("a cluster size");
    let len = fs::metadata(dir.join(image))
        .unwrap()
        .len()
        .div_ceil(cluster)
        * cluster;
    let phantom = len / (cluster - 1) - len / cluster;
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

    let server = Served::start(dir, &["-r"], image);
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

/// The guest's discards of the scratch file reached the image: clusters the image still
/// maps as data no longer take space in the file.
fn assert_discarded(dir: &Path, image: &str, wrote: &Outcome) {
    assert!(
        wrote.number("trimmed") >= SCRATCH,
        "the guest discarded less than its scratch file"
    );
    let map = ok(dir, QED, &["map", "--output=json", image]);
    let runs: Value = serde_json::from_str(&map).expect("map JSON");
    let mapped: u64 = runs
        .as_array()
        .expect("a list of runs")
        .iter()
        .filter(|r| r["data"] == true && r["depth"] == 0)
        .map(|r| r["length"].as_u64().unwrap())
        .sum();
    let on_disk = fs::metadata(dir.join(image)).unwrap().blocks() * 512;
    eprintln!(
        "guest: {}: {image} maps {:.1} MiB of data and takes {:.1} MiB of disk",
        test_name(),
        mapped as f64 / M as f64,
        on_disk as f64 / M as f64
    );
    // The scratch file's clusters, less those its extents only partly cover and the
    // space the image's own tables take.
    assert!(
        mapped >= on_disk + SCRATCH * 3 / 4,
        "{image} maps {mapped} bytes of data but takes {on_disk} bytes: the discards \
         of a {SCRATCH}-byte deleted file did not release its space"
    );
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
    let mut server = Served::start(d, &["-t", "--discard=unmap"], "disk.qed");
    let wrote = boot(d, "write", &server.drive(false), Job::Write { block: 4096 });
    server.assert_alive();
    let checked = boot(
        d,
        "verify",
        &server.drive(true),
        Job::Verify { sums: wrote.sums() },
    );
    server.stop();
    assert_eq!(checked.files(), wrote.files());
    assert_discarded(d, "disk.qed", &wrote);
    assert_sound(d, "disk.qed");
    finished("served disk, two connections", t);
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
        Job::Write { block: 1024 },
    );
    assert_sound(d, "disk.qed");
    let before = md5(d, "disk.qed");
    let server = Served::start(d, &["-r"], "disk.qed");
    let checked = boot(
        d,
        "verify",
        &server.drive(true),
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
    let server = Served::start(d, &["--discard=unmap"], "disk.qed");
    let wrote = boot(d, "write", &server.drive(false), Job::Write { block: 1024 });
    server.finish();
    assert_discarded(d, "disk.qed", &wrote);
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
        Job::Write { block: 4096 },
    );
    assert_sound(d, "base.qed");
    let base_md5 = md5(d, "base.qed");

    create(d, &["-b", "base.qed", "-F", "qed", "overlay.qed"]);
    let server = Served::start(d, &["--discard=unmap"], "overlay.qed");
    let changed = boot(
        d,
        "overlay-modify",
        &server.drive(false),
        Job::Modify { sums: base.sums() },
    );
    server.finish();
    assert_ne!(changed.sums(), base.sums(), "the guest changed nothing");
    assert!(changed.number("trimmed") >= SCRATCH);
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
    let differ = exits(d, QEMU_IMG, &["compare", "base.qed", "overlay.qed"], 1);
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
    let server = Served::start(d, &["--discard=unmap"], "base.qed");
    let base = boot(
        d,
        "base-write",
        &server.drive(false),
        Job::Write { block: 4096 },
    );
    server.finish();
    assert_sound(d, "base.qed");

    let mut nginx = common::nginx::Nginx::start();
    fs::copy(d.join("base.qed"), nginx.root().join("base.qed")).expect("copy the base");
    let url = nginx.url("base.qed");
    create(d, &["-b", &url, "-F", "qed", "overlay.qed"]);
    let control = d.join("control.sock");
    let control = control.to_str().expect("a UTF-8 path");
    // Slow enough that the guest runs while the stream does.
    let server = Served::start(
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
        &server.drive(false),
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
    server.stop();
    eprintln!("{}: stream while the guest ran: {during}", test_name());

    nginx.stop();
    let info: Value =
        serde_json::from_str(&ok(d, QEMU_IMG, &["info", "--output=json", "overlay.qed"]))
            .expect("qemu-img info JSON");
    assert!(info.get("backing-filename").is_none(), "{info}");
    let server = Served::start(d, &[], "overlay.qed");
    let checked = boot(
        d,
        "overlay-verify",
        &server.drive(true),
        Job::Verify {
            sums: changed.sums(),
        },
    );
    server.finish();
    assert_eq!(checked.files(), changed.files());
    assert_sound(d, "overlay.qed");
    finished("a guest on an http base while it streams", t);
}
