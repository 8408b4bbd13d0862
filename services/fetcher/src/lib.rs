//! Fetches provider data for sync requests and normalizes it to Measurements.
pub mod normalize;
pub mod stage;
pub mod store;
pub mod withings;
