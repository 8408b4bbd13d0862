//! Google Health API (v4) simulator binary.
//!
//! ```text
//! google-health-sim [--addr 127.0.0.1:PORT] [--rate-limit-per-user N] [--no-retry-after]
//! ```
//!
//! Prints exactly one line, `google-health-sim listening on http://ADDR`, to stdout once the
//! socket is bound, then serves until SIGTERM or Ctrl-C.

use ohx_tests::google_health_sim::{SimConfig, serve};
use ohx_tests::sim_support::{FlagValue, run_binary};

const USAGE: &str = "usage: google-health-sim [--addr 127.0.0.1:PORT] [--rate-limit-per-user N] \
                     [--no-retry-after]\n\
                     \n  --addr ADDR               socket to bind (default 127.0.0.1:0)\
                     \n  --rate-limit-per-user N   /v4/users calls per user per minute, 0 = off \
                     (default 300)\
                     \n  --no-retry-after          answer 429 without a Retry-After header";

/// The simulator's own flags; `Ok(false)` for a flag it does not know.
fn own_flag(flag: &str, value: &mut FlagValue<'_>, config: &mut SimConfig) -> anyhow::Result<bool> {
    match flag {
        "--rate-limit-per-user" => {
            config.rate_limit_per_user = value.parse("--rate-limit-per-user")?;
        }
        "--no-retry-after" => config.retry_after = false,
        _ => return Ok(false),
    }
    Ok(true)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run_binary("google-health-sim", USAGE, own_flag, serve).await
}
