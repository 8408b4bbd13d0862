//! Test harness.
pub mod withings_sim;
pub mod kafka_util;
pub mod stack;
