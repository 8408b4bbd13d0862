//! `ohx targets`: every EHR target with its delivery status as the publisher replicas recorded
//! it (`ehr_target_status`): breaker state, fault flag, failures and held records. Never a
//! secret: the credentials stay sealed in the database.

use ohx_common::target_status::{Row, summarize};
use serde_json::{Value, json};

/// Prints one line per target.
pub async fn list(client: &deadpool_postgres::Client, now_ms: i64) -> anyhow::Result<Vec<Value>> {
    let rows = client
        .query(
            "SELECT t.id::text, t.organization_id::text, t.name, t.base_url, t.auth_kind, t.upsert_mode,
                    s.instance, s.breaker, s.fault, s.failures, s.held,
                    (extract(epoch FROM s.not_before) * 1000)::bigint,
                    (extract(epoch FROM s.updated_at) * 1000)::bigint, t.fhir_version
             FROM ehr_targets t LEFT JOIN ehr_target_status s ON s.ehr_target_id = t.id
             ORDER BY t.organization_id, t.name, t.id, s.instance",
            &[],
        )
        .await?;
    let mut out: Vec<(Value, Vec<Row>)> = Vec::new();
    for r in rows {
        let id: String = r.get(0);
        if out.last().is_none_or(|(t, _)| t["id"] != id.as_str()) {
            out.push((
                json!({
                    "id": id,
                    "organization_id": r.get::<_, String>(1),
                    "name": r.get::<_, String>(2),
                    "base_url": r.get::<_, String>(3),
                    "auth": r.get::<_, String>(4),
                    "mode": r.get::<_, String>(5),
                    "fhir_version": r.get::<_, String>(13),
                }),
                Vec::new(),
            ));
        }
        if let (Some(instance), Some((_, rows))) = (r.get::<_, Option<String>>(6), out.last_mut()) {
            rows.push(Row {
                instance,
                breaker: r.get(7),
                fault: r.get(8),
                failures: r.get(9),
                held: r.get(10),
                not_before_ms: r.get(11),
                updated_at_ms: r.get(12),
            });
        }
    }
    Ok(out
        .into_iter()
        .map(|(mut target, rows)| {
            if let (Value::Object(t), Value::Object(s)) = (&mut target, summarize(&rows, now_ms)) {
                t.extend(s);
            }
            target
        })
        .collect())
}

/// Generates a key pair for a SMART Backend Services target and stores it (private key
/// sealed); returns its kid, algorithm, activation time and the gateway path of the JWKS.
pub async fn add_key(
    client: &deadpool_postgres::Client,
    secrets: &ohx_common::crypto::SecretBox,
    target: uuid::Uuid,
    alg: &str,
    activate_in_s: u64,
) -> anyhow::Result<Value> {
    let parsed = publisher::auth::Alg::parse(alg)
        .ok_or_else(|| anyhow::anyhow!("--alg must be ES384 or RS384, not {alg}"))?;
    let kind: Option<String> = client
        .query_opt(
            "SELECT auth_kind FROM ehr_targets WHERE id = $1",
            &[&target],
        )
        .await?
        .map(|r| r.get(0));
    match kind.as_deref() {
        Some("smart_backend") => {}
        Some(other) => {
            anyhow::bail!("target {target} authenticates with {other}, not smart_backend")
        }
        None => anyhow::bail!("no such target: {target}"),
    }
    let kid = uuid::Uuid::new_v4().to_string();
    let (pem, jwk) = publisher::auth::generate_key(parsed, &kid).map_err(anyhow::Error::msg)?;
    let sealed = secrets.seal(pem.as_bytes(), &format!("ehr_target_key:{target}:{kid}"))?;
    let delay = i64::try_from(activate_in_s)?;
    let row = client
        .query_one(
            "INSERT INTO ehr_target_keys (ehr_target_id, kid, alg, private_key, public_jwk, activates_at)
             VALUES ($1, $2, $3, $4, $5, clock_timestamp() + make_interval(secs => $6::bigint))
             RETURNING (extract(epoch FROM activates_at) * 1000)::bigint",
            &[&target, &kid, &alg, &sealed, &jwk, &delay],
        )
        .await?;
    let activates_ms: i64 = row.get(0);
    Ok(json!({
        "kid": kid,
        "alg": alg,
        "activates_at_ms": activates_ms,
        "jwks_path": format!("/ehr-targets/{target}/jwks.json"),
    }))
}

/// Retires a key: it no longer signs and leaves the JWKS.
pub async fn retire_key(
    client: &deadpool_postgres::Client,
    target: uuid::Uuid,
    kid: &str,
) -> anyhow::Result<Value> {
    let n = client
        .execute(
            "UPDATE ehr_target_keys SET retired_at = clock_timestamp()
             WHERE ehr_target_id = $1 AND kid = $2 AND retired_at IS NULL",
            &[&target, &kid],
        )
        .await?;
    anyhow::ensure!(n == 1, "target {target} has no unretired key {kid}");
    Ok(json!({"kid": kid, "retired": true}))
}

/// The target's keys, newest first, without key material.
pub async fn list_keys(
    client: &deadpool_postgres::Client,
    target: uuid::Uuid,
) -> anyhow::Result<Vec<Value>> {
    let rows = client
        .query(
            "SELECT kid, alg, (extract(epoch FROM created_at) * 1000)::bigint,
                    (extract(epoch FROM activates_at) * 1000)::bigint,
                    (extract(epoch FROM retired_at) * 1000)::bigint
             FROM ehr_target_keys WHERE ehr_target_id = $1 ORDER BY created_at DESC",
            &[&target],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            json!({
                "kid": r.get::<_, String>(0),
                "alg": r.get::<_, String>(1),
                "created_at_ms": r.get::<_, i64>(2),
                "activates_at_ms": r.get::<_, i64>(3),
                "retired_at_ms": r.get::<_, Option<i64>>(4),
            })
        })
        .collect())
}
