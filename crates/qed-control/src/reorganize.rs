//! The jobs that move clusters inside the image ([`qed::compact`], [`qed::defrag`]):
//! the `compact` and `defrag` commands, and a start for exports that run a compaction
//! on their own.

use crate::commands::Commands;
use crate::error::ControlError;
use crate::jobs::{JobEnd, JobSpec, Jobs};
use crate::target::JobTarget;
use crate::values::Return;
use qed::{BlockDevice, ReorganizeEnd, ReorganizeOptions};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Which job: the library's (re-exported under the name the control API uses).
pub use qed::Reorganization as Reorganize;

/// Starts a compaction or a defragmentation of `target`; returns its id (`id`, or a
/// generated one). Refused without a writable QED image, or while another job runs on
/// it.
pub fn start_reorganize(
    jobs: &Arc<Jobs>,
    target: &JobTarget,
    kind: Reorganize,
    id: Option<String>,
) -> Result<String, ControlError> {
    let image = target.writable_image(&format!("a {} moves clusters in it", kind.name()))?;
    let spec = JobSpec {
        kind: kind.name().into(),
        id,
        target: image.filename().to_string(),
    };
    jobs.start(spec, move |job| {
        let opts = ReorganizeOptions {
            cancel: Some(job.cancel_flag()),
            ..Default::default()
        };
        let mut progress = |done, total| job.set_progress(done, total);
        match kind.run(&image, &opts, &mut progress) {
            Ok(ReorganizeEnd::Done { .. }) => Ok(JobEnd::Completed),
            Ok(ReorganizeEnd::Cancelled { .. }) => Ok(JobEnd::Cancelled),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// Adds the `compact` and `defrag` commands: argument `job-id`; each returns
/// `{"id": JOB-ID}`.
pub fn add_reorganize_commands(commands: &mut Commands, target: JobTarget) {
    for kind in [Reorganize::Compact, Reorganize::Defrag] {
        let jobs = commands.jobs().clone();
        let target = target.clone();
        commands.add(kind.name(), &["job-id"], move |args| {
            let id = args.string("job-id")?.map(str::to_string);
            let id = start_reorganize(&jobs, &target, kind, id)?;
            Ok(Return::job_started(&id))
        });
    }
}

/// Whether `image` has freed at least `percent` of its file's length: what
/// `--compact-free` starts a compaction at.
pub fn freed_past(image: &qed::Image, percent: u8) -> bool {
    let Ok(len) = image.file_len() else {
        return false;
    };
    len > 0 && u128::from(image.freed_bytes()) * 100 >= u128::from(len) * u128::from(percent)
}

/// How often [`compact_when_freed`] looks.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Starts a compaction of `target` on its own whenever the bytes it freed reach
/// `percent` of its file's length (`qed serve --compact-free`), and no other job runs on
/// it; until `jobs` is closed. Free space a compaction could not use does not start
/// another: only more freed space does.
pub fn compact_when_freed(
    jobs: Arc<Jobs>,
    target: JobTarget,
    percent: u8,
) -> Result<JoinHandle<()>, ControlError> {
    if !(1..=100).contains(&percent) {
        return Err(ControlError::generic(
            "the share of free space that starts a compaction must be 1 to 100 percent",
        ));
    }
    let image = target.writable_image("a compaction moves clusters in it")?;
    Ok(std::thread::spawn(move || {
        let mut floor = 0;
        let mut running: Option<String> = None;
        while !jobs.is_closed() {
            if let Some(id) = &running {
                if jobs
                    .get(id)
                    .is_none_or(|j| j.status == crate::JobStatus::Concluded)
                {
                    floor = image.freed_bytes();
                    running = None;
                }
            } else if image.freed_bytes() > floor && freed_past(&image, percent) {
                running = start_reorganize(&jobs, &target, Reorganize::Compact, None).ok();
            } else if image.freed_bytes() < floor {
                // Reused by allocations meanwhile.
                floor = image.freed_bytes();
            }
            std::thread::sleep(WATCH_INTERVAL);
        }
    }))
}
