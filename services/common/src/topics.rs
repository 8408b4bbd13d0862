//! Topic definitions (data files in `topics/`), the 24-hour retention guard, and applying the
//! definitions to a broker.

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Health data may not be kept longer than this.
pub const MAX_RETENTION_MS: i64 = 86_400_000;

/// The files of `topics/`, compiled in.
pub const TOPIC_FILES: &[(&str, &str)] = &[
    (
        "ohx.sync-requests.v1.toml",
        include_str!("../../../topics/ohx.sync-requests.v1.toml"),
    ),
    (
        "ohx.measurements.v1.toml",
        include_str!("../../../topics/ohx.measurements.v1.toml"),
    ),
    (
        "ohx.hourly-aggregates.v1.toml",
        include_str!("../../../topics/ohx.hourly-aggregates.v1.toml"),
    ),
    (
        "ohx.fhir-resources.v1.toml",
        include_str!("../../../topics/ohx.fhir-resources.v1.toml"),
    ),
    (
        "ohx.dedup-state.v1.toml",
        include_str!("../../../topics/ohx.dedup-state.v1.toml"),
    ),
    (
        "ohx.fhir-outbox.v1.toml",
        include_str!("../../../topics/ohx.fhir-outbox.v1.toml"),
    ),
    (
        "ohx.publish-results.v1.toml",
        include_str!("../../../topics/ohx.publish-results.v1.toml"),
    ),
    (
        "ohx.dead-letter.v1.toml",
        include_str!("../../../topics/ohx.dead-letter.v1.toml"),
    ),
];

/// One topic of the architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicDef {
    pub name: String,
    pub partitions: i32,
    /// What the record key is (documentation).
    pub key: String,
    /// The value schema file in `schemas/`.
    pub value_schema: String,
    /// Broker topic configuration; must declare `cleanup.policy` and `retention.ms`.
    pub config: BTreeMap<String, String>,
}

/// A topic definition or broker state that breaks the rules.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("{file}: {reason}")]
    Parse { file: String, reason: String },
    #[error(
        "topic {topic}: retention.ms {retention} exceeds 24 hours ({MAX_RETENTION_MS}); health data may not be kept longer"
    )]
    Retention { topic: String, retention: String },
    #[error("topic {topic}: {reason}")]
    Invalid { topic: String, reason: String },
    #[error("topic {0} does not exist on the broker (run `ohx topics apply`)")]
    Missing(String),
    #[error("kafka admin: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Checks a retention value against the 24-hour rule (`-1`, unlimited, is refused too).
pub fn check_retention(topic: &str, retention: &str) -> Result<(), TopicError> {
    match retention.trim().parse::<i64>() {
        Ok(ms) if (0..=MAX_RETENTION_MS).contains(&ms) => Ok(()),
        _ => Err(TopicError::Retention {
            topic: topic.to_string(),
            retention: retention.to_string(),
        }),
    }
}

impl TopicDef {
    /// Checks partitions, an explicit cleanup policy, and retention ≤ 24 h.
    pub fn validate(&self) -> Result<(), TopicError> {
        let invalid = |reason: &str| TopicError::Invalid {
            topic: self.name.clone(),
            reason: reason.to_string(),
        };
        if self.partitions < 1 {
            return Err(invalid("partitions must be at least 1"));
        }
        match self.config.get("cleanup.policy").map(String::as_str) {
            Some("delete" | "compact,delete" | "delete,compact") => {}
            Some("compact") => {
                return Err(invalid(
                    "cleanup.policy compact alone keeps data forever; use compact,delete",
                ));
            }
            _ => {
                return Err(invalid(
                    "cleanup.policy must be declared (delete or compact,delete)",
                ));
            }
        }
        let retention = self
            .config
            .get("retention.ms")
            .ok_or_else(|| invalid("retention.ms must be declared"))?;
        check_retention(&self.name, retention)
    }
}

/// Parses and validates topic definitions from TOML texts.
pub fn parse_definitions<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<TopicDef>, TopicError> {
    let mut defs = Vec::new();
    for (file, text) in files {
        let def: TopicDef = toml::from_str(text).map_err(|e| TopicError::Parse {
            file: file.to_string(),
            reason: e.to_string(),
        })?;
        def.validate()?;
        defs.push(def);
    }
    Ok(defs)
}

/// Returns the compiled-in definitions of `topics/`.
pub fn definitions() -> Result<Vec<TopicDef>, TopicError> {
    parse_definitions(TOPIC_FILES.iter().copied())
}

fn options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(Duration::from_secs(15)))
}

/// Reads `retention.ms` of each topic from the broker and refuses any above 24 hours.
/// Every stage calls this at start-up for the topics it reads and writes.
pub async fn verify_broker_retention(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[&str],
) -> Result<(), TopicError> {
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let results = admin.describe_configs(specs.iter(), &options()).await?;
    for (topic, result) in topics.iter().zip(results) {
        let resource = match result {
            Ok(r) => r,
            Err(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                return Err(TopicError::Missing((*topic).to_string()));
            }
            Err(code) => {
                return Err(TopicError::Invalid {
                    topic: (*topic).to_string(),
                    reason: format!("describe configs failed: {code}"),
                });
            }
        };
        match resource.get("retention.ms").and_then(|e| e.value.clone()) {
            Some(v) => check_retention(topic, &v)?,
            None => {
                return Err(TopicError::Invalid {
                    topic: (*topic).to_string(),
                    reason: "broker reports no retention.ms".into(),
                });
            }
        }
    }
    Ok(())
}

/// What applying a definition did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created,
    Altered,
    Unchanged,
}

/// Creates missing topics and sets the configuration of existing ones.
pub async fn apply(
    admin: &AdminClient<DefaultClientContext>,
    defs: &[TopicDef],
    replication: i32,
) -> Result<Vec<(String, Applied)>, TopicError> {
    for d in defs {
        d.validate()?;
    }
    let new_topics: Vec<NewTopic<'_>> = defs
        .iter()
        .map(|d| {
            let mut t = NewTopic::new(&d.name, d.partitions, TopicReplication::Fixed(replication));
            for (k, v) in &d.config {
                t = t.set(k, v);
            }
            t
        })
        .collect();
    let created = admin.create_topics(new_topics.iter(), &options()).await?;
    let mut outcome = Vec::new();
    let mut to_alter = Vec::new();
    for (d, r) in defs.iter().zip(created) {
        match r {
            Ok(_) => outcome.push((d.name.clone(), Applied::Created)),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => to_alter.push(d),
            Err((name, code)) => {
                return Err(TopicError::Invalid {
                    topic: name,
                    reason: format!("create failed: {code}"),
                });
            }
        }
    }
    if to_alter.is_empty() {
        return Ok(outcome);
    }
    // Only alter what differs: some brokers (tansu) cannot alter configs at all, and an
    // unchanged topic must not fail `apply`.
    let specs: Vec<ResourceSpecifier<'_>> = to_alter
        .iter()
        .map(|d| ResourceSpecifier::Topic(&d.name))
        .collect();
    let current = admin.describe_configs(specs.iter(), &options()).await?;
    let mut differing = Vec::new();
    for (d, r) in to_alter.iter().zip(current) {
        let resource = r.map_err(|code| TopicError::Invalid {
            topic: d.name.clone(),
            reason: format!("describe failed: {code}"),
        })?;
        let same = d
            .config
            .iter()
            .all(|(k, v)| resource.get(k).and_then(|e| e.value.as_deref()) == Some(v.as_str()));
        if same {
            outcome.push((d.name.clone(), Applied::Unchanged));
        } else {
            differing.push(*d);
        }
    }
    if differing.is_empty() {
        return Ok(outcome);
    }
    let alters: Vec<AlterConfig<'_>> = differing
        .iter()
        .map(|d| {
            let mut a = AlterConfig::new(ResourceSpecifier::Topic(&d.name));
            for (k, v) in &d.config {
                a = a.set(k, v);
            }
            a
        })
        .collect();
    let results = match admin.alter_configs(alters.iter(), &options()).await {
        Ok(r) => r,
        Err(rdkafka::error::KafkaError::AdminOp(RDKafkaErrorCode::UnsupportedFeature)) => {
            let names: Vec<&str> = differing.iter().map(|d| d.name.as_str()).collect();
            return Err(TopicError::Invalid {
                topic: names.join(", "),
                reason: "configuration differs from topics/ and this broker cannot alter topic configs; recreate the topics".into(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    for (d, r) in differing.iter().zip(results) {
        match r {
            Ok(_) => outcome.push((d.name.clone(), Applied::Altered)),
            Err((_, code)) => {
                return Err(TopicError::Invalid {
                    topic: d.name.clone(),
                    reason: format!("alter failed: {code}"),
                });
            }
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_repository_topics_are_valid_and_complete() {
        let defs = definitions().unwrap();
        let names: Vec<_> = defs.iter().map(|d| d.name.as_str()).collect();
        for t in [
            crate::records::topic::SYNC_REQUESTS,
            crate::records::topic::MEASUREMENTS,
            crate::records::topic::HOURLY_AGGREGATES,
            crate::records::topic::FHIR_RESOURCES,
            crate::records::topic::DEDUP_STATE,
            crate::records::topic::FHIR_OUTBOX,
            crate::records::topic::PUBLISH_RESULTS,
            crate::records::topic::DEAD_LETTER,
        ] {
            assert!(names.contains(&t), "{t} missing from topics/");
        }
        let fr = defs
            .iter()
            .find(|d| d.name == crate::records::topic::FHIR_RESOURCES)
            .unwrap();
        let ds = defs
            .iter()
            .find(|d| d.name == crate::records::topic::DEDUP_STATE)
            .unwrap();
        assert_eq!(
            fr.partitions, ds.partitions,
            "changelog must be co-partitioned with its input"
        );
        assert_eq!(ds.config["cleanup.policy"], "compact,delete");
    }

    #[test]
    fn test_retention_above_24h_or_unlimited_is_refused() {
        let over = "name = \"x\"\npartitions = 1\nkey = \"k\"\nvalue_schema = \"s\"\n[config]\n\"cleanup.policy\" = \"delete\"\n\"retention.ms\" = \"86400001\"\n";
        assert!(matches!(
            parse_definitions([("x.toml", over)]),
            Err(TopicError::Retention { .. })
        ));
        assert!(check_retention("x", "-1").is_err());
        assert!(check_retention("x", "86400000").is_ok());
        let no_policy = "name = \"x\"\npartitions = 1\nkey = \"k\"\nvalue_schema = \"s\"\n[config]\n\"retention.ms\" = \"1000\"\n";
        assert!(matches!(
            parse_definitions([("x.toml", no_policy)]),
            Err(TopicError::Invalid { .. })
        ));
        let compact_only = "name = \"x\"\npartitions = 1\nkey = \"k\"\nvalue_schema = \"s\"\n[config]\n\"cleanup.policy\" = \"compact\"\n\"retention.ms\" = \"1000\"\n";
        assert!(parse_definitions([("x.toml", compact_only)]).is_err());
    }
}
