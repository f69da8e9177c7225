//! Warnings the library cannot return as errors because the work goes on (a file system
//! that cannot lock files, say). The library never prints: a program that wants them
//! shown installs a handler once, and without one they are dropped.

use std::sync::OnceLock;

type Handler = Box<dyn Fn(&str) + Send + Sync>;

static HANDLER: OnceLock<Handler> = OnceLock::new();

/// Installs the function that receives the library's warnings, for the life of the
/// process. Returns false, leaving the first in place, when one is installed already.
pub fn set_warning_handler(handler: impl Fn(&str) + Send + Sync + 'static) -> bool {
    HANDLER.set(Box::new(handler)).is_ok()
}

/// Hands `message` to the installed handler, if any.
pub(crate) fn warn(message: &str) {
    if let Some(h) = HANDLER.get() {
        h(message);
    }
}
