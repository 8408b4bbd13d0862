//! The configuration UI's hosting on the gateway: its built files at `/ui/` (from
//! `OHX_UI_DIR`; the UI may as well be deployed on its own, it uses only the public API) and
//! `/ui/config.json`, which tells it where to sign in.

use axum::Json;
use serde::Serialize;

/// How the UI signs users in (OIDC authorization code with PKCE).
#[derive(Debug, Clone, Serialize)]
pub struct UiOidc {
    pub issuer: String,
    /// The UI's public client at the issuer (`OHX_UI_OIDC_CLIENT_ID`).
    pub client_id: String,
    /// The resource indicator access tokens are asked for: the API's audience.
    pub resource: String,
}

/// `/ui/config.json`.
#[derive(Debug, Clone, Serialize)]
pub struct UiConfig {
    /// Base URL of the REST API (empty: the UI's own origin).
    pub api_base: String,
    /// `None`: API-key sign-in only.
    pub oidc: Option<UiOidc>,
}

/// The UI's settings: `OHX_UI_DIR` (unset: no UI on this gateway), `OHX_UI_OIDC_CLIENT_ID`
/// with the API's OIDC issuer and audience.
#[derive(Debug, Clone)]
pub struct UiSettings {
    pub dir: std::path::PathBuf,
    pub config: UiConfig,
}

impl UiSettings {
    pub fn from_env(api: &super::ApiSettings) -> Option<Self> {
        let dir = std::env::var("OHX_UI_DIR")
            .ok()
            .filter(|d| !d.trim().is_empty())?;
        let client_id = std::env::var("OHX_UI_OIDC_CLIENT_ID")
            .ok()
            .filter(|c| !c.trim().is_empty());
        let oidc = match (&api.oidc, client_id) {
            (Some(o), Some(client_id)) => Some(UiOidc {
                issuer: o.issuer.clone(),
                client_id,
                resource: o.audience.clone(),
            }),
            _ => None,
        };
        Some(Self {
            dir: dir.into(),
            config: UiConfig {
                api_base: String::new(),
                oidc,
            },
        })
    }
}

/// `/ui/…` (the files, `index.html` for a directory; `/ui` redirects to `/ui/`) and
/// `/ui/config.json`.
pub fn router(settings: UiSettings) -> axum::Router {
    let config = settings.config;
    axum::Router::new()
        .route(
            "/ui/config.json",
            axum::routing::get(move || {
                let config = config.clone();
                async move { Json(config) }
            }),
        )
        .nest_service("/ui", tower_http::services::ServeDir::new(settings.dir))
}
