//! The stream job ([`qed::stream`]): the `stream` command, and a start for exports that
//! run one at launch.

use crate::commands::Commands;
use crate::error::ControlError;
use crate::jobs::{JobEnd, JobSpec, Jobs};
use crate::target::JobTarget;
use crate::values::Return;
use qed::{BlockDevice, StreamEnd, StreamOptions};
use std::sync::Arc;

/// A stream to start.
#[derive(Debug, Default, Clone)]
pub struct StreamRequest {
    /// The job's id; `None` generates one.
    pub id: Option<String>,
    /// The backing file that stays (a name in the image's chain); `None` streams
    /// everything and leaves no backing file.
    pub base: Option<String>,
    /// Bytes per second at most; `None` for no limit.
    pub rate: Option<u64>,
}

/// Starts a stream job on `target`; returns its id. What can be known before the job
/// runs (a read-only image, an unknown base, a zero rate, another job on the image) is
/// refused here rather than reported by a failed job.
pub fn start_stream(
    jobs: &Arc<Jobs>,
    target: &JobTarget,
    req: StreamRequest,
) -> Result<String, ControlError> {
    let image = target.writable_image("a stream writes into it")?;
    if req.rate == Some(0) {
        return Err(ControlError::generic(
            "'rate' must be more than 0 bytes per second (leave it out for no limit)",
        ));
    }
    let base = req
        .base
        .as_deref()
        .map(|b| qed::stream_base(&image, b))
        .transpose()
        .map_err(|e| ControlError::generic(e.to_string()))?;
    let spec = JobSpec {
        kind: "stream".into(),
        id: req.id,
        target: image.filename().to_string(),
    };
    let rate = req.rate;
    jobs.start(spec, move |job| {
        let opts = StreamOptions {
            base,
            rate,
            cancel: Some(job.cancel_flag()),
        };
        match qed::stream(&image, &opts, &mut |done, total| {
            job.set_progress(done, total)
        }) {
            Ok(StreamEnd::Done { .. }) => Ok(JobEnd::Completed),
            Ok(StreamEnd::Cancelled { .. }) => Ok(JobEnd::Cancelled),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// Adds the `stream` command: arguments `job-id`, `base` and `rate` as
/// [`StreamRequest`] has them; returns `{"id": JOB-ID}` (QEMU's block-stream returns
/// `{}`, but here an id left out is generated, so the client is told it).
pub fn add_stream_command(commands: &mut Commands, target: JobTarget) {
    let jobs = commands.jobs().clone();
    commands.add("stream", &["job-id", "base", "rate"], move |args| {
        let req = StreamRequest {
            id: args.string("job-id")?.map(str::to_string),
            base: args.string("base")?.map(str::to_string),
            rate: args.u64("rate")?,
        };
        let id = start_stream(&jobs, &target, req)?;
        Ok(Return::job_started(&id))
    });
}
