//! Configuration from environment variables. Every variable is listed in the README.

use std::str::FromStr;
use std::time::Duration;

/// A configuration variable that is missing or cannot be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is required")]
    Missing(String),
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid { name: String, reason: String },
}

/// Returns the variable's value, or `default` when it is unset or empty.
pub fn string(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => default.to_string(),
    }
}

/// This process's name among replicas: `OHX_INSTANCE`, else `HOSTNAME` (a Kubernetes pod's
/// name), else `pid-<process id>`.
pub fn instance_name() -> String {
    let fallback = format!("pid-{}", std::process::id());
    string("OHX_INSTANCE", &string("HOSTNAME", &fallback))
}

/// Returns the variable's value, or an error when it is unset or empty.
pub fn required(name: &str) -> Result<String, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ConfigError::Missing(name.to_string())),
    }
}

/// Returns the variable parsed as `T`, or `default` when it is unset or empty.
pub fn parse<T>(name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse::<T>().map_err(|e| ConfigError::Invalid {
            name: name.to_string(),
            reason: e.to_string(),
        }),
        _ => Ok(default),
    }
}

/// Returns a duration given in milliseconds, or `default_ms` when unset.
pub fn millis(name: &str, default_ms: u64) -> Result<Duration, ConfigError> {
    parse::<u64>(name, default_ms).map(Duration::from_millis)
}
