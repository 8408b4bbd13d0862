//! Start-up and shutdown shared by every service: telemetry, codec, producer, the retention
//! guard, the admin endpoints, and the consumer loop.

use crate::admin::{self, Health};
use crate::codec::Codec;
use crate::kafka::{KafkaSettings, Processor, Producer, StageSettings, run_stage};
use crate::topics;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What every service holds once started.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub service: &'static str,
    pub kafka: KafkaSettings,
    pub codec: Arc<Codec>,
    pub producer: Producer,
    pub health: Health,
    pub shutdown: CancellationToken,
    /// `OHX_HTTP_ADDR`: where `/healthz`, `/readyz`, `/metrics` (and the gateway's API) listen.
    pub http_addr: SocketAddr,
    /// The bound listener, taken by [`Runtime::serve_http`].
    listener: Arc<std::sync::Mutex<Option<tokio::net::TcpListener>>>,
}

impl Runtime {
    /// Initializes telemetry, the codec and the producer, and refuses to start if any of
    /// `topics` is missing or keeps data longer than 24 hours.
    pub async fn start(
        service: &'static str,
        default_port: u16,
        topics: &[&str],
    ) -> anyhow::Result<Self> {
        crate::telemetry::init(service)?;
        let shutdown = admin::shutdown_on_signals();
        let kafka = KafkaSettings::from_env();
        let codec = Codec::from_env()?;
        let health = Health::new();
        let produce_timeout = crate::config::millis("OHX_PRODUCE_TIMEOUT_MS", 30_000)?;
        let producer = Producer::new(&kafka, codec.clone(), produce_timeout, health.clone())?;
        let http_addr: SocketAddr =
            crate::config::string("OHX_HTTP_ADDR", &format!("0.0.0.0:{default_port}")).parse()?;
        // A service that cannot serve its port exits with the reason instead of running deaf.
        let listener = admin::bind(http_addr).await?;
        let wait = crate::config::millis("OHX_STARTUP_TIMEOUT_MS", 60_000)?;
        verify_topics(&kafka, topics, wait, &shutdown).await?;
        Ok(Self {
            service,
            kafka,
            codec,
            producer,
            health,
            shutdown,
            http_addr,
            listener: Arc::new(std::sync::Mutex::new(Some(listener))),
        })
    }

    /// Serves the admin endpoints merged with `extra` routes until shutdown.
    pub fn serve_http(&self, extra: axum::Router) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let router = admin::router(self.health.clone()).merge(extra);
        let listener = match self.listener.lock() {
            Ok(mut l) => l.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            match listener {
                Some(listener) => admin::serve(listener, router, shutdown).await,
                None => anyhow::bail!("the http listener was already taken"),
            }
        })
    }

    /// Runs a consumer stage with its admin endpoints until SIGTERM, then shuts down gracefully.
    pub async fn run_stage<P: Processor>(
        self,
        settings: StageSettings,
        processor: P,
    ) -> anyhow::Result<()> {
        let http = self.serve_http(axum::Router::new());
        self.health.set_ready(true);
        let result = run_stage(
            settings,
            &self.kafka,
            self.producer.clone(),
            processor,
            self.health.clone(),
            self.shutdown.clone(),
        )
        .await;
        self.shutdown.cancel();
        match http.await {
            Ok(Err(error)) => tracing::warn!(%error, "http server failed"),
            Err(error) => tracing::warn!(%error, "http server task failed"),
            Ok(Ok(())) => {}
        }
        result
    }
}

impl Runtime {
    /// Runs two consumer stages (two groups over different inputs) in one process, sharing the
    /// admin endpoints; if either fails, both stop.
    pub async fn run_two<P1: Processor, P2: Processor>(
        self,
        s1: StageSettings,
        p1: P1,
        s2: StageSettings,
        p2: P2,
    ) -> anyhow::Result<()> {
        let http = self.serve_http(axum::Router::new());
        self.health.set_ready(true);
        let stop = self.shutdown.clone();
        let a = run_stage(
            s1,
            &self.kafka,
            self.producer.clone(),
            p1,
            self.health.clone(),
            stop.clone(),
        );
        let b = run_stage(
            s2,
            &self.kafka,
            self.producer.clone(),
            p2,
            self.health.clone(),
            stop.clone(),
        );
        let (ra, rb) = tokio::join!(
            async {
                let r = a.await;
                stop.cancel();
                r
            },
            async {
                let r = b.await;
                stop.cancel();
                r
            }
        );
        if let Ok(Err(error)) = http.await {
            tracing::warn!(%error, "http server failed");
        }
        ra.and(rb)
    }
}

/// Waits (up to `wait`) until every topic exists, then checks retention ≤ 24 h.
pub async fn verify_topics(
    kafka: &KafkaSettings,
    topics: &[&str],
    wait: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match topics::verify_broker_retention(&admin, topics).await {
            Ok(()) => return Ok(()),
            Err(e @ topics::TopicError::Retention { .. }) => return Err(e.into()),
            Err(e) if tokio::time::Instant::now() >= deadline || shutdown.is_cancelled() => {
                return Err(e.into());
            }
            Err(e) => {
                tracing::warn!(error = %e, "topics not ready, waiting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
