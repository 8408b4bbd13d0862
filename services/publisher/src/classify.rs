//! The error taxonomy of publishing, as pure functions over what the EHR answered.
//!
//! Three kinds of failure, handled differently:
//! * **a resource's content** ([`Class::Resource`]): the server rejects that one resource (422,
//!   or 400/409/412 with an OperationOutcome about its content, while the rest goes through).
//!   It goes to the dead-letter topic with the outcome; the target keeps flowing.
//! * **the target** ([`Class::Target`]): the target refuses us or is not where it is configured
//!   (401, 403, 404 and 410 on the endpoint, 405, 406/415, 501, connection refused, an unknown
//!   host, TLS, a FHIR version other than R5, a target whose configuration cannot be used).
//!   Nothing is dead-lettered: the target's records are held, its circuit breaker opens and the
//!   target is flagged until a probe succeeds (configuration is reloaded before probing).
//! * **transient** ([`Class::Transient`]): 408, 429, 5xx, timeouts, a connection cut midway.
//!   The target's records are held and retried after Retry-After or a backoff.
//!
//! A transaction is atomic: one invalid resource fails all of them, so a 400/409/412/413/422
//! for a transaction of several resources says nothing yet about which one; it is
//! [`Class::Isolate`]d (retried resource by resource). If every resource of the isolation is
//! then refused with 400/409/412 and none goes through, the server refuses everything we send:
//! that is the target's problem, not the resources' ([`isolation_blames_target`]).

use serde_json::Value;
use std::time::Duration;

/// Why a whole target cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFault {
    /// 401: credentials refused (reloaded from the configuration before the next probe).
    Unauthorized,
    /// 403: the credentials lack a scope or the client is not allowed.
    Forbidden,
    /// 404/410 on the base or type endpoint: wrong base URL.
    NotFound,
    /// 405/501: the endpoint does not accept transactions or this method.
    NotSupported,
    /// 406/415 or a `fhirVersion` other than 5.x: not an R5 endpoint for our format.
    FhirVersion,
    /// Connection refused, unknown host, unreachable network.
    Connection,
    /// TLS handshake or certificate failure.
    Tls,
    /// The server refuses every resource, or answers something unclassified (other 4xx).
    Refused,
    /// The target's configuration cannot be used (credentials cannot be opened, unknown auth).
    Unusable,
}

impl TargetFault {
    /// A label for logs and metrics (no values).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetFault::Unauthorized => "unauthorized",
            TargetFault::Forbidden => "forbidden",
            TargetFault::NotFound => "not_found",
            TargetFault::NotSupported => "not_supported",
            TargetFault::FhirVersion => "fhir_version",
            TargetFault::Connection => "connection",
            TargetFault::Tls => "tls",
            TargetFault::Refused => "refused",
            TargetFault::Unusable => "unusable",
        }
    }
}

/// What to do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The resource's content is rejected: dead letter it with the outcome.
    Resource,
    /// A transaction of several resources was rejected: retry them one by one.
    Isolate,
    /// The target is misconfigured or refuses us: hold its records, open its breaker.
    Target(TargetFault),
    /// Retry later (after `retry_after` if the server said so).
    Transient { retry_after: Option<Duration> },
}

/// What a failed call carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The `batch` read of the current state of the resources.
    Read,
    /// A `transaction` of this many upserts.
    Transaction { entries: usize },
}

/// OperationOutcome issue codes that describe a resource's content (as opposed to security,
/// throttling or server trouble).
const CONTENT_ISSUES: &[&str] = &[
    "invalid",
    "structure",
    "required",
    "value",
    "invariant",
    "code-invalid",
    "extension",
    "business-rule",
    "conflict",
    "duplicate",
    "multiple-matches",
    "not-found",
    "processing",
    "incomplete",
];

/// Whether `body` is an OperationOutcome whose error issues are all about content.
pub fn outcome_is_about_content(body: &str) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return false;
    };
    if v.get("resourceType").and_then(Value::as_str) != Some("OperationOutcome") {
        return false;
    }
    let Some(issues) = v.get("issue").and_then(Value::as_array) else {
        return false;
    };
    let errors: Vec<&str> = issues
        .iter()
        .filter(|i| {
            matches!(
                i.get("severity").and_then(Value::as_str),
                Some("error" | "fatal") | None
            )
        })
        .map(|i| i.get("code").and_then(Value::as_str).unwrap_or(""))
        .collect();
    !errors.is_empty() && errors.iter().all(|c| CONTENT_ISSUES.contains(c))
}

/// Classifies an HTTP error status (not 2xx) answered to a call of `scope`.
pub fn classify_status(
    status: u16,
    scope: Scope,
    body: &str,
    retry_after: Option<Duration>,
) -> Class {
    match status {
        408 | 429 | 500 | 502..=599 => Class::Transient { retry_after },
        401 => Class::Target(TargetFault::Unauthorized),
        403 => Class::Target(TargetFault::Forbidden),
        404 | 410 => Class::Target(TargetFault::NotFound),
        405 | 501 => Class::Target(TargetFault::NotSupported),
        406 | 415 => Class::Target(TargetFault::FhirVersion),
        400 | 409 | 412 | 413 | 422 => match scope {
            // Reads of resources by id carry no content: the server refuses our requests.
            Scope::Read => Class::Target(TargetFault::Refused),
            Scope::Transaction { entries } if entries > 1 => Class::Isolate,
            Scope::Transaction { .. } => {
                if status == 422 || status == 413 || outcome_is_about_content(body) {
                    Class::Resource
                } else {
                    // A 400 without an outcome about the content (a proxy's page, a
                    // security issue): not the resource's fault.
                    Class::Target(TargetFault::Refused)
                }
            }
        },
        _ => Class::Target(TargetFault::Refused),
    }
}

/// What a transport failure looked like (from `reqwest::Error`, kept pure for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransportError<'a> {
    pub timeout: bool,
    pub connect: bool,
    /// The error and its sources, joined (searched for the cause).
    pub chain: &'a str,
}

/// Classifies a call that got no HTTP answer.
pub fn classify_transport(e: TransportError<'_>) -> Class {
    let chain = e.chain.to_ascii_lowercase();
    let any = |needles: &[&str]| needles.iter().any(|n| chain.contains(n));
    if any(&["certificate", "tls", "ssl", "handshake"]) {
        return Class::Target(TargetFault::Tls);
    }
    if e.timeout {
        return Class::Transient { retry_after: None };
    }
    if any(&[
        "connection refused",
        "dns error",
        "failed to lookup",
        "name or service not known",
        "no such host",
        "network is unreachable",
        "invalid url",
        "relative url",
        "builder error",
    ]) {
        return Class::Target(TargetFault::Connection);
    }
    // Reset, closed midway, a proxy hiccup: try again.
    Class::Transient { retry_after: None }
}

/// The `fhirVersion` of a target's FHIR version (`R4` or `R5`), as the `Content-Type`
/// parameter names it (FHIR R4 and R5 §3.1.0.1.5: `4.0`, `5.0`).
pub fn mime_fhir_version(version: &str) -> &'static str {
    if version == ohx_common::records::FHIR_R4 {
        "4.0"
    } else {
        "5.0"
    }
}

/// Flags a response whose `Content-Type` `fhirVersion` parameter names another FHIR version
/// than the target's (`expected`, e.g. `5.0`); a response without one passes.
pub fn wrong_fhir_version(content_type: Option<&str>, expected: &str) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let major = |v: &str| v.split('.').next().unwrap_or_default().to_owned();
    ct.split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("fhirVersion"))
        .is_some_and(|(_, v)| major(v.trim().trim_matches('"')) != major(expected))
}

/// Decides, after a transaction was isolated resource by resource, whether the refusals blame
/// the target: `refusals` holds, per resource, `None` if it went through or the status that
/// refused it. True when there were several, none went through and none was a 422 (a content
/// validation failure is the resource's own).
pub fn isolation_blames_target(refusals: &[Option<u16>]) -> bool {
    refusals.len() > 1 && refusals.iter().all(Option::is_some) && !refusals.contains(&Some(422))
}

/// Parses `Retry-After` (seconds, or an HTTP date relative to `now_ms`).
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = at.timestamp_millis().saturating_sub(now_ms).max(0);
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"x"}]}"#;
    const SECURITY: &str =
        r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"security"}]}"#;
    const ONE: Scope = Scope::Transaction { entries: 1 };
    const MANY: Scope = Scope::Transaction { entries: 5 };

    fn c(status: u16, scope: Scope, body: &str) -> Class {
        classify_status(status, scope, body, None)
    }

    #[test]
    fn test_transient_statuses_keep_retry_after() {
        let ra = Some(Duration::from_secs(7));
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(
                classify_status(s, MANY, "", ra),
                Class::Transient { retry_after: ra },
                "{s}"
            );
            assert_eq!(
                c(s, Scope::Read, ""),
                Class::Transient { retry_after: None }
            );
        }
    }

    #[test]
    fn test_target_level_statuses_whatever_the_scope() {
        use TargetFault::*;
        for (s, f) in [
            (401, Unauthorized),
            (403, Forbidden),
            (404, NotFound),
            (410, NotFound),
            (405, NotSupported),
            (501, NotSupported),
            (406, FhirVersion),
            (415, FhirVersion),
            (418, Refused),
        ] {
            for scope in [Scope::Read, ONE, MANY] {
                assert_eq!(c(s, scope, CONTENT), Class::Target(f), "{s} {scope:?}");
            }
        }
    }

    #[test]
    fn test_422_is_the_resources_fault_alone_and_isolated_in_a_transaction() {
        assert_eq!(c(422, ONE, ""), Class::Resource);
        assert_eq!(c(422, ONE, CONTENT), Class::Resource);
        assert_eq!(c(422, MANY, CONTENT), Class::Isolate);
        assert_eq!(c(413, ONE, ""), Class::Resource);
        assert_eq!(c(413, MANY, ""), Class::Isolate);
    }

    #[test]
    fn test_400_409_412_blame_the_resource_only_with_a_content_outcome() {
        for s in [400, 409, 412] {
            assert_eq!(c(s, MANY, ""), Class::Isolate, "{s}");
            assert_eq!(c(s, ONE, CONTENT), Class::Resource, "{s}");
            assert_eq!(
                c(s, ONE, SECURITY),
                Class::Target(TargetFault::Refused),
                "{s}"
            );
            assert_eq!(
                c(s, ONE, "<html>bad gateway</html>"),
                Class::Target(TargetFault::Refused)
            );
        }
    }

    #[test]
    fn test_a_rejected_read_blames_the_target() {
        for s in [400, 409, 412, 422] {
            assert_eq!(
                c(s, Scope::Read, CONTENT),
                Class::Target(TargetFault::Refused)
            );
        }
    }

    #[test]
    fn test_outcome_about_content_ignores_warnings_and_needs_errors() {
        let mixed = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"security"},{"severity":"error","code":"required"}]}"#;
        assert!(outcome_is_about_content(mixed));
        let none = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]}"#;
        assert!(!outcome_is_about_content(none));
        assert!(!outcome_is_about_content(r#"{"resourceType":"Patient"}"#));
        assert!(!outcome_is_about_content(SECURITY));
    }

    #[test]
    fn test_transport_failures() {
        let t = |timeout, connect, chain| {
            classify_transport(TransportError {
                timeout,
                connect,
                chain,
            })
        };
        let transient = Class::Transient { retry_after: None };
        assert_eq!(t(true, false, "operation timed out"), transient);
        assert_eq!(
            t(
                false,
                true,
                "error trying to connect: tcp connect error: Connection refused (os error 111)"
            ),
            Class::Target(TargetFault::Connection)
        );
        assert_eq!(
            t(
                false,
                true,
                "dns error: failed to lookup address information"
            ),
            Class::Target(TargetFault::Connection)
        );
        assert_eq!(
            t(
                false,
                true,
                "error trying to connect: the handshake failed: certificate verify failed"
            ),
            Class::Target(TargetFault::Tls)
        );
        assert_eq!(
            t(false, false, "connection closed before message completed"),
            transient
        );
        assert_eq!(t(false, true, "connection reset by peer"), transient);
    }

    #[test]
    fn test_fhir_version_from_content_type() {
        let r5 = mime_fhir_version(ohx_common::records::FHIR_R5);
        let r4 = mime_fhir_version(ohx_common::records::FHIR_R4);
        assert_eq!((r4, r5), ("4.0", "5.0"));
        assert!(!wrong_fhir_version(None, r5));
        assert!(!wrong_fhir_version(Some("application/fhir+json"), r5));
        assert!(!wrong_fhir_version(
            Some("application/fhir+json; fhirVersion=5.0"),
            r5
        ));
        let r4_answer = "application/fhir+json; charset=utf-8; fhirVersion=4.0";
        assert!(wrong_fhir_version(Some(r4_answer), r5));
        assert!(
            !wrong_fhir_version(Some(r4_answer), r4),
            "right for an R4 target"
        );
        assert!(wrong_fhir_version(
            Some("application/fhir+json; fhirVersion=\"5.0\""),
            r4
        ));
    }

    #[test]
    fn test_isolation_blames_the_target_only_when_everything_is_refused() {
        assert!(isolation_blames_target(&[Some(400), Some(400)]));
        assert!(isolation_blames_target(&[Some(409), Some(412), Some(400)]));
        assert!(!isolation_blames_target(&[Some(400)]));
        assert!(!isolation_blames_target(&[Some(400), None]));
        assert!(!isolation_blames_target(&[Some(422), Some(422)]));
        assert!(!isolation_blames_target(&[]));
    }

    #[test]
    fn test_retry_after_seconds_and_http_date() {
        assert_eq!(parse_retry_after(" 30 ", 0), Some(Duration::from_secs(30)));
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT")
            .unwrap()
            .timestamp_millis();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
