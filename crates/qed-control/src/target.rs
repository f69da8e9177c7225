//! What a job runs on: the QED image an export serves, or nothing, with the reason.

use crate::error::ControlError;
use qed::BlockDevice;
use std::sync::Arc;

/// What a job (stream, compaction, defragmentation) would run on.
#[derive(Clone)]
pub enum JobTarget {
    /// The QED image being exported, shared with the export.
    Image(Arc<qed::Image>),
    /// No image a job can run on, and why not (for the error a request gets).
    Refused(String),
}

impl JobTarget {
    /// The image, for a job that writes into it (`what` it does, for the error):
    /// refused without one, or when it is open read-only.
    pub fn writable_image(&self, what: &str) -> Result<Arc<qed::Image>, ControlError> {
        match self {
            JobTarget::Image(image) if image.is_read_only() => Err(ControlError::generic(format!(
                "{} is open read-only: {what}",
                image.filename()
            ))),
            JobTarget::Image(image) => Ok(image.clone()),
            JobTarget::Refused(why) => Err(ControlError::generic(why.clone())),
        }
    }
}
