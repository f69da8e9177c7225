//! `qed mount`: export an image through FUSE, in the manner of qemu-storage-daemon's
//! FUSE export: a regular file (or a file in a directory) reads and writes as the disk.

use super::FileContext;
use anyhow::{bail, Context, Result};
use qed_fuse::{Config, DiscardMode, Export, Mount, Mountpoint};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Mount an image as a file (FUSE).
#[derive(clap::Args)]
pub struct Args {
    /// Mount read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format: qed or raw (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Host cache mode: writeback (page cache) or none (O_DIRECT on the image, and no
    /// kernel cache on the mounted file).
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// Reads of clusters the image does not hold copy them in from its backing chain.
    #[arg(long = "copy-on-read")]
    copy_on_read: bool,
    /// Punched holes: ignore (a zero write), or unmap (discard in the image, then zero).
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// Let other users reach the mounted file (as its mode allows; needs user_allow_other
    /// in /etc/fuse.conf when not root).
    #[arg(long = "allow-other")]
    allow_other: bool,
    /// Run in the background once mounted.
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Write the serving process's id to this file once mounted.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Worker threads executing requests.
    #[arg(long = "workers", default_value_t = 16)]
    workers: usize,
    /// Bound on cached L2 table entries, in bytes (k, M suffixes).
    #[arg(long = "l2-cache-size", default_value = "16M")]
    l2_cache: String,
    /// Listen for control commands on this Unix socket, as qed serve --control does
    /// (stream, compact, defrag, query-jobs, job-cancel; see qed job).
    #[arg(long = "control")]
    control: Option<PathBuf>,
    /// Compact the image on its own whenever the space freed by discards reaches this
    /// share of the file, in percent.
    #[arg(long = "compact-free", value_parser = clap::value_parser!(u8).range(1..=100))]
    compact_free: Option<u8>,
    /// The image.
    file: PathBuf,
    /// An existing regular file (it becomes the disk) or directory (the disk appears in
    /// it under the image's name).
    mountpoint: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Runs `qed mount`: serves until the mount is unmounted (`fusermount3 -u`), SIGINT or
/// SIGTERM, then leaves the image clean.
pub fn run(a: Args) -> Result<u8> {
    let discard = parse_discard(&a.discard)?;
    let direct = super::parse_cache(&a.cache)?;
    let l2_cache_bytes = usize::try_from(crate::units::parse_size(&a.l2_cache)?)
        .context("--l2-cache-size is too large")?;
    let format = super::parse_format(a.format.as_deref())?;
    let file_name = a
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: the image needs a UTF-8 file name", a.file.display()))?
        .to_string();

    // Absolute: a daemon leaves the working directory.
    let pid_file = a
        .pid_file
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("--pid-file")?;

    // Everything that can refuse the mount is asked before the image is opened for
    // writing, so a refused mount never leaves the image marked in use.
    let place = qed_fuse::check_mountpoint(&a.mountpoint)?;
    qed_fuse::check_fuse_device()?;
    refuse_mounting_on_the_image(&a.file, &a.mountpoint, &place)?;

    // Absolute: a daemon leaves the working directory.
    let control_path = a
        .control
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("--control")?;
    if a.compact_free.is_some() && a.read_only {
        bail!("--compact-free moves clusters in the image: it cannot be mounted read-only (-r)");
    }
    let opened = super::open_for_jobs(
        &a.file,
        format,
        &qed::OpenOptions {
            image: qed::ImageOptions {
                read_only: a.read_only,
                l2_cache_bytes,
                copy_on_read: a.copy_on_read,
                ..a.remote.read_write().image
            },
            direct,
            ..a.remote.read_write()
        },
    )?;
    let (device, target) = super::job_target(opened, &a.file);
    if a.compact_free.is_some() {
        target
            .writable_image("--compact-free moves clusters in it")
            .map_err(|e| anyhow::anyhow!("--compact-free: {e}"))?;
    }
    if qed::chain_contains(&*device, place.path()) {
        bail!(
            "mountpoint {}: is a file of the image's backing chain; mount somewhere else",
            a.mountpoint.display()
        );
    }
    let export = Export {
        device: device.clone(),
        read_only: a.read_only,
        discard,
        direct_io: direct,
        allow_other: a.allow_other,
        file_name,
        allocation_from: a.file.canonicalize().ok(),
    };
    let config = Config {
        workers: a.workers,
        ..Config::default()
    };
    // Registered before the mount exists, so a signal from then on is never the default
    // (which would leave a dead mount and an image not closed); handled once serving.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("setting up signal handling")?;
    let mount = Mount::new(export, place, config)?;
    let banner = format!(
        "qed mount: {} mounted on {}{}",
        a.file.display(),
        mount.disk_path().display(),
        if a.read_only { " (read-only)" } else { "" }
    );
    // Threads do not survive a fork: in the background, the jobs and the control socket
    // start in the process that serves; in the foreground, before the banner says the
    // mount is ready.
    let jobs;
    if a.daemon {
        detach_from_caller(&banner, pid_file.as_deref())?;
        jobs = ExportJobs::start(&a, &target, control_path.as_deref())?;
    } else {
        jobs = ExportJobs::start(&a, &target, control_path.as_deref())?;
        if let Some(p) = &pid_file {
            write_pid_file(p, std::process::id())?;
        }
        println!("{banner}");
        std::io::stdout().flush().ok();
    }

    let stopper = mount.stopper();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                stopper.stop();
            }
        })
        .context("starting the signal thread")?;
    let served = mount.run();
    jobs.stop();
    drop(target);
    // No request is left on the device: make the image clean (flush, NEED_CHECK off).
    let flushed = device.flush();
    drop(device);
    if let Some(p) = &pid_file {
        std::fs::remove_file(p).ok();
    }
    let report = served.context("serving the mount")?;
    flushed.file_context("flushing", &a.file)?;
    if report.failed_requests > 0 {
        eprintln!(
            "qed mount: {} requests failed on {}; the first: {}",
            report.failed_requests,
            a.file.display(),
            report.first_failure.unwrap_or_default()
        );
    }
    Ok(0)
}

/// The jobs of the mount, its control socket and its `--compact-free` watcher.
struct ExportJobs {
    jobs: Arc<qed_control::Jobs>,
    control: Option<qed_control::ControlServer>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl ExportJobs {
    fn start(a: &Args, target: &qed_control::JobTarget, control: Option<&Path>) -> Result<Self> {
        let jobs = qed_control::Jobs::new();
        let name = a.file.display().to_string();
        jobs.set_observer(move |j| eprintln!("qed mount: {name}: {}", super::job::outcome(j)));
        let control = match control {
            Some(path) => {
                let commands = super::control_commands(&jobs, target);
                Some(qed_control::ControlServer::start(path, Arc::new(commands))?)
            }
            None => None,
        };
        let watcher = match a.compact_free {
            Some(percent) => Some(
                qed_control::compact_when_freed(jobs.clone(), target.clone(), percent)
                    .map_err(|e| anyhow::anyhow!("--compact-free: {e}"))?,
            ),
            None => None,
        };
        Ok(Self {
            jobs,
            control,
            watcher,
        })
    }

    /// Cancels what runs and waits for it; closes the control socket.
    fn stop(self) {
        self.jobs.close();
        if let Some(w) = self.watcher {
            let _ = w.join();
        }
        self.jobs.wait();
        if let Some(c) = self.control {
            c.stop();
        }
    }
}

fn parse_discard(discard: &str) -> Result<DiscardMode> {
    Ok(match discard {
        "ignore" | "off" => DiscardMode::Ignore,
        "unmap" | "on" => DiscardMode::Unmap,
        d => bail!("invalid --discard '{d}': use ignore or unmap"),
    })
}

/// Mounting on the image file would hide it behind itself.
fn refuse_mounting_on_the_image(image: &Path, given: &Path, place: &Mountpoint) -> Result<()> {
    if let (Mountpoint::File(p), Ok(image)) = (place, image.canonicalize()) {
        if *p == image {
            bail!(
                "mountpoint {}: is the image itself; mount on another file or a directory",
                given.display()
            );
        }
    }
    Ok(())
}

fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    std::fs::write(path, format!("{pid}\n"))
        .with_context(|| format!("could not write {}", path.display()))
}

/// Forks: the caller's process writes the pid file, prints `banner` and exits with
/// success once the mount is ready (it is: the mount exists and the kernel has agreed
/// on the protocol); the child serves, in a session of its own, with no terminal.
fn detach_from_caller(banner: &str, pid_file: Option<&Path>) -> Result<()> {
    std::io::stdout().flush().ok();
    std::io::stderr().flush().ok();
    // SAFETY: the process has one thread here (nothing has been spawned yet), so the
    // child inherits no lock held by another thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error())
            .context("could not fork to run in the background");
    }
    if pid > 0 {
        let code = match pid_file.map(|p| write_pid_file(p, pid as u32)) {
            Some(Err(e)) => {
                eprintln!("qed: {e:#}");
                1
            }
            _ => {
                println!("{banner}");
                0
            }
        };
        std::io::stdout().flush().ok();
        // Leave without running destructors: the mount and the image belong to the
        // child now, and dropping them here would unmount and close them.
        // SAFETY: ends this process only.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: plain system calls on this process's own state.
    unsafe {
        libc::setsid();
        // Holding no directory keeps every filesystem unmountable.
        libc::chdir(c"/".as_ptr());
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            // The caller's pipes close: whoever reads our output sees its end.
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
    Ok(())
}
