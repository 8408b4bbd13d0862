//! Google Health API (v4) simulator binary.
//!
//! ```text
//! google-health-sim [--addr 127.0.0.1:PORT] [--rate-limit-per-user N] [--no-retry-after]
//! ```
//!
//! Prints exactly one line, `google-health-sim listening on http://ADDR`, to stdout once the
//! socket is bound, then serves until SIGTERM or Ctrl-C.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use ohx_tests::google_health_sim::{SimConfig, serve};

const USAGE: &str = "usage: google-health-sim [--addr 127.0.0.1:PORT] [--rate-limit-per-user N] \
                     [--no-retry-after]\n\
                     \n  --addr ADDR               socket to bind (default 127.0.0.1:0)\
                     \n  --rate-limit-per-user N   /v4/users calls per user per minute, 0 = off \
                     (default 300)\
                     \n  --no-retry-after          answer 429 without a Retry-After header";

struct Args {
    addr: SocketAddr,
    config: SimConfig,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Args>> {
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = SimConfig::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .with_context(|| format!("{name} needs a value\n{USAGE}")),
            }
        };
        match flag.as_str() {
            "--addr" => {
                let v = value("--addr")?;
                addr = v.parse().with_context(|| format!("invalid --addr {v:?}"))?;
            }
            "--rate-limit-per-user" => {
                let v = value("--rate-limit-per-user")?;
                config.rate_limit_per_user = v
                    .parse()
                    .with_context(|| format!("invalid --rate-limit-per-user {v:?}"))?;
            }
            "--no-retry-after" => config.retry_after = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(Args { addr, config }))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                eprintln!("google-health-sim: cannot listen for SIGTERM ({e}); Ctrl-C only");
                // An error here means no Ctrl-C handler either: serve until killed.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(args) = parse_args(std::env::args().skip(1))? else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let local = listener.local_addr().context("reading the bound address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "google-health-sim listening on http://{local}")?;
        out.flush()?;
    }
    serve(listener, args.config, shutdown_signal()).await
}
