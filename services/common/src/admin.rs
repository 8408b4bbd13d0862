//! `/healthz`, `/readyz` and `/metrics`, served by every service, and RFC 9457 problem responses.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Liveness and readiness of a service.
///
/// Ready: set by the service once it can take work (a consumer stage: once its group gave it an
/// assignment). Healthy: no component has been failing for longer than `unhealthy_after`
/// (`OHX_UNHEALTHY_AFTER_MS`, default 60 s); a component reports [`Health::failing`] when it
/// cannot produce, consume or commit, and [`Health::recovered`] once it can again.
#[derive(Debug, Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    components: Arc<Mutex<HashMap<String, bool>>>,
    problems: Arc<Mutex<HashMap<&'static str, (Instant, String)>>>,
    unhealthy_after: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Self::with_grace(Duration::from_secs(60))
    }
}

impl Health {
    /// Returns a new health state: alive, not ready, with the grace from `OHX_UNHEALTHY_AFTER_MS`.
    pub fn new() -> Self {
        Self::with_grace(
            crate::config::millis("OHX_UNHEALTHY_AFTER_MS", 60_000)
                .unwrap_or(Duration::from_secs(60)),
        )
    }
    /// Returns a new health state that turns unhealthy after `unhealthy_after` of failure.
    pub fn with_grace(unhealthy_after: Duration) -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            components: Arc::new(Mutex::new(HashMap::new())),
            problems: Arc::new(Mutex::new(HashMap::new())),
            unhealthy_after,
        }
    }
    /// Sets whether the service is ready to take work.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    /// Sets whether one part of the service (a consumer group member) is ready; the service
    /// is ready only while every part that reported is.
    pub fn set_component_ready(&self, component: &str, ready: bool) {
        let mut components = match self.components.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        components.insert(component.to_string(), ready);
    }
    /// Returns whether the service is ready: set ready, every part ready, and healthy.
    pub fn is_ready(&self) -> bool {
        let parts_ready = match self.components.lock() {
            Ok(g) => g.values().all(|r| *r),
            Err(_) => false,
        };
        self.ready.load(Ordering::SeqCst) && parts_ready && self.unhealthy().is_empty()
    }
    fn problems(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, (Instant, String)>> {
        match self.problems.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
    /// Reports that `component` is failing (kept from the first report until it recovers).
    pub fn failing(&self, component: &'static str, reason: &str) {
        let mut problems = self.problems();
        let first = !problems.contains_key(component);
        problems
            .entry(component)
            .and_modify(|p| p.1 = reason.to_string())
            .or_insert_with(|| (Instant::now(), reason.to_string()));
        if first {
            tracing::warn!(component, reason, "failing");
        }
    }
    /// Reports that `component` works again.
    pub fn recovered(&self, component: &'static str) {
        if self.problems().remove(component).is_some() {
            tracing::info!(component, "recovered");
        }
    }
    /// The components failing for longer than the grace, with their reasons.
    pub fn unhealthy(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .problems()
            .iter()
            .filter(|(_, (since, _))| since.elapsed() >= self.unhealthy_after)
            .map(|(c, (since, reason))| {
                format!("{c} failing for {} s: {reason}", since.elapsed().as_secs())
            })
            .collect();
        out.sort();
        out
    }
}

/// Returns the router with `/healthz`, `/readyz` and `/metrics`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route(
            "/healthz",
            get({
                let health = health.clone();
                move || {
                    let unhealthy = health.unhealthy();
                    async move {
                        if unhealthy.is_empty() {
                            (StatusCode::OK, "ok").into_response()
                        } else {
                            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
                                .detail(unhealthy.join("; "))
                                .into_response()
                        }
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = health.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready").into_response()
                    } else {
                        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    crate::telemetry::render(),
                )
            }),
        )
}

/// Binds `addr`; a service that cannot listen on its port must not start.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (OHX_HTTP_ADDR): {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    Ok(listener)
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The peer address is recorded for handlers that need it (the gateway's allow-lists).
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await?;
    Ok(())
}

/// An RFC 9457 problem response (`application/problem+json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Problem {
    /// Returns a problem with the given status and title, type `about:blank`.
    pub fn new(status: StatusCode, title: impl Into<String>) -> Self {
        Self {
            kind: "about:blank".to_string(),
            title: title.into(),
            status: status.as_u16(),
            detail: None,
        }
    }
    /// Adds a human-readable detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// Returns a token cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {},
                        _ = term.recv() => {},
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutdown requested");
        child.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_health_turns_unhealthy_only_after_the_grace_and_recovers() {
        let h = Health::with_grace(Duration::from_millis(0));
        h.set_ready(true);
        assert!(h.unhealthy().is_empty());
        assert!(h.is_ready());
        h.failing("produce", "broker down");
        assert_eq!(h.unhealthy().len(), 1);
        assert!(h.unhealthy()[0].contains("produce"));
        assert!(!h.is_ready(), "an unhealthy service is not ready");
        h.recovered("produce");
        assert!(h.unhealthy().is_empty());
        let slow = Health::with_grace(Duration::from_secs(3600));
        slow.failing("produce", "broker down");
        assert!(slow.unhealthy().is_empty(), "within the grace");
    }

    #[test]
    fn test_ready_needs_every_component() {
        let h = Health::with_grace(Duration::from_secs(60));
        h.set_ready(true);
        h.set_component_ready("ohx.a", false);
        assert!(!h.is_ready());
        h.set_component_ready("ohx.a", true);
        h.set_component_ready("ohx.b", false);
        assert!(!h.is_ready());
        h.set_component_ready("ohx.b", true);
        assert!(h.is_ready());
        h.set_ready(false);
        assert!(!h.is_ready());
    }
}
