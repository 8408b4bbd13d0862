//! webhook-gateway binary: wiring only.

use ohx_common::records::topic;
use ohx_common::service::Runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `webhook-gateway openapi`: the REST API's OpenAPI document, without starting.
    if std::env::args().nth(1).as_deref() == Some("openapi") {
        println!(
            "{}",
            serde_json::to_string_pretty(&webhook_gateway::api::openapi())?
        );
        return Ok(());
    }
    let rt = Runtime::start(
        "webhook-gateway",
        8080,
        &[
            topic::SYNC_REQUESTS,
            topic::MEASUREMENTS,
            topic::PUBLISH_RESULTS,
            topic::DEAD_LETTER,
        ],
    )
    .await?;
    let pool = ohx_common::db::pool_from_env()?;
    let lookups = webhook_gateway::lookup::LookupCache::default();
    let listener = lookups.spawn_listener(
        ohx_common::db::url_from_env(),
        ohx_common::db::CONFIG_CHANGED_CHANNEL,
    );
    // The connect flow's callback needs the gateway's public URL (for the subscriptions it
    // makes) and the secret keys (the app's client secret, the link's tokens).
    let connect = match std::env::var("OHX_PUBLIC_URL") {
        Ok(public_url) if !public_url.trim().is_empty() => {
            Some(webhook_gateway::connect::ConnectSettings {
                secrets: ohx_common::crypto::SecretBox::from_env()?,
                http: reqwest::Client::builder()
                    .timeout(ohx_common::config::millis(
                        "OHX_PROVIDER_TIMEOUT_MS",
                        30_000,
                    )?)
                    .build()?,
                public_url,
            })
        }
        _ => None,
    };
    // The gateway parses webhooks and exchanges codes (Google's token endpoint is a setting).
    let providers =
        ohx_providers::Registry::standard(ohx_providers::ProviderSettings::from_env()?)?;
    let signatures = webhook_gateway::signature_checks(
        &providers,
        &reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()?,
    );
    let state = webhook_gateway::AppState {
        connect,
        providers,
        signatures,
        secrets: std::env::var("OHX_SECRET_KEYS")
            .ok()
            .map(|_| ohx_common::crypto::SecretBox::from_env())
            .transpose()?,
        sources: std::sync::Arc::new(
            webhook_gateway::sources::SourceRules::from_env().map_err(anyhow::Error::msg)?,
        ),
        pool,
        lookups,
        producer: rt.producer.clone(),
        ack_timeout: ohx_common::config::millis("OHX_ACK_TIMEOUT_MS", 1500)?,
        db_timeout: ohx_common::config::millis(
            "OHX_DATABASE_TIMEOUT_MS",
            ohx_common::db::DEFAULT_TIMEOUT_MS,
        )?,
        max_import_bytes: ohx_common::config::parse(
            "OHX_MAX_IMPORT_BYTES",
            webhook_gateway::import::DEFAULT_MAX_IMPORT_BYTES,
        )?,
        max_window: std::time::Duration::from_secs(
            ohx_common::config::parse(
                "OHX_MAX_WEBHOOK_WINDOW_DAYS",
                webhook_gateway::DEFAULT_MAX_WEBHOOK_WINDOW_DAYS,
            )?
            .clamp(1, 3650)
                * 86_400,
        ),
    };
    let api_settings = webhook_gateway::api::ApiSettings::from_env()?;
    let ui = webhook_gateway::api::ui::UiSettings::from_env(&api_settings);
    let api = webhook_gateway::api::ApiState::new(
        state.clone(),
        &api_settings,
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()?,
    )
    .with_broker(rt.kafka.clone(), rt.codec.clone());
    // Delivery status: publish results into `delivery_results`, offsets committed after.
    let delivery = ohx_common::kafka::run_stage(
        ohx_common::kafka::StageSettings::from_env(
            "webhook-gateway",
            vec![topic::PUBLISH_RESULTS],
        )?,
        &rt.kafka,
        rt.producer.clone(),
        webhook_gateway::delivery::DeliveryStatus::new(state.pool.clone()),
        rt.health.clone(),
        rt.shutdown.clone(),
    );
    let mut routes = webhook_gateway::router(state).merge(webhook_gateway::api::router(api));
    if let Some(ui) = ui {
        tracing::info!(dir = %ui.dir.display(), oidc = ui.config.oidc.is_some(), "serving the UI at /ui/");
        routes = routes.merge(webhook_gateway::api::ui::router(ui));
    }
    let http = rt.serve_http(routes);
    rt.health.set_ready(true);
    let delivered = delivery.await;
    // The stage returns on SIGTERM, or on a fatal error: either way the gateway stops.
    rt.shutdown.cancel();
    rt.health.set_ready(false);
    http.await??;
    delivered?;
    listener.abort();
    rt.producer.flush(std::time::Duration::from_secs(5));
    tracing::info!("stopped");
    Ok(())
}
