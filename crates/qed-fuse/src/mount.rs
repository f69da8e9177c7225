//! A mount from start to end: established by [`Mount::new`], served by [`Mount::run`]
//! until it is unmounted or stopped, and then closed with no request left on the device.

use crate::admission::Admission;
use crate::error::{Error, Result};
use crate::export::{Config, Export, MAX_REQUEST};
use crate::fs::{ExportFs, Layout, Shared};
use crate::mountpoint::{detach, is_mount_point, Mountpoint};
use fuser::{MountOption, Session, SessionACL, SessionUnmounter};
use qed::WorkerPool;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a stopped mount waits for the kernel to let the session go. Files still open
/// on the mount keep it until they are closed; the export has finished by then anyway.
const SESSION_GRACE: Duration = Duration::from_secs(2);

/// A mounted disk, ready to serve: the mount is in place and the kernel has agreed on the
/// protocol when [`Mount::new`] returns, and no thread has been started yet, so a process
/// may fork (to run in the background) between `new` and [`Mount::run`].
pub struct Mount {
    session: Session<ExportFs>,
    device: Arc<dyn qed::BlockDevice>,
    shared: Arc<Shared>,
    control: Arc<Control>,
    config: Config,
    mountpoint: Mountpoint,
    disk: PathBuf,
}

/// Stops a running [`Mount`] from another thread (a signal handler's, say).
#[derive(Clone)]
pub struct Stopper(Arc<Control>);

impl Stopper {
    /// Asks the mount to stop: requests already taken finish, later ones fail, the mount
    /// is taken away (detached if files on it are still open), and [`Mount::run`]
    /// returns. Asking again does nothing more.
    pub fn stop(&self) {
        let mut s = self.0.lock();
        s.stop = true;
        self.0.changed.notify_all();
    }
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stopper")
    }
}

/// What happened while the mount served.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Requests the device failed (I/O errors), which the clients saw as errors.
    pub failed_requests: u64,
    /// The first of those failures.
    pub first_failure: Option<String>,
}

/// Why a mount stops: asked to, or the session ended (unmounted).
#[derive(Default)]
struct ControlState {
    stop: bool,
    /// Set when the session's loop returned, with its error if it failed.
    ended: Option<Option<io::Error>>,
}

struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn session_ended(&self, result: io::Result<()>) {
        let mut s = self.lock();
        s.ended = Some(result.err());
        self.changed.notify_all();
    }

    /// Waits until the mount is stopped or its session ends; returns whether it was
    /// stopped (rather than unmounted from outside).
    fn wait(&self) -> bool {
        let mut s = self.lock();
        while !s.stop && s.ended.is_none() {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.ended.is_none()
    }

    /// Waits for the session to end, at most until `deadline` if there is one; returns
    /// its error, if any and if it ended.
    fn wait_ended(&self, deadline: Option<Instant>) -> Option<Option<io::Error>> {
        let mut s = self.lock();
        loop {
            if let Some(e) = s.ended.take() {
                return Some(e);
            }
            s = match deadline {
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

impl Mount {
    /// Mounts `export` on `mountpoint` (from [`crate::check_mountpoint`]): a file
    /// mountpoint becomes the disk, a directory shows it as `export.file_name`.
    pub fn new(export: Export, mountpoint: Mountpoint, config: Config) -> Result<Mount> {
        let (layout, disk) = disk_layout(&mountpoint, &export.file_name)?;
        let admission = Arc::new(Admission::new(
            export.device.clone(),
            config.max_requests,
            config.max_bytes,
        ));
        let shared = Arc::new(Shared::new(&export, layout, admission));
        let fs = ExportFs {
            shared: shared.clone(),
        };
        let fuse_config = fuse_config(&export, &config);
        let session = Session::new(fs, mountpoint.path(), &fuse_config).map_err(|cause| {
            let cause = if cause.kind() == io::ErrorKind::NotFound {
                io::Error::new(
                    cause.kind(),
                    format!(
                        "{cause} (without root, mounting needs fusermount3: apt-get install \
                         fuse3)"
                    ),
                )
            } else {
                cause
            };
            Error::Mount {
                path: mountpoint.path().to_path_buf(),
                cause,
            }
        })?;
        Ok(Mount {
            session,
            device: export.device.clone(),
            shared,
            control: Arc::new(Control {
                state: Mutex::new(ControlState::default()),
                changed: Condvar::new(),
            }),
            config,
            mountpoint,
            disk: disk.clone(),
        })
    }

    /// Where the disk can be opened: the mountpoint itself, or the file in it.
    pub fn disk_path(&self) -> &Path {
        &self.disk
    }

    /// A handle that stops [`Mount::run`] from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.control.clone())
    }

    /// Serves until the mount is unmounted (`fusermount3 -u`) or [`Stopper::stop`] is
    /// called. Returns once no request is left on the device; the caller then flushes
    /// and closes it. After a stop, files still open on the detached mount get errors
    /// until they are closed or this process exits.
    pub fn run(self) -> Result<Report> {
        let Mount {
            mut session,
            shared,
            control,
            config,
            mountpoint,
            device,
            ..
        } = self;
        let mut unmounter = session.unmount_callable();
        let pool = WorkerPool::start("fuse-worker", config.workers, Some(config.max_requests))
            .map_err(|cause| Error::Io {
                context: "starting the worker threads".into(),
                cause,
            })?;
        let pool = Arc::new(pool);
        let _ = shared.pool.set(pool.clone());
        let ring = crate::ring::start(
            shared.tally.clone(),
            pool,
            device.clone(),
            config.max_requests,
        );
        let ring_thread = ring.map(|(link, thread)| {
            let _ = shared.ring.set(link);
            thread
        });
        let ended = control.clone();
        let session_thread = std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || ended.session_ended(session.run()))
            .map_err(|cause| Error::Io {
                context: "starting the session thread".into(),
                cause,
            })?;

        let stopped = control.wait();
        // Nothing reaches the device from now on.
        shared.admission.close();
        let mut result = Ok(());
        if stopped {
            result = take_away(&mut unmounter, &mountpoint);
        }
        shared.admission.wait_idle();
        if let Some(link) = shared.ring.get() {
            link.send(crate::ring::Io::Stop);
        }
        if let Some(t) = ring_thread {
            let _ = t.join();
        }
        if let Some(pool) = shared.pool.get() {
            pool.stop();
        }
        let deadline = stopped.then(|| Instant::now() + SESSION_GRACE);
        match control.wait_ended(deadline) {
            Some(end) => {
                let _ = session_thread.join();
                if let (Some(cause), true) = (end, result.is_ok()) {
                    result = Err(Error::Io {
                        context: "serving the mount".into(),
                        cause,
                    });
                }
            }
            // Files still open hold the session; it ends with them, or with the process.
            None => drop(session_thread),
        }
        let (failed_requests, first_failure) = shared.tally.failures();
        result.map(|()| Report {
            failed_requests,
            first_failure,
        })
    }
}

/// How the disk appears on `mountpoint`, and its path: the mountpoint itself, or the
/// file `name` in it.
fn disk_layout(mountpoint: &Mountpoint, name: &str) -> Result<(Layout, PathBuf)> {
    Ok(match mountpoint {
        Mountpoint::File(p) => (Layout::File, p.clone()),
        Mountpoint::Directory(p) => {
            if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
                return Err(Error::Io {
                    context: format!("naming the disk in {}", p.display()),
                    cause: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("'{name}' cannot be a file name"),
                    ),
                });
            }
            (Layout::Directory(OsString::from(name)), p.join(name))
        }
    })
}

/// The mount options and session settings of `export`.
fn fuse_config(export: &Export, config: &Config) -> fuser::Config {
    let mut options = vec![
        MountOption::Subtype("qed".into()),
        // The kernel checks permissions against the file's mode, for every user
        // (with allow_other, others may then reach the file as its mode allows).
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::CUSTOM(format!("max_read={MAX_REQUEST}")),
        if export.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    // The image's name shows in the mount table, where fusermount3's option syntax
    // allows it.
    let name = export.device.filename();
    if !name.is_empty() && !name.contains([',', '\\', ' ', '\t', '\n']) {
        options.push(MountOption::FSName(format!("qed:{name}")));
    }
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = options;
    fuse_config.acl = if export.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_config.n_threads = Some(config.readers.max(1));
    fuse_config.clone_fd = true;
    fuse_config
}

/// Takes a stopped mount away: a plain unmount works when no file is open; otherwise the
/// mount is detached so that nothing new can open it, and goes once the last file
/// closes.
fn take_away(unmounter: &mut SessionUnmounter, mountpoint: &Mountpoint) -> Result<()> {
    if unmounter.unmount().is_err() && is_mount_point(mountpoint.path()) {
        if let Err(cause) = detach(mountpoint.path()) {
            return Err(Error::Io {
                context: format!("unmounting {}", mountpoint.path().display()),
                cause,
            });
        }
    }
    Ok(())
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount")
            .field("mountpoint", &self.mountpoint)
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}
