//! The allocation gate: allocations hold it shared from "NEED_CHECK is set" until their
//! entries are set; clearing NEED_CHECK and whole-image walks (check, repair) hold it
//! exclusively, so that neither runs while an allocation's metadata may be unwritten.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Shared by allocations, exclusive for NEED_CHECK changes and whole-image walks.
#[derive(Debug, Default)]
pub(crate) struct AllocationGate(RwLock<()>);

/// An allocation's shared hold on the gate.
pub(crate) type GateHold<'a> = RwLockReadGuard<'a, ()>;

impl AllocationGate {
    pub(crate) fn shared(&self) -> GateHold<'_> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Shared, unless that would mean waiting.
    pub(crate) fn try_shared(&self) -> Option<GateHold<'_>> {
        match self.0.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}
