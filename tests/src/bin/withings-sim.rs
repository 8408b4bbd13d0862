//! Withings cloud simulator binary.
//!
//! ```text
//! withings-sim [--addr 127.0.0.1:PORT] [--page-size N] [--rate-limit-per-minute N] [--demo]
//! ```
//!
//! Prints exactly one line, `withings-sim listening on http://ADDR`, to
//! stdout once the socket is bound, then serves until SIGTERM or Ctrl-C.

use anyhow::bail;
use ohx_tests::sim_support::{FlagValue, run_binary};
use ohx_tests::withings_sim::{SimConfig, serve};

const USAGE: &str = "usage: withings-sim [--addr 127.0.0.1:PORT] [--page-size N] \
                     [--rate-limit-per-minute N] [--demo]";

/// The simulator's own flags; `Ok(false)` for a flag it does not know.
fn own_flag(flag: &str, value: &mut FlagValue<'_>, config: &mut SimConfig) -> anyhow::Result<bool> {
    match flag {
        "--page-size" => {
            config.page_size = value.parse("--page-size")?;
            if config.page_size == 0 {
                bail!("--page-size must be at least 1");
            }
        }
        "--rate-limit-per-minute" => {
            config.rate_limit_per_minute = value.parse("--rate-limit-per-minute")?;
        }
        "--demo" => config.demo = true,
        _ => return Ok(false),
    }
    Ok(true)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run_binary("withings-sim", USAGE, own_flag, serve).await
}
