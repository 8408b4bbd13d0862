//! Test harness.
pub mod fixtures;
pub mod google_health_sim;
pub mod kafka_util;
pub mod omron_sim;
pub mod sim_support;
pub mod stack;
pub mod withings_sim;
