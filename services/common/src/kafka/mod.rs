//! The one consumer/producer runtime every stage uses.
//!
//! A stage is a [`Processor`] over one record type; [`run_stage`] owns the Kafka loop (see
//! [`stage`]) and the [`Producer`] produces and waits for acknowledgements (see [`producer`]).
//! The bookkeeping that keeps rebalances and retries safe is in [`track`], free of I/O.

pub mod dlq;
pub mod inspect;
pub mod leases;
mod processor;
pub mod producer;
pub mod stage;
pub mod track;

pub use processor::{Emitter, Input, OutRecord, Processor, StageError};
pub use producer::{ProduceError, Producer};
pub use stage::{StageSettings, run_stage};

use rdkafka::config::ClientConfig;

/// Broker connection settings shared by producers, consumers and the admin client.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `OHX_KAFKA_BOOTSTRAP`, default `127.0.0.1:9092`.
    pub bootstrap: String,
    /// `OHX_KAFKA_PROPERTIES`: extra librdkafka properties `k=v,k=v`, applied last.
    pub extra: Vec<(String, String)>,
}

impl KafkaSettings {
    /// Reads the settings from the environment.
    pub fn from_env() -> Self {
        let extra = crate::config::string("OHX_KAFKA_PROPERTIES", "")
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Self {
            bootstrap: crate::config::string("OHX_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            extra,
        }
    }

    /// Returns a client configuration with the bootstrap servers and the extra properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config.set("broker.address.family", "v4");
        for (k, v) in &self.extra {
            config.set(k, v);
        }
        config
    }
}
