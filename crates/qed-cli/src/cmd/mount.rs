//! `qed mount`: export an image through FUSE, in the manner of qemu-storage-daemon's
//! FUSE export: a regular file (or a file in a directory) reads and writes as the disk.

use crate::context::FileContext;
use crate::export::{signals, write_pid_file, ExportArgs, Kind, Session};
use anyhow::{bail, Context, Result};
use qed_fuse::{Config, Export, Mount, Mountpoint};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Mount an image as a file (FUSE).
#[derive(clap::Args)]
pub struct Args {
    /// Let other users reach the mounted file (as its mode allows; needs user_allow_other
    /// in /etc/fuse.conf when not root).
    #[arg(long = "allow-other")]
    allow_other: bool,
    /// Run in the background once mounted.
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Worker threads executing requests.
    #[arg(long = "workers", default_value_t = 16)]
    workers: usize,
    /// An existing regular file (it becomes the disk) or directory (the disk appears in
    /// it under the image's name).
    // Declared before the export's options, whose remote ones end in a heading of their
    // own; placed after the image.
    #[arg(index = 2)]
    mountpoint: PathBuf,
    #[command(flatten)]
    export: ExportArgs,
}

/// Runs `qed mount`: serves until the mount is unmounted (`fusermount3 -u`), SIGINT or
/// SIGTERM, then leaves the image clean.
pub fn run(a: Args) -> Result<u8> {
    let file = &a.export.file;
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: the image needs a UTF-8 file name", file.display()))?
        .to_string();
    // Everything that can refuse the mount is asked before the image is opened for
    // writing, so a refused mount never leaves the image marked in use.
    let place = qed_fuse::check_mountpoint(&a.mountpoint)?;
    qed_fuse::check_fuse_device()?;
    refuse_mounting_on_the_image(file, &a.mountpoint, &place)?;
    // Absolute: a daemon leaves the working directory.
    let control = a
        .export
        .control
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("--control")?;
    let mut session = Session::open(&a.export, Kind::Mount)?;
    let export = fuse_export(&a, &session, &place, file_name)?;
    let config = Config {
        workers: a.workers,
        ..Config::default()
    };
    // Registered before the mount exists, so a signal from then on is never the default
    // (which would leave a dead mount and an image not closed); handled once serving.
    let signals = signals()?;
    let mount = Mount::new(export, place, config)?;
    let banner = format!(
        "qed mount: {} mounted on {}{}",
        file.display(),
        mount.disk_path().display(),
        if a.export.read_only {
            " (read-only)"
        } else {
            ""
        }
    );
    // Threads do not survive a fork: in the background, the jobs and the control socket
    // start in the process that serves; in the foreground, before the banner says the
    // mount is ready.
    if a.daemon {
        detach_from_caller(&banner, session.pid_file())?;
    }
    session.start_control(control.as_deref())?;
    session.watch_freed(a.export.compact_free)?;
    if !a.daemon {
        session.write_pid_file(std::process::id())?;
        println!("{banner}");
        std::io::stdout().flush().ok();
    }
    let stopper = mount.stopper();
    session.on_signal(signals, move || stopper.stop())?;
    let served = mount.run();
    let flushed = session.close();
    let report = served.context("serving the mount")?;
    flushed.file_context("flushing", file)?;
    if report.failed_requests > 0 {
        eprintln!(
            "qed mount: {} requests failed on {}; the first: {}",
            report.failed_requests,
            file.display(),
            report.first_failure.unwrap_or_default()
        );
    }
    Ok(0)
}

/// What is mounted: the device and the mount's settings. Refused when the mountpoint is
/// a file of the image's backing chain.
fn fuse_export(
    a: &Args,
    session: &Session,
    place: &Mountpoint,
    file_name: String,
) -> Result<Export> {
    if qed::chain_contains(&**session.device(), place.path()) {
        bail!(
            "mountpoint {}: is a file of the image's backing chain; mount somewhere else",
            a.mountpoint.display()
        );
    }
    Ok(Export {
        device: session.device().clone(),
        read_only: a.export.read_only,
        discard: a.export.discard,
        direct_io: a.export.cache.direct(),
        allow_other: a.allow_other,
        file_name,
        allocation_from: a.export.file.canonicalize().ok(),
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
