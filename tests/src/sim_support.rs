//! Plumbing shared by the provider-cloud simulators ([`withings_sim`](crate::withings_sim),
//! [`omron_sim`](crate::omron_sim), [`google_health_sim`](crate::google_health_sim)) and their
//! binaries: form / query parameter decoding, `Authorization` header parsing, the `/_sim`
//! control API's JSON helpers, the sliding rate-limit window, serving a router, and the
//! binaries' `--addr` handling, ready line and shutdown signal.
//!
//! Only what is the same in every simulator lives here; what differs because the simulators
//! imitate different clouds (the error bodies of the provider APIs, Withings' trimmed
//! parameters, …) stays in the simulator.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::Rng as _;
use serde_json::json;
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

/// Decoded query or form parameters; a repeated key keeps its last value.
pub type Params = HashMap<String, String>;

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decoding; `+` is a space when `plus` is set (form encoding). An invalid escape
/// (`%` not followed by two hex digits) is kept as is; invalid UTF-8 becomes U+FFFD.
///
/// Hand-written rather than `form_urlencoded` / `percent-encoding`: those are only indirect
/// dependencies of this crate.
pub fn percent_decode(s: &str, plus: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = (b == b'%')
            .then(|| {
                let hi = bytes.get(i + 1).copied().and_then(hex_val)?;
                let lo = bytes.get(i + 2).copied().and_then(hex_val)?;
                Some(hi * 16 + lo)
            })
            .flatten();
        match (b, escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b'+', None) if plus => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `application/x-www-form-urlencoded` component decoding (`+` is a space).
pub fn form_decode(s: &str) -> String {
    percent_decode(s, true)
}

/// Adds the pairs of a form body or a query string to `out`; a key already there (or repeated)
/// takes the later value.
pub fn parse_form_into(s: &str, out: &mut Params) {
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(form_decode(k), form_decode(v));
    }
}

/// Parses a form body or a query string; a repeated key keeps its last value.
pub fn parse_form(s: &str) -> Params {
    let mut params = Params::new();
    parse_form_into(s, &mut params);
    params
}

/// A non-empty parameter, as given (not trimmed).
pub fn param<'a>(p: &'a Params, key: &str) -> Option<&'a str> {
    p.get(key).map(String::as_str).filter(|s| !s.is_empty())
}

/// Whether the request body is declared `application/x-www-form-urlencoded`.
pub fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

// ---------------------------------------------------------------------------
// Authorization header
// ---------------------------------------------------------------------------

/// The non-empty token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The Bearer token of the `Authorization` header, else the non-empty `access_token` query or
/// form parameter (as given).
pub fn bearer_or_access_token<'a>(headers: &'a HeaderMap, params: &'a Params) -> Option<&'a str> {
    bearer_token(headers).or_else(|| param(params, "access_token"))
}

/// An `Authorization` header that is not text, or a Basic value that is not
/// `base64(id:secret)`; the simulators answer `invalid_client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedBasic;

/// Client id and secret from HTTP Basic, `base64(urlencode(id):urlencode(secret))` (RFC 6749
/// §2.3.1), form-decoded. `Ok(None)` when there is no `Authorization` header or it names another
/// scheme (the caller falls back to the form).
pub fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, MalformedBasic> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| MalformedBasic)?.trim();
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let raw = STANDARD
        .decode(encoded.trim())
        .map_err(|_| MalformedBasic)?;
    let text = String::from_utf8(raw).map_err(|_| MalformedBasic)?;
    let (id, secret) = text.split_once(':').ok_or(MalformedBasic)?;
    Ok(Some((form_decode(id), form_decode(secret))))
}

// ---------------------------------------------------------------------------
// Tokens and rate limits
// ---------------------------------------------------------------------------

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(buf.as_mut_slice());
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The length of the sliding rate-limit window.
pub const RATE_WINDOW_MS: i64 = 60_000;

/// Sliding 60 s window of admitted requests (`limit` 0: no limit); `Err` carries the
/// `Retry-After` seconds. A refused request is not counted.
pub fn rate_limit_admit(window: &mut VecDeque<i64>, limit: usize, now_ms: i64) -> Result<(), i64> {
    if limit == 0 {
        return Ok(());
    }
    while window
        .front()
        .is_some_and(|t| *t <= now_ms - RATE_WINDOW_MS)
    {
        window.pop_front();
    }
    if window.len() >= limit {
        let wait_ms = window
            .front()
            .map_or(RATE_WINDOW_MS, |oldest| oldest + RATE_WINDOW_MS - now_ms);
        return Err(((wait_ms + 999) / 1_000).max(1));
    }
    window.push_back(now_ms);
    Ok(())
}

// ---------------------------------------------------------------------------
// Control API (`/_sim`, JSON, the same in every simulator)
// ---------------------------------------------------------------------------

/// A control API error: `status` with `{"error":"<message>"}`.
pub fn sim_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// 404 `{"error":"unknown user <user>"}`.
pub fn unknown_user(user: impl std::fmt::Display) -> Response {
    sim_error(StatusCode::NOT_FOUND, format!("unknown user {user}"))
}

/// A control request with an unreadable body (HTTP 400).
#[derive(Debug)]
pub struct BadBody(pub String);

impl IntoResponse for BadBody {
    fn into_response(self) -> Response {
        sim_error(StatusCode::BAD_REQUEST, self.0)
    }
}

/// Parses a JSON control body; an empty body means `{}`.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, BadBody> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(text).map_err(|e| BadBody(format!("invalid JSON body: {e}")))
}

/// `GET /_sim/health` → 200 `{"status":"ok"}`.
pub async fn sim_health() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

// ---------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------

/// The client a simulator calls out with (notifications, callbacks): no proxy, redirects not
/// followed, `timeout` per request if given. `purpose` names it in the error
/// (`building the <purpose> HTTP client`).
pub fn outbound_client(
    timeout: Option<Duration>,
    purpose: &str,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    builder
        .build()
        .with_context(|| format!("building the {purpose} HTTP client"))
}

/// Serves `router` on `listener` until `shutdown` resolves; a server error is reported as
/// `"<name> server"`.
pub async fn serve_router(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .with_context(|| format!("{name} server"))
}

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// The parsed command line of a simulator binary.
#[derive(Debug)]
pub struct SimArgs<C> {
    /// `--addr` (default `127.0.0.1:0`).
    pub addr: SocketAddr,
    /// The simulator's own settings.
    pub config: C,
}

/// The value of the flag being parsed: after `=` (`--flag=value`) or the next argument.
pub struct FlagValue<'a> {
    inline: Option<String>,
    rest: &'a mut dyn Iterator<Item = String>,
    usage: &'a str,
}

impl FlagValue<'_> {
    /// The value of flag `name`, as text.
    pub fn text(&mut self, name: &str) -> anyhow::Result<String> {
        match self.inline.clone() {
            Some(v) => Ok(v),
            None => self
                .rest
                .next()
                .with_context(|| format!("{name} needs a value\n{}", self.usage)),
        }
    }

    /// The value of flag `name`, parsed.
    pub fn parse<T>(&mut self, name: &str) -> anyhow::Result<T>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let v = self.text(name)?;
        v.parse().with_context(|| format!("invalid {name} {v:?}"))
    }
}

/// Parses a simulator binary's arguments: `--addr ADDR` and `-h`/`--help` (prints `usage`,
/// then `Ok(None)`) here, every other flag by `own_flag`, which answers `Ok(false)` for a flag
/// it does not know (an error naming it, with `usage`). Values are given as `--flag value` or
/// `--flag=value`.
pub fn parse_args<C: Default>(
    args: impl IntoIterator<Item = String>,
    usage: &str,
    mut own_flag: impl FnMut(&str, &mut FlagValue<'_>, &mut C) -> anyhow::Result<bool>,
) -> anyhow::Result<Option<SimArgs<C>>> {
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = C::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = FlagValue {
            inline,
            rest: &mut args,
            usage,
        };
        match flag.as_str() {
            "--addr" => addr = value.parse("--addr")?,
            "-h" | "--help" => {
                println!("{usage}");
                return Ok(None);
            }
            other => {
                if !own_flag(other, &mut value, &mut config)? {
                    bail!("unknown argument {other:?}\n{usage}");
                }
            }
        }
    }
    Ok(Some(SimArgs { addr, config }))
}

/// Binds `addr`, then prints exactly one line, `<name> listening on http://ADDR`, to stdout.
pub async fn bind_and_announce(name: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{name} listening on http://{local}")?;
        out.flush()?;
    }
    Ok(listener)
}

/// The shutdown future a simulator binary hands to its `serve`.
pub type ShutdownSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A simulator binary's `main`: parses the arguments ([`parse_args`]), binds and prints the
/// ready line ([`bind_and_announce`]), then serves with `serve` until SIGTERM or Ctrl-C
/// ([`shutdown_signal`]). `name` is the binary's name.
pub async fn run_binary<C, F, Fut>(
    name: &'static str,
    usage: &str,
    own_flag: impl FnMut(&str, &mut FlagValue<'_>, &mut C) -> anyhow::Result<bool>,
    serve: F,
) -> anyhow::Result<()>
where
    C: Default,
    F: FnOnce(TcpListener, C, ShutdownSignal) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Some(args) = parse_args(std::env::args().skip(1), usage, own_flag)? else {
        return Ok(());
    };
    let listener = bind_and_announce(name, args.addr).await?;
    serve(listener, args.config, Box::pin(shutdown_signal(name))).await
}

/// Resolves on SIGTERM or Ctrl-C (Ctrl-C only where there is no SIGTERM); `name` prefixes the
/// warning printed when SIGTERM cannot be listened for.
pub async fn shutdown_signal(name: &'static str) {
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
                eprintln!("{name}: cannot listen for SIGTERM ({e}); Ctrl-C only");
                // An error here means no Ctrl-C handler either: serve until killed.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = name;
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

// ---------------------------------------------------------------------------
// Test helpers
// ---------------------------------------------------------------------------

/// Helpers for the simulators' unit tests.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod testing {
    use std::future::Future;
    use std::pin::Pin;

    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    /// The shutdown future handed to the simulator's `serve`.
    pub(crate) type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// An HTTP client for tests: no proxy, redirects not followed.
    pub(crate) fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    /// Serves with `serve` on 127.0.0.1:0 in a task; returns the base URL and the sender that
    /// stops the server when sent to or dropped.
    pub(crate) async fn spawn_server<F, Fut>(serve: F) -> (String, oneshot::Sender<()>)
    where
        F: FnOnce(TcpListener, Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = serve(
            listener,
            Box::pin(async move {
                let _ = rx.await;
            }),
        );
        tokio::spawn(async move {
            server.await.unwrap();
        });
        (format!("http://{addr}"), tx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_with_and_without_plus() {
        assert_eq!(percent_decode("a%20b+c%2Bd%zz%4", true), "a b c+d%zz%4");
        assert_eq!(percent_decode("a+b%3Ac%", false), "a+b:c%");
        assert_eq!(percent_decode("%FF", true), "\u{FFFD}");
    }

    #[test]
    fn basic_credentials_cases() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_credentials(&h), Ok(None));
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert_eq!(basic_credentials(&h), Ok(None));
        let value = format!("basic {}", STANDARD.encode("a%3Ab+c:s%20t"));
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        assert_eq!(
            basic_credentials(&h),
            Ok(Some(("a:b c".to_owned(), "s t".to_owned())))
        );
        h.insert(header::AUTHORIZATION, "Basic !!".parse().unwrap());
        assert_eq!(basic_credentials(&h), Err(MalformedBasic));
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, " BEARER  tok ".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("tok"));
    }

    #[test]
    fn flags_inline_and_separate() {
        let args = ["--addr=127.0.0.1:9", "--n", "3", "--x"].map(str::to_owned);
        let parsed = parse_args(args, "usage", |flag, value, n: &mut u32| {
            Ok(match flag {
                "--n" => {
                    *n = value.parse("--n")?;
                    true
                }
                _ => false,
            })
        });
        let err = parsed.unwrap_err().to_string();
        assert_eq!(err, "unknown argument \"--x\"\nusage");
        let args = ["--n=4"].map(str::to_owned);
        let parsed = parse_args(args, "usage", |_, value, n: &mut u32| {
            *n = value.parse("--n")?;
            Ok(true)
        })
        .unwrap()
        .unwrap();
        assert_eq!((parsed.addr.port(), parsed.config), (0, 4));
    }
}
