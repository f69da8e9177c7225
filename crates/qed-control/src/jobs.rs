//! The job registry: long operations, each on a thread of its own, with an id, a status
//! and progress, stopped through a flag the job looks at between its steps.
//!
//! A job is any closure given a [`JobControl`]; the registry knows nothing of what it
//! does. It keeps a finished job's outcome until the job is dismissed (or, past
//! [`MAX_CONCLUDED`], until newer outcomes push it out), so that whoever started it can
//! still read how it ended.

use crate::error::ControlError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

/// Jobs running at once, over all targets.
pub const MAX_RUNNING: usize = 16;
/// Concluded jobs kept until dismissed; past this the oldest are forgotten first.
pub const MAX_CONCLUDED: usize = 64;
/// Longest job id accepted.
pub const MAX_ID_LEN: usize = 128;
/// The error a cancelled job reports, in QEMU's words.
pub const CANCELLED: &str = "Operation canceled";

/// Where a job is in its life (QEMU's job statuses; these two are the ones used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// The job's closure is running (a cancel may have been asked for).
    Running,
    /// The job has ended: completed, failed or cancelled. It stays until dismissed.
    Concluded,
}

impl JobStatus {
    /// The status as QMP names it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Concluded => "concluded",
        }
    }
}

/// How a job's work ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// It did everything it was asked to.
    Completed,
    /// It saw the cancel flag and stopped early.
    Cancelled,
}

/// What a job's work returns: how it ended, or why it failed (for people).
pub type JobResult = Result<JobEnd, String>;

/// A job as `query-jobs` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// What kind of job it is (`stream`, ...).
    pub kind: String,
    /// Running or concluded.
    pub status: JobStatus,
    /// Progress so far, in units of `total` (bytes, for the jobs here).
    pub current: u64,
    /// Progress at the end, as far as it is known yet.
    pub total: u64,
    /// Why a concluded job did not complete ([`CANCELLED`] when cancelled); `None` for
    /// a running job and a completed one.
    pub error: Option<String>,
}

/// A job to start.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// What kind of job it is; also the stem of a generated id.
    pub kind: String,
    /// The id asked for; `None` generates one (`stream0`, `stream1`, ...).
    pub id: Option<String>,
    /// What the job works on (an image's name): one job at a time may run on it.
    pub target: String,
}

/// What a job's closure is handed: where to report progress, and the flag asking it to
/// stop.
#[derive(Debug)]
pub struct JobControl {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    id: String,
    current: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
}

impl JobControl {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Records progress: `current` of `total`.
    pub fn set_progress(&self, current: u64, total: u64) {
        self.shared.total.store(total, Ordering::Relaxed);
        self.shared.current.store(current, Ordering::Relaxed);
    }

    /// The flag set when the job is asked to stop; hand it to the operation.
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.shared.cancel
    }

    /// Whether the job has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.load(Ordering::Acquire)
    }
}

type Observer = Box<dyn Fn(&JobInfo) + Send + Sync>;

/// The jobs of one export: start, list, cancel, dismiss, and at the end stop them all.
#[derive(Default)]
pub struct Jobs {
    registry: Mutex<Registry>,
    observer: Mutex<Option<Observer>>,
}

#[derive(Default)]
struct Registry {
    /// In the order they were started.
    jobs: Vec<Entry>,
    /// The number in the next generated id.
    next_name: u64,
    /// The next job's sequence number: unlike ids, never reused.
    next_seq: u64,
    /// No new jobs: the export is shutting down.
    closed: bool,
}

struct Entry {
    seq: u64,
    kind: String,
    target: String,
    shared: Arc<Shared>,
    error: Option<String>,
    concluded: bool,
    thread: Option<JoinHandle<()>>,
}

impl Entry {
    fn info(&self) -> JobInfo {
        JobInfo {
            id: self.shared.id.clone(),
            kind: self.kind.clone(),
            status: if self.concluded {
                JobStatus::Concluded
            } else {
                JobStatus::Running
            },
            current: self.shared.current.load(Ordering::Relaxed),
            total: self.shared.total.load(Ordering::Relaxed),
            error: self.error.clone(),
        }
    }
}

impl Jobs {
    /// An empty registry, shared by the control socket and whoever else starts jobs.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Calls `f` with each job as it concludes (from the job's own thread, after the
    /// outcome is visible to `query-jobs`): for logging, or events.
    pub fn set_observer(&self, f: impl Fn(&JobInfo) + Send + Sync + 'static) {
        *lock(&self.observer) = Some(Box::new(f));
    }

    /// Starts `work` on a thread of its own as the job `spec` describes; returns its id.
    /// Refused when the id is malformed or taken, when another job is running on the
    /// same target, or once [`Jobs::close`] was called.
    pub fn start(
        self: &Arc<Self>,
        spec: JobSpec,
        work: impl FnOnce(&JobControl) -> JobResult + Send + 'static,
    ) -> Result<String, ControlError> {
        let mut reg = lock(&self.registry);
        if reg.closed {
            return Err(ControlError::generic(
                "the server is shutting down: it starts no new jobs",
            ));
        }
        if let Some(busy) = reg
            .jobs
            .iter()
            .find(|e| !e.concluded && e.target == spec.target)
        {
            return Err(ControlError::generic(format!(
                "{} is busy: job '{}' ({}) is running on it",
                spec.target, busy.shared.id, busy.kind
            )));
        }
        if reg.jobs.iter().filter(|e| !e.concluded).count() >= MAX_RUNNING {
            return Err(ControlError::generic(format!(
                "{MAX_RUNNING} jobs are running already"
            )));
        }
        let id = match spec.id {
            Some(id) => {
                if !well_formed(&id) {
                    return Err(ControlError::generic(format!(
                        "Invalid job ID '{}': it must start with a letter and hold only \
                         letters, digits, '-', '.' and '_' (at most {MAX_ID_LEN})",
                        id.chars().take(MAX_ID_LEN).collect::<String>()
                    )));
                }
                if reg.jobs.iter().any(|e| e.shared.id == id) {
                    return Err(ControlError::generic(format!(
                        "Job ID '{id}' already in use"
                    )));
                }
                id
            }
            None => loop {
                let id = format!("{}{}", spec.kind, reg.next_name);
                reg.next_name += 1;
                if !reg.jobs.iter().any(|e| e.shared.id == id) {
                    break id;
                }
            },
        };
        let seq = reg.next_seq;
        reg.next_seq += 1;
        let shared = Arc::new(Shared {
            id: id.clone(),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
        });
        let control = JobControl {
            shared: shared.clone(),
        };
        let registry = Arc::downgrade(self);
        // Spawned with the registry locked, so the job cannot conclude before it is in it.
        let thread = std::thread::Builder::new()
            .name(format!("job {id}"))
            .spawn(move || run(registry, seq, control, work))
            .map_err(|e| ControlError::generic(format!("could not start job '{id}': {e}")))?;
        reg.jobs.push(Entry {
            seq,
            kind: spec.kind,
            target: spec.target,
            shared,
            error: None,
            concluded: false,
            thread: Some(thread),
        });
        forget_old(&mut reg);
        Ok(id)
    }

    /// Every job, in the order they were started.
    pub fn list(&self) -> Vec<JobInfo> {
        lock(&self.registry).jobs.iter().map(Entry::info).collect()
    }

    /// The job `id`, if it is known.
    pub fn get(&self, id: &str) -> Option<JobInfo> {
        lock(&self.registry)
            .jobs
            .iter()
            .find(|e| e.shared.id == id)
            .map(Entry::info)
    }

    /// Asks the running job `id` to stop; it concludes once it has. Asking twice is
    /// harmless; a concluded job cannot be cancelled.
    pub fn cancel(&self, id: &str) -> Result<(), ControlError> {
        let reg = lock(&self.registry);
        let e = find(&reg, id)?;
        if e.concluded {
            return Err(refused(id, "concluded", "cancel"));
        }
        e.shared.cancel.store(true, Ordering::Release);
        Ok(())
    }

    /// Forgets the concluded job `id`.
    pub fn dismiss(&self, id: &str) -> Result<(), ControlError> {
        let mut reg = lock(&self.registry);
        if !find(&reg, id)?.concluded {
            return Err(refused(id, "running", "dismiss"));
        }
        reg.jobs.retain(|e| e.shared.id != id);
        Ok(())
    }

    /// Starts no more jobs and asks every running one to stop.
    pub fn close(&self) {
        let mut reg = lock(&self.registry);
        reg.closed = true;
        for e in &reg.jobs {
            e.shared.cancel.store(true, Ordering::Release);
        }
    }

    /// Whether [`Jobs::close`] was called.
    pub fn is_closed(&self) -> bool {
        lock(&self.registry).closed
    }

    /// Waits for every job's thread to end (call [`Jobs::close`] first, or this waits
    /// for them to finish their work).
    pub fn wait(&self) {
        let threads: Vec<JoinHandle<()>> = lock(&self.registry)
            .jobs
            .iter_mut()
            .filter_map(|e| e.thread.take())
            .collect();
        for t in threads {
            // A job that panicked has recorded that already.
            let _ = t.join();
        }
    }

    fn conclude(&self, seq: u64, error: Option<String>) {
        let info = {
            let mut reg = lock(&self.registry);
            let Some(e) = reg.jobs.iter_mut().find(|e| e.seq == seq) else {
                return;
            };
            e.concluded = true;
            e.error = error;
            let info = e.info();
            forget_old(&mut reg);
            info
        };
        if let Some(f) = lock(&self.observer).as_ref() {
            f(&info);
        }
    }
}

/// A job's thread: its work, then its outcome recorded.
fn run(
    registry: Weak<Jobs>,
    seq: u64,
    control: JobControl,
    work: impl FnOnce(&JobControl) -> JobResult,
) {
    let error = match catch_unwind(AssertUnwindSafe(|| work(&control))) {
        Ok(Ok(JobEnd::Completed)) => None,
        Ok(Ok(JobEnd::Cancelled)) => Some(CANCELLED.to_string()),
        Ok(Err(e)) => Some(e),
        Err(_) => Some("the job stopped on an internal error (a panic)".to_string()),
    };
    if let Some(jobs) = registry.upgrade() {
        jobs.conclude(seq, error);
    }
}

/// Drops the oldest concluded jobs past [`MAX_CONCLUDED`].
fn forget_old(reg: &mut Registry) {
    let mut excess = reg
        .jobs
        .iter()
        .filter(|e| e.concluded)
        .count()
        .saturating_sub(MAX_CONCLUDED);
    reg.jobs.retain(|e| {
        if excess > 0 && e.concluded {
            excess -= 1;
            return false;
        }
        true
    });
}

fn find<'a>(reg: &'a Registry, id: &str) -> Result<&'a Entry, ControlError> {
    reg.jobs
        .iter()
        .find(|e| e.shared.id == id)
        .ok_or_else(|| ControlError::generic(format!("Job '{}' not found", clip(id))))
}

fn refused(id: &str, status: &str, verb: &str) -> ControlError {
    ControlError::generic(format!(
        "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
    ))
}

/// QEMU's rule for ids: a letter, then letters, digits, '-', '.' and '_'.
fn well_formed(id: &str) -> bool {
    id.len() <= MAX_ID_LEN
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// An id from a client, cut short for an error message.
fn clip(id: &str) -> String {
    id.chars().take(MAX_ID_LEN).collect()
}

/// Job threads never panic while holding these locks; if one did, what it guarded is
/// still a consistent registry (every change is a single step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn spec(kind: &str, id: Option<&str>, target: &str) -> JobSpec {
        JobSpec {
            kind: kind.into(),
            id: id.map(str::to_string),
            target: target.into(),
        }
    }

    fn wait_concluded(jobs: &Jobs, id: &str) -> JobInfo {
        for _ in 0..500 {
            let info = jobs.get(id).unwrap();
            if info.status == JobStatus::Concluded {
                return info;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("job {id} did not conclude");
    }

    #[test]
    fn a_job_runs_reports_progress_and_concludes() {
        let jobs = Jobs::new();
        let (tx, rx) = mpsc::channel::<()>();
        let id = jobs
            .start(spec("stream", None, "a"), move |c| {
                c.set_progress(5, 10);
                rx.recv().ok();
                c.set_progress(10, 10);
                Ok(JobEnd::Completed)
            })
            .unwrap();
        assert_eq!(id, "stream0");
        // Busy while it runs: a second job on the same target is refused.
        let busy = jobs.start(spec("stream", None, "a"), |_| Ok(JobEnd::Completed));
        assert!(busy.unwrap_err().desc.contains("busy"));
        let err = jobs.dismiss(&id).unwrap_err();
        assert!(err.desc.contains("state 'running'"), "{err}");
        tx.send(()).unwrap();
        let info = wait_concluded(&jobs, &id);
        assert_eq!((info.current, info.total, info.error), (10, 10, None));
        assert!(jobs.cancel(&id).unwrap_err().desc.contains("'concluded'"));
        // Its id stays taken until it is dismissed.
        let again = jobs.start(spec("stream", Some("stream0"), "a"), |_| {
            Ok(JobEnd::Completed)
        });
        assert!(again.unwrap_err().desc.contains("already in use"));
        jobs.dismiss(&id).unwrap();
        assert!(jobs.get(&id).is_none());
        assert!(jobs.dismiss(&id).unwrap_err().desc.contains("not found"));
    }

    #[test]
    fn cancel_failure_and_panic_are_concluded_with_an_error() {
        let jobs = Jobs::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        jobs.set_observer(move |i| s.lock().unwrap().push(i.id.clone()));
        let slow = jobs
            .start(spec("stream", Some("slow"), "a"), |c| {
                while !c.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(JobEnd::Cancelled)
            })
            .unwrap();
        let failed = jobs
            .start(spec("stream", Some("f"), "b"), |_| Err("no".into()))
            .unwrap();
        let panicked = jobs
            .start(spec("stream", Some("p"), "c"), |_| panic!("on purpose"))
            .unwrap();
        jobs.cancel(&slow).unwrap();
        jobs.cancel(&slow).unwrap();
        assert_eq!(
            wait_concluded(&jobs, &slow).error.as_deref(),
            Some(CANCELLED)
        );
        assert_eq!(wait_concluded(&jobs, &failed).error.as_deref(), Some("no"));
        assert!(wait_concluded(&jobs, &panicked)
            .error
            .unwrap()
            .contains("panic"));
        jobs.wait();
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, ["f", "p", "slow"]);
    }

    #[test]
    fn ids_are_checked_and_generated_around_taken_ones() {
        let jobs = Jobs::new();
        for bad in ["", "1x", "a b", "a/b", &"a".repeat(MAX_ID_LEN + 1)] {
            let e = jobs.start(spec("stream", Some(bad), bad), |_| Ok(JobEnd::Completed));
            assert!(e.unwrap_err().desc.starts_with("Invalid job ID"), "{bad:?}");
        }
        jobs.start(spec("stream", Some("stream0"), "a"), |_| {
            Ok(JobEnd::Completed)
        })
        .unwrap();
        let id = jobs
            .start(spec("stream", None, "b"), |_| Ok(JobEnd::Completed))
            .unwrap();
        assert_ne!(id, "stream0");
    }

    #[test]
    fn close_cancels_running_jobs_and_refuses_new_ones() {
        let jobs = Jobs::new();
        let id = jobs
            .start(spec("stream", None, "a"), |c| {
                while !c.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(JobEnd::Cancelled)
            })
            .unwrap();
        jobs.close();
        jobs.wait();
        assert_eq!(jobs.get(&id).unwrap().status, JobStatus::Concluded);
        let e = jobs.start(spec("stream", None, "b"), |_| Ok(JobEnd::Completed));
        assert!(e.unwrap_err().desc.contains("shutting down"));
    }

    #[test]
    fn concluded_jobs_are_bounded() {
        let jobs = Jobs::new();
        for i in 0..MAX_CONCLUDED + 10 {
            let id = jobs
                .start(spec("x", None, &i.to_string()), |_| Ok(JobEnd::Completed))
                .unwrap();
            wait_concluded(&jobs, &id);
        }
        jobs.wait();
        assert_eq!(jobs.list().len(), MAX_CONCLUDED);
    }
}
