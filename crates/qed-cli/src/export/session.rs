//! An export from its open to its clean close: the image and what its jobs run on, the
//! jobs with their control socket and `--compact-free` watcher, the signal thread and
//! the pid file. The server (NBD or FUSE) runs between the two; a command starts each
//! part where its own order needs it (a mount in the background starts threads only
//! after it forks).

use super::ExportArgs;
use crate::open::{open_for_jobs, Opened};
use anyhow::{anyhow, bail, Context, Result};
use qed::BlockDevice;
use qed_control::{Commands, ControlServer, JobTarget, Jobs};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Which command exports: it names the log lines and the refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `qed serve`, over NBD.
    Serve,
    /// `qed mount`, through FUSE.
    Mount,
}

impl Kind {
    fn command(self) -> &'static str {
        match self {
            Kind::Serve => "serve",
            Kind::Mount => "mount",
        }
    }

    fn exported(self) -> &'static str {
        match self {
            Kind::Serve => "exported",
            Kind::Mount => "mounted",
        }
    }
}

/// An open export: its device, its jobs and what ends with it.
pub struct Session {
    device: Arc<dyn BlockDevice>,
    target: JobTarget,
    jobs: Arc<Jobs>,
    control: Option<ControlServer>,
    watcher: Option<JoinHandle<()>>,
    signals: Option<(Handle, JoinHandle<()>)>,
    pid_file: Option<PathBuf>,
    /// Files the export made, removed once the image is closed.
    made: Vec<PathBuf>,
}

/// SIGINT and SIGTERM, registered: from here on they are the export's to handle (see
/// [`Session::on_signal`]), never the default that would leave the image unclosed.
pub fn signals() -> Result<Signals> {
    Signals::new([SIGINT, SIGTERM]).context("setting up signal handling")
}

impl Session {
    /// Opens the export's image (a QED image read-write with NEED_CHECK set is repaired
    /// first), refusing `--compact-free` where it cannot run. No thread is started.
    pub fn open(a: &ExportArgs, kind: Kind) -> Result<Session> {
        if a.compact_free.is_some() && a.read_only {
            bail!(
                "--compact-free moves clusters in the image: it cannot be {} read-only (-r)",
                kind.exported()
            );
        }
        // Absolute: a mount in the background leaves the working directory.
        let pid_file = a
            .pid_file
            .as_deref()
            .map(std::path::absolute)
            .transpose()
            .context("--pid-file")?;
        let opened = open_for_jobs(&a.file, a.format, &a.open_options())?;
        let (device, target) = job_target(opened, &a.file);
        if a.compact_free.is_some() {
            target
                .writable_image("--compact-free moves clusters in it")
                .map_err(|e| anyhow!("--compact-free: {e}"))?;
        }
        let jobs = Jobs::new();
        let (command, name) = (kind.command(), a.file.display().to_string());
        jobs.set_observer(move |j| {
            eprintln!("qed {command}: {name}: {}", crate::outcome::outcome(j))
        });
        Ok(Session {
            device,
            target,
            jobs,
            control: None,
            watcher: None,
            signals: None,
            pid_file,
            made: Vec::new(),
        })
    }

    /// The device the server serves.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// What the export's jobs run on.
    pub fn target(&self) -> &JobTarget {
        &self.target
    }

    /// The export's jobs.
    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// The pid file asked for, as an absolute path.
    pub fn pid_file(&self) -> Option<&Path> {
        self.pid_file.as_deref()
    }

    /// Where the control socket listens, once started.
    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_ref().map(|c| c.path())
    }

    /// Starts the control socket at `path`, if one is asked for. Refused (in use by a
    /// live server), it leaves nothing behind.
    pub fn start_control(&mut self, path: Option<&Path>) -> Result<()> {
        if let Some(path) = path {
            let commands = control_commands(&self.jobs, &self.target);
            self.control = Some(ControlServer::start(path, Arc::new(commands))?);
        }
        Ok(())
    }

    /// Starts the `--compact-free` watcher, if asked for.
    pub fn watch_freed(&mut self, percent: Option<u8>) -> Result<()> {
        if let Some(percent) = percent {
            let watcher =
                qed_control::compact_when_freed(self.jobs.clone(), self.target.clone(), percent)
                    .map_err(|e| anyhow!("--compact-free: {e}"))?;
            self.watcher = Some(watcher);
        }
        Ok(())
    }

    /// Runs `stop` on each signal of `signals`, in a thread of its own.
    pub fn on_signal(
        &mut self,
        mut signals: Signals,
        mut stop: impl FnMut() + Send + 'static,
    ) -> Result<()> {
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for _ in signals.forever() {
                    stop();
                }
            })
            .context("starting the signal thread")?;
        self.signals = Some((handle, thread));
        Ok(())
    }

    /// Writes `pid` to the pid file, if one is asked for; it is removed at the close.
    pub fn write_pid_file(&self, pid: u32) -> Result<()> {
        match &self.pid_file {
            Some(path) => write_pid_file(path, pid),
            None => Ok(()),
        }
    }

    /// Removes `path` once the image is closed (a socket the server made).
    pub fn remove_at_close(&mut self, path: &Path) {
        self.made.push(path.to_path_buf());
    }

    /// Ends the export once the server has stopped: cancels the jobs still running and
    /// waits for them, closes the control socket, then leaves the image clean (flushed,
    /// NEED_CHECK off) and removes the files the export made. Returns the flush's
    /// result.
    pub fn close(self) -> qed::Result<()> {
        self.jobs.close();
        if let Some(w) = self.watcher {
            let _ = w.join();
        }
        self.jobs.wait();
        if let Some(c) = self.control {
            c.stop();
        }
        if let Some((handle, thread)) = self.signals {
            handle.close();
            let _ = thread.join();
        }
        drop(self.target);
        // No request is left on the device.
        let flushed = self.device.flush();
        drop(self.device);
        // Errors do not matter any more.
        for path in self.made.iter().chain(&self.pid_file) {
            std::fs::remove_file(path).ok();
        }
        flushed
    }
}

/// Writes `pid` to `path`, as a pid file holds it.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    std::fs::write(path, format!("{pid}\n"))
        .with_context(|| format!("could not write {}", path.display()))
}

/// The device an export serves, and what its jobs run on: a QED image is shared by the
/// export and its jobs; anything else has no jobs.
fn job_target(opened: Opened, file: &Path) -> (Arc<dyn BlockDevice>, JobTarget) {
    match opened {
        Opened::Qed(image) => {
            let image: Arc<qed::Image> = Arc::from(image);
            (image.clone(), JobTarget::Image(image))
        }
        Opened::Other(device) => {
            let why = format!(
                "{} is a {} image: only a QED image runs jobs (stream, compact, defrag)",
                file.display(),
                device.format()
            );
            (Arc::from(device), JobTarget::Refused(why))
        }
    }
}

/// The commands of an export's control socket: the job commands, and those that start
/// a stream, a compaction and a defragmentation of `target`.
fn control_commands(jobs: &Arc<Jobs>, target: &JobTarget) -> Commands {
    let mut commands = Commands::new(jobs.clone());
    qed_control::add_stream_command(&mut commands, target.clone());
    qed_control::add_reorganize_commands(&mut commands, target.clone());
    commands
}
