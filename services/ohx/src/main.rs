//! `ohx`: the operations command. Applies migrations, topics and schemas; creates the
//! configuration records (organization, EHR target, patient, provider app and link); emits
//! manual sync requests and the nightly reconciliation; rewinds a stage's consumer group to
//! replay its input; lists and re-drives dead letters; shows consumer lag.

use ohx_common::kafka::dlq;
mod targets;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use ohx_common::codec::{Codec, SCHEMA_FILES};
use ohx_common::crypto::SecretBox;
use ohx_common::kafka::{KafkaSettings, Producer, inspect};
use ohx_common::records::{Context, SyncRequest, topic};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::time::Duration;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "ohx",
    about = "ohx operations: database, topics, schemas, configuration, replay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the database if needed and applies migrations (OHX_DATABASE_URL).
    Migrate,
    /// Topic definitions from topics/.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Registers schemas/ with the registry (OHX_SCHEMA_REGISTRY=http://…) or lists the pinned ids.
    Schemas,
    /// Creates an organization; prints {"id"}.
    CreateOrg {
        #[arg(long)]
        name: String,
    },
    /// Creates an API key of an organization for the REST API (the first one of an
    /// organization, a local demo); prints {"id", "key"}: the key is shown this once.
    CreateApiKey {
        #[arg(long)]
        org: Uuid,
        /// org_admin | operator | viewer
        #[arg(long, default_value = "org_admin")]
        role: String,
        #[arg(long, default_value = "cli")]
        name: String,
        #[arg(long, default_value_t = 90)]
        expires_in_days: i32,
    },
    /// Creates an EHR target; prints {"id"}.
    CreateTarget {
        #[arg(long)]
        org: Uuid,
        #[arg(long)]
        name: String,
        #[arg(long)]
        base_url: String,
        /// none | bearer | client_credentials (OAuth2, client secret) | smart_backend (SMART
        /// Backend Services: add its key with `target-key add`, register the printed JWKS URL)
        #[arg(long, default_value = "none")]
        auth: String,
        /// OAuth2 client id (client_credentials, smart_backend).
        #[arg(long)]
        client_id: Option<String>,
        /// Token endpoint (client_credentials; smart_backend discovers it when absent).
        #[arg(long)]
        token_url: Option<String>,
        /// Space-separated scopes (default: create, read, update and search on Observation,
        /// Device and DeviceAssociation, SMART v2 or v1 as the server advertises).
        #[arg(long)]
        scope: Option<String>,
        /// How the client secret is sent: basic (HTTP Basic) | post (form fields).
        #[arg(long)]
        client_auth: Option<String>,
        /// Bearer token or client secret (sealed with OHX_SECRET_KEYS).
        #[arg(long, env = "OHX_TARGET_TOKEN")]
        token: Option<String>,
        /// put (client ids) | conditional (identifier)
        #[arg(long, default_value = "put")]
        mode: String,
        /// The FHIR version the target speaks: R5, or R4 (4.0.1: the fhir-mapper writes R4
        /// through its cross-version rules).
        #[arg(long, default_value = ohx_common::records::FHIR_R5)]
        fhir_version: String,
    },
    /// Creates a patient known to an EHR target; prints {"id"}.
    CreatePatient {
        #[arg(long)]
        org: Uuid,
        #[arg(long)]
        target: Uuid,
        /// The patient as the EHR knows it, e.g. Patient/123.
        #[arg(long)]
        reference: String,
    },
    /// Sends a patient's data to another EHR target of its organization as well, as the
    /// patient that EHR knows (`--reference`), from the patient's next fetch on; prints
    /// {"patient", "deliveries"}.
    AddDelivery {
        #[arg(long)]
        patient: Uuid,
        #[arg(long)]
        target: Uuid,
        /// The patient as that EHR knows them, e.g. Patient/123.
        #[arg(long)]
        reference: String,
    },
    /// Stops sending a patient's data to a target added with add-delivery; prints
    /// {"patient", "deliveries"}.
    RemoveDelivery {
        #[arg(long)]
        patient: Uuid,
        #[arg(long)]
        target: Uuid,
    },
    /// Sets the policy of an organization or of a patient (overriding the organization's),
    /// e.g. '{"disabled_data_types": ["fat_mass"], "require_consent": true,
    /// "aggregation": {"heart_rate": "INDIVIDUAL"}, "ambiguous_readings": "accept"}'.
    SetPolicy {
        #[arg(long, conflicts_with = "patient", required_unless_present = "patient")]
        org: Option<Uuid>,
        #[arg(long)]
        patient: Option<Uuid>,
        /// The policy document (JSON); `{}` clears it.
        policy: String,
    },
    /// Records a patient's consent to a data type (or its refusal with --refused).
    Consent {
        #[arg(long)]
        patient: Uuid,
        #[arg(long)]
        data_type: String,
        #[arg(long)]
        refused: bool,
    },
    /// Creates a provider app; prints {"id", "webhook_path"}.
    CreateApp {
        #[arg(long)]
        org: Uuid,
        #[arg(long, default_value = "withings")]
        provider: String,
        #[arg(long)]
        client_id: String,
        #[arg(long, env = "OHX_APP_CLIENT_SECRET")]
        client_secret: String,
        /// Secret token for the webhook callback URL (?token=…).
        #[arg(long, env = "OHX_APP_WEBHOOK_TOKEN")]
        webhook_token: String,
        /// Provider API base URL (simulators, regional clouds).
        #[arg(long)]
        api_base_url: Option<String>,
        /// Host of the provider's authorize page (simulators, regional clouds).
        #[arg(long)]
        authorize_base_url: Option<String>,
    },
    /// Starts connecting a patient to a provider account: prints {"authorize_url"} for the
    /// patient's browser. The state in it is single use and expires; the provider redirects
    /// to the gateway's `OHX_PUBLIC_URL/oauth/<provider>/callback`, which finishes the link.
    Connect {
        #[arg(long)]
        patient: Uuid,
        #[arg(long)]
        app: Uuid,
        /// Seconds the authorization may take.
        #[arg(long, default_value_t = 600)]
        expires_in: i64,
    },
    /// Disconnects a link: revokes its provider subscriptions and stops syncing it.
    Disconnect {
        #[arg(long)]
        link: Uuid,
    },
    /// Links a patient to a provider account with its tokens; prints {"id"}.
    CreateLink {
        #[arg(long)]
        app: Uuid,
        #[arg(long)]
        patient: Uuid,
        #[arg(long)]
        provider_user_id: String,
        /// The link's access token (none for a provider without an API, e.g. Beurer
        /// imports).
        #[arg(long, env = "OHX_LINK_ACCESS_TOKEN")]
        access_token: Option<String>,
        #[arg(long, env = "OHX_LINK_REFRESH_TOKEN")]
        refresh_token: Option<String>,
        /// Seconds until the access token expires.
        #[arg(long, default_value_t = 10800)]
        expires_in: i64,
    },
    /// Emits a sync request for a link (MANUAL or INITIAL).
    Sync {
        #[arg(long)]
        link: Uuid,
        #[arg(long, default_value = "MANUAL")]
        trigger: String,
        /// Comma-separated data categories of the link's provider (Withings: body,
        /// blood_pressure, temperature, ecg, heart_rate); empty: all of them.
        #[arg(long, default_value = "")]
        categories: String,
        /// How many days back.
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
    /// Emits a NIGHTLY sync request for every active link (run daily by a Kubernetes
    /// CronJob). The fetcher picks the window (OHX_NIGHTLY_SYNC_DAYS back). Request ids are
    /// deterministic per link and UTC day, so a CronJob run again the same day (after a
    /// failure half-way) costs the fetcher a lookup for the links already reconciled.
    Reconcile {
        /// Comma-separated data categories of the link's provider (Withings: body,
        /// blood_pressure, temperature, ecg, heart_rate); empty: all of them.
        #[arg(long, default_value = "")]
        categories: String,
    },
    /// Dead letters: list, show one, re-drive after a fix.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Every EHR target with its delivery status from the publishers: breaker state (closed,
    /// half_open, open), faults flagged, failures, records held; one JSON line per target.
    Targets,
    /// Replaces the bearer token or client secret of a target (sealed with OHX_SECRET_KEYS);
    /// the publishers use it from their next configuration read.
    SetTargetSecret {
        #[arg(long)]
        target: Uuid,
        #[arg(long, env = "OHX_TARGET_TOKEN")]
        token: String,
    },
    /// Re-seals every stored secret (EHR target secrets and keys, provider app secrets and
    /// webhook tokens, link tokens, connect-flow verifiers) under the active key
    /// (OHX_SECRET_ACTIVE_KEY), row by row, while the services keep running; prints
    /// {"resealed": {column: n}, "left": {column: n}} (left: rows still under another key).
    RotateKey,
    /// Key pairs of a SMART Backend Services target: ohx signs with the newest active key and
    /// publishes all keys not retired at the gateway's /ehr-targets/{id}/jwks.json.
    TargetKey {
        #[command(subcommand)]
        action: TargetKeyAction,
    },
    /// Consumer lag of the pipeline's groups (or one), per partition, with the time to drain
    /// it at the rate measured over `--interval-ms`.
    Lag {
        #[arg(long)]
        group: Option<String>,
        #[arg(long, default_value_t = 5000)]
        interval_ms: u64,
    },
    /// Rewinds a stopped stage's consumer group on a topic to the beginning or a time. Refuses
    /// while the group has live members (a partition claimed less than OHX_ORPHAN_AFTER_MS
    /// ago); prints what it rewinds (or, with --dry-run, what it would).
    Replay {
        #[arg(long)]
        group: String,
        #[arg(long)]
        topic: String,
        /// Replay from this time (RFC 3339); omit to replay from the beginning.
        #[arg(long, conflicts_with = "from_ms")]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// The same, in epoch milliseconds.
        #[arg(long)]
        from_ms: Option<i64>,
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which dead letters (all filters optional).
#[derive(clap::Args)]
struct DlqFilter {
    #[arg(long)]
    stage: Option<String>,
    /// Error kind (decode, mapping, validation, rejected, …).
    #[arg(long)]
    kind: Option<String>,
    /// Failed at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Dead letter ids `partition:offset[,…]`.
    #[arg(long)]
    ids: Option<String>,
}

impl DlqFilter {
    fn selection(&self) -> anyhow::Result<dlq::Selection> {
        Ok(dlq::Selection {
            stage: self.stage.clone(),
            kind: self.kind.clone(),
            since_ms: self.since.map(|t| t.timestamp_millis()),
            ids: self
                .ids
                .as_deref()
                .map(dlq::parse_ids)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

#[derive(Subcommand)]
enum TargetKeyAction {
    /// Generates a key pair (private key sealed with OHX_SECRET_KEYS); prints {"kid", "alg",
    /// "activates_at", "jwks_path"}. Rotation: add a key with --activate-in longer than the
    /// EHR caches JWKS for, then retire the old key once the new one signs.
    Add {
        #[arg(long)]
        target: Uuid,
        /// ES384 (P-384) | RS384 (RSA 3072).
        #[arg(long, default_value = "ES384")]
        alg: String,
        /// Seconds before ohx signs with it (it is published at once).
        #[arg(long, default_value_t = 0)]
        activate_in: u64,
    },
    /// Stops signing with a key and removes it from the JWKS.
    Retire {
        #[arg(long)]
        target: Uuid,
        #[arg(long)]
        kid: String,
    },
    /// One line per key of the target: kid, alg, created, activates, retired (no key material).
    List {
        #[arg(long)]
        target: Uuid,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// One line per dead letter: id, stage, kind, reason (without detail), origin, time.
    List {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// One dead letter, with its headers' names.
    Show { id: String },
    /// Sends the selected dead letters to the topic they came from, marked with the header
    /// `ohx-redriven-from`; prints how many were sent.
    Redrive {
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Creates missing topics and alters existing ones (refuses retention above 24 h).
    Apply {
        #[arg(long, env = "OHX_TOPIC_REPLICATION", default_value_t = 1)]
        replication: i32,
    },
    /// Checks that every topic exists with retention ≤ 24 h.
    Check,
}

/// What a sync request needs to know about a link (columns 0–6, the link id last).
const LINK_CONTEXT: &str = "SELECT l.organization_id, p.ehr_target_id, l.patient_id, p.ehr_patient_reference, l.provider, l.provider_user_id, l.id \
     FROM provider_links l JOIN patients p ON p.id = l.patient_id";

/// Builds a sync request for the link of a [`LINK_CONTEXT`] row (`window`: `None` lets the
/// fetcher choose the trigger's window).
fn sync_request(
    row: &deadpool_postgres::tokio_postgres::Row,
    sync_request_id: String,
    trigger: &str,
    categories: &str,
    window: Option<(i64, i64)>,
    now: i64,
) -> SyncRequest {
    SyncRequest {
        context: Context {
            organization_id: row.get::<_, Uuid>(0).to_string(),
            ehr_target_id: row.get::<_, Uuid>(1).to_string(),
            patient_id: row.get::<_, Uuid>(2).to_string(),
            patient_reference: row.get(3),
            provider: row.get(4),
            link_id: row.get::<_, Uuid>(6).to_string(),
            provider_user_id: row.get(5),
            sync_request_id,
            trigger: trigger.to_string(),
            received_at: now,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        },
        categories: parse_categories(categories),
        window_start: window.map(|w| w.0),
        window_end: window.map(|w| w.1),
        provider_event: None,
    }
}

fn parse_categories(categories: &str) -> Vec<String> {
    categories
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

/// The NIGHTLY request id of a link for the UTC day of `now_ms`: a UUID (version 8, from
/// SHA-256), the same for every run of the reconciliation that day.
fn nightly_request_id(link: Uuid, now_ms: i64) -> String {
    let day = now_ms.div_euclid(86_400_000);
    let digest = Sha256::digest(format!("NIGHTLY\u{1f}{link}\u{1f}{day}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes).to_string()
}

fn producer() -> anyhow::Result<Producer> {
    Ok(Producer::new(
        &KafkaSettings::from_env(),
        Codec::from_env()?,
        std::time::Duration::from_secs(30),
        ohx_common::admin::Health::new(),
    )?)
}

fn print(v: serde_json::Value) {
    println!("{v}");
}

/// `{"patient", "fhir_version", "deliveries": [{"ehr_target_id", "patient_reference",
/// "fhir_version"}]}`: every target of the patient, its own first (`deliveries` empty when it
/// has only its own), and the FHIR version of its own target.
async fn deliveries_json(
    db: &deadpool_postgres::Client,
    patient: &Uuid,
) -> anyhow::Result<serde_json::Value> {
    let targets = ohx_common::db::patient_targets(db, patient)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no patient {patient}"))?;
    Ok(json!({
        "patient": patient,
        "fhir_version": targets.fhir_version,
        "deliveries": serde_json::to_value(targets.deliveries)?,
    }))
}

async fn db() -> anyhow::Result<deadpool_postgres::Client> {
    let pool = ohx_common::db::pool_from_env()?;
    Ok(pool.get().await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = tracing_subscriber_init();
    match cli.command {
        Command::Migrate => {
            let url = ohx_common::config::string(
                "OHX_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/ohx",
            );
            ohx_common::db::create_database(&url).await?;
            let pool = ohx_common::db::pool_from_env()?;
            let applied = ohx_common::db::migrate(&pool).await?;
            print(json!({"applied": applied}));
        }
        Command::Topics { action } => {
            let kafka = KafkaSettings::from_env();
            let defs = ohx_common::topics::definitions()?;
            match action {
                TopicsAction::Apply { replication } => {
                    let admin: AdminClient<DefaultClientContext> =
                        kafka.client_config().create()?;
                    let done = ohx_common::topics::apply(&admin, &defs, replication).await?;
                    for (name, what) in done {
                        print(
                            json!({"topic": name, "applied": format!("{what:?}").to_lowercase()}),
                        );
                    }
                }
                TopicsAction::Check => {
                    let admin: AdminClient<DefaultClientContext> =
                        kafka.client_config().create()?;
                    let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
                    ohx_common::topics::verify_broker_retention(&admin, &names).await?;
                    print(json!({"ok": names}));
                }
            }
        }
        Command::Schemas => register_schemas().await?,
        Command::CreateOrg { name } => {
            let id = Uuid::new_v4();
            db().await?
                .execute(
                    "INSERT INTO organizations (id, name) VALUES ($1, $2)",
                    &[&id, &name],
                )
                .await?;
            print(json!({"id": id}));
        }
        Command::CreateApiKey {
            org,
            role,
            name,
            expires_in_days,
        } => {
            if !["org_admin", "operator", "viewer"].contains(&role.as_str()) {
                bail!("--role {role} is not one of org_admin, operator, viewer");
            }
            let (key, hash, prefix) = ohx_common::crypto::new_api_key();
            let id = Uuid::new_v4();
            let client = db().await?;
            client
                .execute(
                    "INSERT INTO api_keys (id, organization_id, name, role, key_sha256, prefix, created_by, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, 'cli', now() + make_interval(days => $7))",
                    &[&id, &org, &name, &role, &hash, &prefix, &expires_in_days.clamp(1, 365)],
                )
                .await?;
            client
                .execute(
                    "INSERT INTO audit_log (organization_id, actor, action, subject) VALUES ($1, 'cli', 'api_key.create', $2)",
                    &[&org, &id.to_string()],
                )
                .await?;
            print(json!({"id": id, "key": key, "prefix": prefix}));
        }
        Command::CreateTarget {
            org,
            name,
            base_url,
            auth,
            client_id,
            token_url,
            scope,
            client_auth,
            token,
            mode,
            fhir_version,
        } => {
            if !ohx_common::records::FHIR_VERSIONS.contains(&fhir_version.as_str()) {
                bail!(
                    "--fhir-version {fhir_version} is not one of {:?}",
                    ohx_common::records::FHIR_VERSIONS
                );
            }
            let id = Uuid::new_v4();
            let seal = |t: &str| -> anyhow::Result<String> {
                Ok(SecretBox::from_env()?
                    .seal(t.as_bytes(), &format!("ehr_target:{id}:auth_secret"))?)
            };
            let secret = match (auth.as_str(), token) {
                ("none" | "smart_backend", None) => None,
                ("bearer" | "client_credentials", Some(t)) => Some(seal(&t)?),
                ("bearer" | "client_credentials", None) => {
                    bail!("--token (or OHX_TARGET_TOKEN) is required for {auth} auth")
                }
                ("none" | "smart_backend", Some(_)) => bail!("{auth} auth takes no --token"),
                (other, _) => bail!("auth {other} is not supported by this version"),
            };
            let mut settings = serde_json::Map::new();
            for (k, v) in [
                ("client_id", client_id),
                ("token_url", token_url),
                ("scope", scope),
                ("client_auth", client_auth),
            ] {
                if let Some(v) = v {
                    settings.insert(k.into(), v.into());
                }
            }
            let settings = serde_json::Value::Object(settings);
            if matches!(auth.as_str(), "client_credentials" | "smart_backend") {
                let parsed = publisher::auth::Settings::from_json(&settings)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if auth == "client_credentials" && parsed.token_url.is_none() {
                    bail!("--token-url is required for client_credentials auth");
                }
            } else if settings.as_object().is_some_and(|m| !m.is_empty()) {
                bail!("--client-id, --token-url, --scope and --client-auth are for OAuth2 targets");
            }
            db().await?
                .execute(
                    "INSERT INTO ehr_targets (id, organization_id, name, base_url, auth_kind, auth_secret, upsert_mode, auth_settings, fhir_version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                    &[&id, &org, &name, &base_url, &auth, &secret, &mode, &settings, &fhir_version],
                )
                .await?;
            print(json!({"id": id}));
        }
        Command::CreatePatient {
            org,
            target,
            reference,
        } => {
            let id = Uuid::new_v4();
            db().await?
                .execute(
                    "INSERT INTO patients (id, organization_id, ehr_target_id, ehr_patient_reference) VALUES ($1,$2,$3,$4)",
                    &[&id, &org, &target, &reference],
                )
                .await?;
            print(json!({"id": id}));
        }
        Command::AddDelivery {
            patient,
            target,
            reference,
        } => {
            let db = db().await?;
            let row = db
                .query_opt(
                    "SELECT p.organization_id = t.organization_id, p.ehr_target_id = t.id \
                     FROM patients p, ehr_targets t WHERE p.id = $1 AND t.id = $2",
                    &[&patient, &target],
                )
                .await?
                .context("no such patient or EHR target")?;
            anyhow::ensure!(
                row.get::<_, bool>(0),
                "the EHR target belongs to another organization than the patient"
            );
            anyhow::ensure!(
                !row.get::<_, bool>(1),
                "the EHR target is the patient's own target already"
            );
            db.execute(
                "INSERT INTO patient_deliveries (patient_id, ehr_target_id, ehr_patient_reference) \
                 VALUES ($1, $2, $3) ON CONFLICT (patient_id, ehr_target_id) \
                 DO UPDATE SET ehr_patient_reference = EXCLUDED.ehr_patient_reference",
                &[&patient, &target, &reference],
            )
            .await?;
            print(deliveries_json(&db, &patient).await?);
        }
        Command::RemoveDelivery { patient, target } => {
            let db = db().await?;
            let removed = db
                .execute(
                    "DELETE FROM patient_deliveries WHERE patient_id = $1 AND ehr_target_id = $2",
                    &[&patient, &target],
                )
                .await?;
            anyhow::ensure!(removed == 1, "the patient has no such added EHR target");
            print(deliveries_json(&db, &patient).await?);
        }
        Command::SetPolicy {
            org,
            patient,
            policy,
        } => {
            let value: serde_json::Value = serde_json::from_str(&policy)?;
            ohx_providers::policy::PolicyDoc::from_json(&value)?;
            let (sql, id) = match (org, patient) {
                (Some(org), _) => ("UPDATE organizations SET policy = $2 WHERE id = $1", org),
                (None, Some(patient)) => ("UPDATE patients SET policy = $2 WHERE id = $1", patient),
                (None, None) => anyhow::bail!("--org or --patient"),
            };
            let n = db().await?.execute(sql, &[&id, &value]).await?;
            anyhow::ensure!(n == 1, "no such organization or patient: {id}");
            print(json!({"id": id, "policy": value}));
        }
        Command::Consent {
            patient,
            data_type,
            refused,
        } => {
            db().await?
                .execute(
                    "INSERT INTO consents (patient_id, data_type, granted) VALUES ($1, $2, $3) \
                     ON CONFLICT (patient_id, data_type) DO UPDATE SET granted = EXCLUDED.granted, updated_at = now()",
                    &[&patient, &data_type, &!refused],
                )
                .await?;
            print(json!({"patient": patient, "data_type": data_type, "granted": !refused}));
        }
        Command::CreateApp {
            org,
            provider,
            client_id,
            client_secret,
            webhook_token,
            api_base_url,
            authorize_base_url,
        } => {
            let id = Uuid::new_v4();
            let secrets = SecretBox::from_env()?;
            let sealed = secrets.seal(
                client_secret.as_bytes(),
                &format!("provider_app:{id}:client_secret"),
            )?;
            let sealed_token = secrets.seal(
                webhook_token.as_bytes(),
                &format!("provider_app:{id}:webhook_token"),
            )?;
            let token_hash = hex::encode(Sha256::digest(webhook_token.as_bytes()));
            db().await?
                .execute(
                    "INSERT INTO provider_apps (id, organization_id, provider, client_id, client_secret, webhook_token_sha256, api_base_url, webhook_token_sealed, authorize_base_url) \
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                    &[&id, &org, &provider, &client_id, &sealed, &token_hash, &api_base_url, &sealed_token, &authorize_base_url],
                )
                .await?;
            print(
                json!({"id": id, "webhook_path": format!("/webhooks/{provider}?token=<webhook token>")}),
            );
        }
        Command::Connect {
            patient,
            app,
            expires_in,
        } => {
            let public = std::env::var("OHX_PUBLIC_URL")
                .context("OHX_PUBLIC_URL: the gateway's public base URL (for the callback)")?;
            let url = fetcher::links::start_connect(
                &ohx_common::db::pool_from_env()?,
                &SecretBox::from_env()?,
                &ohx_providers::Registry::standard(Default::default())?,
                &public,
                fetcher::links::ConnectRequest {
                    org: None,
                    patient,
                    app,
                    expires_in_s: u32::try_from(expires_in).unwrap_or(u32::MAX),
                },
            )
            .await?
            .context("unknown app, or a patient of another organization")?;
            print(json!({"authorize_url": url, "expires_in": expires_in}));
        }
        Command::RotateKey => {
            let report = ohx_common::rotate::rotate(
                &ohx_common::db::pool_from_env()?,
                &SecretBox::from_env()?,
            )
            .await?;
            print(serde_json::to_value(report)?);
        }
        Command::Disconnect { link } => {
            let pool = ohx_common::db::pool_from_env()?;
            let secrets = SecretBox::from_env()?;
            let store = fetcher::store::Store::new(pool, secrets.clone());
            let public = std::env::var("OHX_PUBLIC_URL").context("OHX_PUBLIC_URL")?;
            let revoked = fetcher::links::disconnect(
                &store,
                &secrets,
                &ohx_providers::Registry::standard(Default::default())?,
                &reqwest::Client::new(),
                &public,
                link,
            )
            .await?;
            print(json!({"link": link, "status": "disabled", "subscriptions_revoked": revoked}));
        }
        Command::CreateLink {
            app,
            patient,
            provider_user_id,
            access_token,
            refresh_token,
            expires_in,
        } => {
            let id = Uuid::new_v4();
            let secrets = SecretBox::from_env()?;
            let access = access_token
                .map(|t| secrets.seal(t.as_bytes(), &format!("provider_link:{id}:access_token")))
                .transpose()?;
            let refresh = refresh_token
                .map(|t| secrets.seal(t.as_bytes(), &format!("provider_link:{id}:refresh_token")))
                .transpose()?;
            let client = db().await?;
            let row = client
                .query_one(
                    "SELECT organization_id, provider FROM provider_apps WHERE id = $1",
                    &[&app],
                )
                .await
                .context("unknown provider app")?;
            let org: Uuid = row.get(0);
            let provider: String = row.get(1);
            client
                .execute(
                    "INSERT INTO provider_links (id, organization_id, patient_id, provider_app_id, provider, provider_user_id, access_token, refresh_token, token_expires_at) \
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8, now() + make_interval(secs => $9))",
                    &[&id, &org, &patient, &app, &provider, &provider_user_id, &access, &refresh, &(expires_in as f64)],
                )
                .await?;
            print(json!({"id": id}));
        }
        Command::Sync {
            link,
            trigger,
            categories,
            days,
        } => {
            let row = db()
                .await?
                .query_one(&format!("{LINK_CONTEXT} WHERE l.id = $1"), &[&link])
                .await
                .context("unknown link")?;
            let now = chrono::Utc::now().timestamp_millis();
            let request = sync_request(
                &row,
                Uuid::new_v4().to_string(),
                &trigger.to_uppercase(),
                &categories,
                Some((now - days * 86_400_000, now)),
                now,
            );
            producer()?
                .send_record(topic::SYNC_REQUESTS, &request.context.link_id, &request)
                .await?;
            print(json!({"sync_request_id": request.context.sync_request_id}));
        }
        Command::Reconcile { categories } => {
            let rows = db()
                .await?
                .query(
                    &format!("{LINK_CONTEXT} WHERE l.status = 'active' ORDER BY l.id"),
                    &[],
                )
                .await?;
            let now = chrono::Utc::now().timestamp_millis();
            let producer = producer()?;
            let mut sent = 0usize;
            // Links of providers the fetcher cannot fetch (Beurer: imports only) have nothing
            // to reconcile.
            let providers = ohx_providers::Registry::standard(Default::default())?;
            let rows: Vec<_> = rows
                .into_iter()
                .filter(|r| providers.get(r.get::<_, &str>(4)).is_some())
                .collect();
            for row in &rows {
                let link: Uuid = row.get(6);
                let request = sync_request(
                    row,
                    nightly_request_id(link, now),
                    "NIGHTLY",
                    &categories,
                    None,
                    now,
                );
                producer
                    .send_record(topic::SYNC_REQUESTS, &request.context.link_id, &request)
                    .await
                    .with_context(|| {
                        format!("link {link}: sync request not stored ({sent} sent)")
                    })?;
                sent += 1;
            }

            print(json!({"links": rows.len(), "sent": sent}));
        }
        Command::Dlq { action } => {
            let kafka = KafkaSettings::from_env();
            let codec = Codec::from_env()?;
            let letters = dlq::read(&kafka, &codec, std::time::Duration::from_secs(60)).await?;
            match action {
                DlqAction::List { filter } => {
                    let selection = filter.selection()?;
                    for (id, dl) in letters.iter().filter(|(id, dl)| selection.selects(*id, dl)) {
                        print(dlq::describe(*id, dl));
                    }
                }
                DlqAction::Show { id } => {
                    let wanted = dlq::parse_ids(&id)?;
                    let (id, dl) = letters
                        .iter()
                        .find(|(i, _)| wanted.contains(i))
                        .with_context(|| format!("no dead letter {id}"))?;
                    let mut v = dlq::describe(*id, dl);
                    v["headers"] = json!(dl.headers.iter().map(|h| &h.key).collect::<Vec<_>>());
                    print(v);
                }
                DlqAction::Redrive { filter, dry_run } => {
                    let outcome =
                        dlq::redrive(&letters, &filter.selection()?, &producer()?, dry_run).await?;
                    print(outcome);
                }
            }
        }
        Command::SetTargetSecret { target, token } => {
            let sealed = SecretBox::from_env()?.seal(
                token.as_bytes(),
                &format!("ehr_target:{target}:auth_secret"),
            )?;
            let n = db()
                .await?
                .execute(
                    "UPDATE ehr_targets SET auth_secret = $2 WHERE id = $1 AND auth_kind IN ('bearer', 'client_credentials')",
                    &[&target, &sealed],
                )
                .await?;
            anyhow::ensure!(n == 1, "no bearer or client_credentials target {target}");
            print(json!({"id": target}));
        }
        Command::TargetKey { action } => {
            for line in target_key(&db().await?, action).await? {
                print(line);
            }
        }
        Command::Targets => {
            let now = chrono::Utc::now().timestamp_millis();
            for t in targets::list(&db().await?, now).await? {
                print(t);
            }
        }
        Command::Lag { group, interval_ms } => {
            let kafka = KafkaSettings::from_env();
            let groups: Vec<(String, String)> = inspect::PIPELINE_GROUPS
                .iter()
                .filter(|(g, _)| group.as_deref().is_none_or(|w| w == *g))
                .map(|(g, t)| (g.to_string(), t.to_string()))
                .collect();
            if groups.is_empty() {
                bail!(
                    "not a pipeline group; known: {:?}",
                    inspect::PIPELINE_GROUPS
                );
            }
            let look = |groups: Vec<(String, String)>| {
                let kafka = kafka.clone();
                tokio::task::spawn_blocking(move || {
                    groups
                        .iter()
                        .map(|(g, t)| inspect::group_offsets(&kafka, g, t))
                        .collect::<Result<Vec<_>, _>>()
                })
            };
            let before = look(groups.clone()).await??;
            tokio::time::sleep(Duration::from_millis(interval_ms.max(1))).await;
            let after = look(groups.clone()).await??;
            for (((g, t), b), a) in groups.iter().zip(before).zip(after) {
                let lag: i64 = a.iter().map(inspect::PartitionOffsets::lag).sum();
                let moved: i64 = a
                    .iter()
                    .zip(&b)
                    .map(|(a, b)| (a.committed - b.committed).max(0))
                    .sum();
                let rate = moved as f64 * 1000.0 / interval_ms.max(1) as f64;
                print(json!({
                    "group": g,
                    "topic": t,
                    "lag": lag,
                    "committed_per_s": rate,
                    "drain_s": (rate > 0.0).then(|| lag as f64 / rate),
                    "partitions": a.iter().map(|p| json!({
                        "partition": p.partition, "committed": p.committed, "end": p.high, "lag": p.lag(),
                    })).collect::<Vec<_>>(),
                }));
            }
        }
        Command::Replay {
            group,
            topic,
            from,
            from_ms,
            dry_run,
        } => {
            let from_ms = from.map(|t| t.timestamp_millis()).or(from_ms);
            let kafka = KafkaSettings::from_env();
            let fresh = ohx_common::config::millis("OHX_ORPHAN_AFTER_MS", 45_000)?;
            let (g, t) = (group.clone(), topic.clone());
            let kafka_for_claims = kafka.clone();
            let claims = tokio::task::spawn_blocking(move || {
                ohx_common::kafka::leases::read_claims(&kafka_for_claims, &g, &t)
            })
            .await??;
            let now = chrono::Utc::now().timestamp_millis();
            let live = ohx_common::kafka::leases::live(&claims, now, fresh.as_millis() as i64);
            if !live.is_empty() {
                let detail: Vec<String> = live
                    .iter()
                    .map(|((_, p), age)| format!("partition {p} claimed {} s ago", age / 1000))
                    .collect();
                bail!(
                    "group {group} has live members ({}): stop the stage first",
                    detail.join(", ")
                );
            }
            let consumer: BaseConsumer = kafka
                .client_config()
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create()?;
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                bail!("topic {topic} has no partitions");
            }
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                let offset = match from_ms {
                    None => {
                        consumer
                            .fetch_watermarks(&topic, *p, Duration::from_secs(10))?
                            .0
                    }
                    Some(ms) => {
                        let mut q = TopicPartitionList::new();
                        q.add_partition_offset(&topic, *p, Offset::Offset(ms))?;
                        let found = consumer.offsets_for_times(q, Duration::from_secs(10))?;
                        let (low, high) =
                            consumer.fetch_watermarks(&topic, *p, Duration::from_secs(10))?;
                        match found.find_partition(&topic, *p).map(|e| e.offset()) {
                            // Kept within the log. tansu 0.6 answers offset 0 when no record
                            // is that recent: the whole partition is replayed, which is safe
                            // (replays add no versions), only slower.
                            Some(Offset::Offset(o)) => o.clamp(low, high),
                            _ => high,
                        }
                    }
                };
                tpl.add_partition_offset(&topic, *p, Offset::Offset(offset))?;
            }
            let committed = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10))?;
            let offsets: Vec<_> = tpl
                .elements()
                .iter()
                .map(|e| {
                    let to = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    let was = committed
                        .find_partition(&topic, e.partition())
                        .and_then(|c| match c.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        });
                    json!({"partition": e.partition(), "from": was, "to": to})
                })
                .collect();
            if dry_run {
                print(json!({"group": group, "topic": topic, "would_rewind": offsets}));
                return Ok(());
            }
            consumer
                .commit(&tpl, CommitMode::Sync)
                .context("commit failed (is the stage stopped?)")?;
            print(json!({"group": group, "topic": topic, "rewound": offsets}));
        }
    }
    Ok(())
}

fn tracing_subscriber_init() -> anyhow::Result<()> {
    // The CLI prints results as JSON on stdout; logs go to stderr at warn level.
    ohx_common::telemetry::init_cli()
}

/// Runs a `target-key` action; returns the lines to print.
async fn target_key(
    client: &deadpool_postgres::Client,
    action: TargetKeyAction,
) -> anyhow::Result<Vec<serde_json::Value>> {
    match action {
        TargetKeyAction::Add {
            target,
            alg,
            activate_in,
        } => {
            let secrets = SecretBox::from_env()?;
            Ok(vec![
                targets::add_key(client, &secrets, target, &alg, activate_in).await?,
            ])
        }
        TargetKeyAction::Retire { target, kid } => {
            Ok(vec![targets::retire_key(client, target, &kid).await?])
        }
        TargetKeyAction::List { target } => targets::list_keys(client, target).await,
    }
}

async fn register_schemas() -> anyhow::Result<()> {
    let registry = ohx_common::config::string("OHX_SCHEMA_REGISTRY", "embedded");
    let defs = ohx_common::topics::definitions()?;
    if registry == "embedded" {
        let ids: std::collections::BTreeMap<String, u32> =
            toml::from_str(ohx_common::codec::REGISTRY_TOML)?;
        for d in &defs {
            print(
                json!({"subject": format!("{}-value", d.name), "schema": d.value_schema, "id": ids.get(&d.value_schema), "mode": "embedded"}),
            );
        }
        return Ok(());
    }
    let http = reqwest::Client::new();
    for d in &defs {
        let raw = SCHEMA_FILES
            .iter()
            .find(|(f, _)| *f == d.value_schema)
            .map(|(_, raw)| *raw)
            .with_context(|| format!("schema {} missing", d.value_schema))?;
        let subject = format!("{}-value", d.name);
        let url = format!(
            "{}/subjects/{}/versions",
            registry.trim_end_matches('/'),
            subject
        );
        let resp = http
            .post(&url)
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .json(&json!({"schema": raw, "schemaType": "AVRO"}))
            .send()
            .await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or(json!(null));
        if !status.is_success() {
            bail!("registering {subject} failed: {status} {body}");
        }
        print(json!({"subject": subject, "id": body.get("id"), "mode": "http"}));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn test_nightly_request_id_is_stable_per_link_and_utc_day() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let day = 86_400_000;
        let t = 20_000 * day + 5;
        assert_eq!(
            nightly_request_id(a, t),
            nightly_request_id(a, t + day - 10)
        );
        assert_ne!(nightly_request_id(a, t), nightly_request_id(a, t + day));
        assert_ne!(nightly_request_id(a, t), nightly_request_id(b, t));
        assert!(Uuid::parse_str(&nightly_request_id(a, t)).is_ok());
    }

    #[test]
    fn test_parse_categories() {
        assert_eq!(
            parse_categories(" blood_pressure, ,heart_rate"),
            vec!["blood_pressure", "heart_rate"]
        );
    }
}
