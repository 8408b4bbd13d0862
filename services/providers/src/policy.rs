//! What an organization (overridable per patient) lets ohx fetch, and how: enabled data types,
//! consents per data type, aggregation per data type, and whether readings a device is not
//! sure belong to this patient are accepted. Pure: the fetcher loads the documents, the
//! adapters ask [`Policy::allows`] before they request a data type.

use ohx_common::records::{AGGREGATION_HOURLY, AGGREGATION_INDIVIDUAL};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The policy document stored on `organizations.policy` and `patients.policy` (JSON). A
/// field left out of a patient's document takes the organization's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// Data types never fetched (e.g. `body_fat_percentage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_data_types: Option<BTreeSet<String>>,
    /// Fetch only data types the patient consented to (a `granted` row in `consents`).
    /// Without it, only an explicit refusal stops a data type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_consent: Option<bool>,
    /// Per data type: `INDIVIDUAL` (one Observation per reading) or `HOURLY` (statistics per
    /// UTC hour); a data type not named keeps its provider's default.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aggregation: BTreeMap<String, String>,
    /// `hold` (default): a reading the device attributes to this user only possibly (Withings
    /// `attrib` 1) is held back and counted; `accept`: it is synced like any device reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ambiguous_readings: Option<String>,
}

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy: {0}")]
pub struct PolicyError(pub String);

/// The stored policy of a patient as SQL columns: the organization's document, the patient's,
/// and the patient's consents as one JSON object. Needs `organizations o` and `patients p` in
/// the query; read the three columns with [`Policy::from_stored`].
pub const POLICY_COLUMNS: &str = "o.policy, p.policy, \
     COALESCE((SELECT jsonb_object_agg(c.data_type, c.granted) FROM consents c \
     WHERE c.patient_id = p.id), '{}'::jsonb)";

impl PolicyDoc {
    /// Parses and checks a document (an empty or null document is the default).
    ///
    /// # Errors
    /// Unknown fields, an aggregation other than `INDIVIDUAL`/`HOURLY`, an
    /// `ambiguous_readings` other than `hold`/`accept`.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, PolicyError> {
        if value.is_null() {
            return Ok(Self::default());
        }
        let doc: Self =
            serde_json::from_value(value.clone()).map_err(|e| PolicyError(e.to_string()))?;
        for (data_type, a) in &doc.aggregation {
            if a != AGGREGATION_INDIVIDUAL && a != AGGREGATION_HOURLY {
                return Err(PolicyError(format!(
                    "aggregation of {data_type} must be INDIVIDUAL or HOURLY, not {a:?}"
                )));
            }
        }
        if let Some(a) = &doc.ambiguous_readings
            && a != "hold"
            && a != "accept"
        {
            return Err(PolicyError(format!(
                "ambiguous_readings must be hold or accept, not {a:?}"
            )));
        }
        Ok(doc)
    }
}

/// The policy in force for one patient: the organization's document, the patient's
/// overrides and the patient's consents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    disabled: BTreeSet<String>,
    require_consent: bool,
    /// Data type → granted (`false`: refused or revoked).
    consents: BTreeMap<String, bool>,
    aggregation: BTreeMap<String, String>,
    accept_ambiguous: bool,
}

impl Policy {
    /// Resolves a patient's policy from the columns of [`POLICY_COLUMNS`].
    ///
    /// # Errors
    /// A stored document that is not a valid policy (naming whose it is).
    pub fn from_stored(
        org: serde_json::Value,
        patient: serde_json::Value,
        consents: serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let consents = match consents {
            serde_json::Value::Object(m) => m
                .into_iter()
                .filter_map(|(k, v)| Some((k, v.as_bool()?)))
                .collect(),
            _ => Default::default(),
        };
        Ok(Self::resolve(
            &PolicyDoc::from_json(&org)
                .map_err(|e| PolicyError(format!("organization {}", e.0)))?,
            &PolicyDoc::from_json(&patient).map_err(|e| PolicyError(format!("patient {}", e.0)))?,
            consents,
        ))
    }

    /// Resolves the policy of a patient: each field of the patient's document replaces the
    /// organization's; aggregation entries are merged, the patient's winning.
    #[must_use]
    pub fn resolve(org: &PolicyDoc, patient: &PolicyDoc, consents: BTreeMap<String, bool>) -> Self {
        let mut aggregation = org.aggregation.clone();
        aggregation.extend(patient.aggregation.clone());
        Self {
            disabled: patient
                .disabled_data_types
                .clone()
                .or_else(|| org.disabled_data_types.clone())
                .unwrap_or_default(),
            require_consent: patient
                .require_consent
                .or(org.require_consent)
                .unwrap_or(false),
            consents,
            aggregation,
            accept_ambiguous: patient
                .ambiguous_readings
                .as_deref()
                .or(org.ambiguous_readings.as_deref())
                == Some("accept"),
        }
    }

    /// Whether `data_type` may be fetched: not refused by the patient, consented to where
    /// consent is required, and not disabled.
    #[must_use]
    pub fn allows(&self, data_type: &str) -> bool {
        match self.consents.get(data_type) {
            Some(false) => false,
            None if self.require_consent => false,
            _ => !self.disabled.contains(data_type),
        }
    }

    /// The aggregation of `data_type`: the policy's, else `default`.
    #[must_use]
    pub fn aggregation<'a>(&'a self, data_type: &str, default: &'a str) -> &'a str {
        self.aggregation
            .get(data_type)
            .map_or(default, String::as_str)
    }

    /// Whether readings possibly of another user are synced.
    #[must_use]
    pub fn accepts_ambiguous(&self) -> bool {
        self.accept_ambiguous
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> PolicyDoc {
        PolicyDoc::from_json(&v).unwrap()
    }

    #[test]
    fn test_default_policy_allows_everything_and_holds_ambiguous() {
        let p = Policy::default();
        assert!(p.allows("body_weight"));
        assert!(!p.accepts_ambiguous());
        assert_eq!(p.aggregation("heart_rate", "HOURLY"), "HOURLY");
        assert_eq!(
            PolicyDoc::from_json(&serde_json::Value::Null).unwrap(),
            PolicyDoc::default()
        );
    }

    #[test]
    fn test_patient_fields_replace_the_organizations() {
        let org = doc(
            json!({"disabled_data_types": ["fat_mass"], "aggregation": {"heart_rate": "INDIVIDUAL", "steps": "HOURLY"}, "ambiguous_readings": "accept"}),
        );
        let patient = doc(
            json!({"disabled_data_types": ["bone_mass"], "aggregation": {"heart_rate": "HOURLY"}}),
        );
        let p = Policy::resolve(&org, &patient, BTreeMap::new());
        assert!(
            p.allows("fat_mass"),
            "the patient's list replaces the organization's"
        );
        assert!(!p.allows("bone_mass"));
        assert_eq!(p.aggregation("heart_rate", "X"), "HOURLY");
        assert_eq!(p.aggregation("steps", "X"), "HOURLY");
        assert!(p.accepts_ambiguous(), "not overridden: the organization's");
        let only_org = Policy::resolve(&org, &PolicyDoc::default(), BTreeMap::new());
        assert!(!only_org.allows("fat_mass"));
        assert_eq!(only_org.aggregation("heart_rate", "X"), "INDIVIDUAL");
    }

    #[test]
    fn test_consents_refuse_always_and_grant_where_required() {
        let consents = BTreeMap::from([
            ("body_weight".to_owned(), true),
            ("blood_pressure".to_owned(), false),
        ]);
        let lax = Policy::resolve(
            &PolicyDoc::default(),
            &PolicyDoc::default(),
            consents.clone(),
        );
        assert!(lax.allows("body_weight"));
        assert!(!lax.allows("blood_pressure"), "a refusal stops a data type");
        assert!(lax.allows("heart_rate"), "no consent needed");
        let strict = Policy::resolve(
            &doc(json!({"require_consent": true})),
            &PolicyDoc::default(),
            consents,
        );
        assert!(strict.allows("body_weight"));
        assert!(!strict.allows("blood_pressure"));
        assert!(!strict.allows("heart_rate"), "no consent, no fetch");
        // a disabled data type stays disabled even with consent
        let disabled = Policy::resolve(
            &doc(json!({"disabled_data_types": ["body_weight"]})),
            &PolicyDoc::default(),
            BTreeMap::from([("body_weight".to_owned(), true)]),
        );
        assert!(!disabled.allows("body_weight"));
    }

    #[test]
    fn test_bad_documents_are_refused() {
        for bad in [
            json!({"aggregation": {"heart_rate": "DAILY"}}),
            json!({"ambiguous_readings": "maybe"}),
            json!({"disabled": ["x"]}),
            json!({"require_consent": "yes"}),
        ] {
            assert!(PolicyDoc::from_json(&bad).is_err(), "{bad}");
        }
    }
}
