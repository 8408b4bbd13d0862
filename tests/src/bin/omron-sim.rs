//! Omron Wellness API simulator binary.
//!
//! ```text
//! omron-sim [--addr 127.0.0.1:PORT] [--rate-limit-per-minute N]
//! ```
//!
//! Prints exactly one line, `omron-sim listening on http://ADDR`, to stdout once the socket is
//! bound, then serves until SIGTERM or Ctrl-C.

use ohx_tests::omron_sim::{SimConfig, serve};
use ohx_tests::sim_support::{FlagValue, run_binary};

const USAGE: &str = "usage: omron-sim [--addr 127.0.0.1:PORT] [--rate-limit-per-minute N]\n\
                     \n  --addr ADDR                 socket to bind (default 127.0.0.1:0)\
                     \n  --rate-limit-per-minute N   per-user /api/measurement calls per minute, \
                     0 = off (default 0)";

/// The simulator's own flags; `Ok(false)` for a flag it does not know.
fn own_flag(flag: &str, value: &mut FlagValue<'_>, config: &mut SimConfig) -> anyhow::Result<bool> {
    match flag {
        "--rate-limit-per-minute" => {
            config.rate_limit_per_minute = value.parse("--rate-limit-per-minute")?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run_binary("omron-sim", USAGE, own_flag, serve).await
}
