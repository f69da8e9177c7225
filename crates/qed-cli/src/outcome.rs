//! How a concluded job ended, as `qed job` and the exports' logs say it.

use qed_control::{JobInfo, CANCELLED};

/// A job as `qed` names it in messages.
pub fn name(j: &JobInfo) -> String {
    format!("job '{}' ({})", j.id, j.kind)
}

/// How a concluded job ended, in one line: for `qed job` and `qed serve`'s log.
pub fn outcome(j: &JobInfo) -> String {
    match j.error.as_deref() {
        None => format!("{} completed", name(j)),
        Some(CANCELLED) => format!("{} cancelled at {} of {}", name(j), j.current, j.total),
        Some(e) => format!("{} failed: {}", name(j), e.replace('\n', " ")),
    }
}
