//! Withings cloud simulator binary.
//!
//! ```text
//! withings-sim [--addr 127.0.0.1:PORT] [--page-size N] [--rate-limit-per-minute N] [--demo]
//! ```
//!
//! Prints exactly one line, `withings-sim listening on http://ADDR`, to
//! stdout once the socket is bound, then serves until SIGTERM or Ctrl-C.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use ohx_tests::withings_sim::{SimConfig, serve};

const USAGE: &str = "usage: withings-sim [--addr 127.0.0.1:PORT] [--page-size N] \
                     [--rate-limit-per-minute N] [--demo]";

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
            "--page-size" => {
                let v = value("--page-size")?;
                config.page_size = v
                    .parse()
                    .with_context(|| format!("invalid --page-size {v:?}"))?;
                if config.page_size == 0 {
                    bail!("--page-size must be at least 1");
                }
            }
            "--rate-limit-per-minute" => {
                let v = value("--rate-limit-per-minute")?;
                config.rate_limit_per_minute = v
                    .parse()
                    .with_context(|| format!("invalid --rate-limit-per-minute {v:?}"))?;
            }
            "--demo" => config.demo = true,
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
                eprintln!("withings-sim: cannot listen for SIGTERM ({e}); Ctrl-C only");
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
        writeln!(out, "withings-sim listening on http://{local}")?;
        out.flush()?;
    }
    serve(listener, args.config, shutdown_signal()).await
}
