//! Test harnesses for the `qed` crates, built on the library's public [`qed::Storage`]
//! trait: storage that fails on purpose ([`FaultyStorage`]), storage that records every
//! operation so that crash states can be replayed ([`RecordingStorage`]), the stress
//! writer that process-kill tests run and kill ([`stress`]), a small runner for test
//! targets that need their own `main` ([`harness`]), the reading of the seeds and
//! settings tests take from their environment ([`settings`]), and a proxy that makes a
//! server on loopback answer as late as a distant one ([`DelayProxy`]). None of it ships
//! in the product: the crates use it only as a dev-dependency.

#![warn(missing_docs)]

mod delay_proxy;
mod faulty;
pub mod harness;
mod recording;
pub mod settings;
pub mod stress;

pub use delay_proxy::{DelayProxy, ProxyStats};
pub use faulty::{FaultKind, FaultPlan, FaultyStorage, OpKind};
pub use recording::{CrashLog, RecordedOp, RecordingStorage};
