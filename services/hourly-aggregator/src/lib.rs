//! Aggregates HOURLY series into one statistic per series and UTC hour.

pub mod stage;
pub mod window;
