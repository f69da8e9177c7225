//! Whole-image operations over devices. None of them prints.

pub mod map;
