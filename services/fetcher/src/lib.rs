//! Fetches provider data for sync requests through the provider adapters of `ohx-providers`.
pub mod ledger;
pub mod links;
pub mod stage;
pub mod store;
