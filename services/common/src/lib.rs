//! Shared runtime of the ohx stages: the Avro records and codec, the one Kafka
//! consumer/producer loop, topic definitions and the retention guard, telemetry and admin
//! endpoints, the configuration database, and secret encryption.
pub mod admin;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod db;
pub mod kafka;
#[cfg(feature = "oauth")]
pub mod oauth_http;
pub mod ratelimit;
pub mod records;
pub mod rotate;
pub mod service;
pub mod target_status;
pub mod telemetry;
pub mod topics;
pub mod trace;

/// Every ohx binary links this crate, so every one allocates with mimalloc (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
