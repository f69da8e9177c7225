//! Errors as QMP reports them: a class and a description for people.

use std::fmt;

/// The QMP error classes this server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Anything but an unknown command: bad input, a refused or failed request.
    GenericError,
    /// The command does not exist.
    CommandNotFound,
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }

    /// The class named `s` on the wire; classes this server never sends are generic.
    pub fn from_wire(s: &str) -> Self {
        match s {
            "CommandNotFound" => ErrorClass::CommandNotFound,
            _ => ErrorClass::GenericError,
        }
    }
}

/// A command's failure, sent as `{"error":{"class":...,"desc":...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlError {
    /// The error's class.
    pub class: ErrorClass,
    /// What went wrong, for people.
    pub desc: String,
}

impl ControlError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// The `CommandNotFound` answer for `name`, worded as QEMU words it.
    pub fn command_not_found(name: &str) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {name} has not been found"),
        }
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for ControlError {}
