//! Errors about files, named once.

use anyhow::Result;
use std::path::Path;

/// Context for an error about a file: what the file was for, and its name unless the
/// error names it already (the library's errors do), so that the name appears once.
pub trait FileContext<T> {
    /// Wraps the error as `what NAME: error`, or `what: error` when it names the file.
    fn file_context(self, what: &str, path: &Path) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> FileContext<T> for std::result::Result<T, E> {
    fn file_context(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| {
            let name = path.display().to_string();
            let e = anyhow::Error::new(e);
            if e.to_string().contains(&name) {
                e.context(what.to_string())
            } else {
                e.context(format!("{what} {name}"))
            }
        })
    }
}
