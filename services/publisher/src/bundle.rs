//! Pure parts of publishing: the content-hash and source-revision tags, transaction Bundles
//! and their answers, references to resources ohx writes (reads: [`crate::read`]).

use crate::auth::WRITTEN_TYPES;
pub use crate::resource::Resource;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::collections::HashMap;

/// The `meta.tag` system carrying a resource's content hash on the server. The publisher reads
/// it back to skip resources the server already holds unchanged, so replaying the outbox
/// creates no new versions.
pub const HASH_TAG_SYSTEM: &str = "https://ohx.dev/fhir/CodeSystem/content-hash";

/// The `meta.tag` system carrying the source revision of a resource's content on the server
/// (code = the revision in decimal). The publisher reads it back so that content with an older
/// revision never replaces newer content (see [`crate::decision`]).
pub const REVISION_TAG_SYSTEM: &str = "https://ohx.dev/fhir/CodeSystem/source-revision";

/// How resources are written to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertMode {
    /// `PUT {type}/{id}` with the client-assigned id.
    Put,
    /// `PUT {type}?identifier={system}|{value}` for servers that forbid client ids.
    Conditional,
}

/// One resource to publish.
#[derive(Debug, Clone)]
pub struct Item {
    pub resource_type: String,
    pub resource_id: String,
    pub resource: Resource,
    pub hash: String,
    /// The content's source revision (0: unknown).
    pub revision: i64,
    /// Size of the resource's JSON text (what it adds to a transaction's body).
    pub bytes: usize,
}

/// Splits `items` into consecutive transactions of at most `max_count` items and, unless one
/// item alone is larger, at most `max_bytes` of resource text (an ECG's waveform is tens of
/// kilobytes: a hundred of them would be a body some servers refuse).
pub fn transaction_ranges(
    items: &[Item],
    max_count: usize,
    max_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, item) in items.iter().enumerate() {
        let full = i - start >= max_count.max(1) || bytes.saturating_add(item.bytes) > max_bytes;
        if i > start && full {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(item.bytes);
    }
    if start < items.len() {
        out.push(start..items.len());
    }
    out
}

fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `{type}?identifier={system}|{value}`: the search (and conditional URL) of a resource by
/// identifier.
pub fn identifier_query(resource_type: &str, system: &str, value: &str) -> String {
    format!(
        "{resource_type}?identifier={}",
        encode_query_value(&format!("{system}|{value}"))
    )
}

/// Returns the request URL of an item's upsert (relative to the base).
pub fn upsert_url(item: &Item, mode: UpsertMode) -> Result<String, String> {
    match mode {
        UpsertMode::Put => Ok(format!("{}/{}", item.resource_type, item.resource_id)),
        UpsertMode::Conditional => {
            let identifiers = item.resource.member("identifier");
            let ident = identifiers
                .as_ref()
                .and_then(|i| i.get(0))
                .ok_or("resource has no identifier for a conditional upsert")?;
            let system = ident
                .get("system")
                .and_then(Value::as_str)
                .ok_or("identifier has no system")?;
            let value = ident
                .get("value")
                .and_then(Value::as_str)
                .ok_or("identifier has no value")?;
            Ok(identifier_query(&item.resource_type, system, value))
        }
    }
}

/// Returns the resource with the content-hash and source-revision tags set in `meta.tag`
/// (other tags kept): what a transaction writes ([`Tagged`]), and what the server then holds.
#[cfg(test)]
pub fn with_tags(resource: &Value, hash: &str, revision: i64) -> Value {
    let mut r = resource.clone();
    if let Some(obj) = r.as_object_mut() {
        let meta = obj.entry("meta").or_insert_with(|| json!({}));
        if let Some(meta) = meta.as_object_mut() {
            let tags = meta.entry("tag").or_insert_with(|| json!([]));
            if let Some(tags) = tags.as_array_mut() {
                tags.retain(|t| not_ours(&t));
                tags.push(json!({"system": HASH_TAG_SYSTEM, "code": hash}));
                tags.push(json!({"system": REVISION_TAG_SYSTEM, "code": revision.to_string()}));
            }
        }
    }
    r
}

fn tag_code<'a>(resource: &'a Value, system: &str) -> Option<&'a str> {
    resource
        .get("meta")?
        .get("tag")?
        .as_array()?
        .iter()
        .find(|t| t.get("system").and_then(Value::as_str) == Some(system))?
        .get("code")?
        .as_str()
}

/// Returns the content hash a stored resource carries, if any.
pub fn stored_hash(resource: &Value) -> Option<&str> {
    tag_code(resource, HASH_TAG_SYSTEM)
}

/// Returns the source revision a stored resource carries (0 if untagged or unreadable: written
/// before revisions were tagged, or by someone else).
pub fn stored_revision(resource: &Value) -> i64 {
    tag_code(resource, REVISION_TAG_SYSTEM)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Returns a `transaction` Bundle of upserts. In conditional mode the server assigns the ids:
/// the resources go without theirs, and their references to resources ohx writes
/// ([`own_references`]) are rewritten to the entry of this transaction that writes the
/// resource (its `urn:uuid` fullUrl), else to the server's id in `known` (from the read),
/// else to a conditional reference (`Type?identifier=…`) the server resolves. In put mode the
/// resources are written as they are, tags added while serializing (no copy).
pub fn transaction_bundle<'a>(
    items: &[&'a Item],
    mode: UpsertMode,
    known: &HashMap<RefKey, String>,
) -> Result<Transaction<'a>, String> {
    let in_transaction: HashMap<RefKey, String> = match mode {
        UpsertMode::Put => HashMap::new(),
        UpsertMode::Conditional => items
            .iter()
            .map(|i| {
                (
                    (i.resource_type.clone(), i.resource_id.clone()),
                    full_url(&i.resource_id),
                )
            })
            .collect(),
    };
    let entry = items
        .iter()
        .map(|i| {
            let resource = match mode {
                UpsertMode::Put => Cow::Borrowed(&i.resource),
                UpsertMode::Conditional => {
                    let mut resource = i.resource.to_value();
                    if let Some(object) = resource.as_object_mut() {
                        object.remove("id");
                    }
                    rewrite_references(&mut resource, WRITTEN_TYPES, &|r| {
                        in_transaction
                            .get(&r.key())
                            .or_else(|| known.get(&r.key()))
                            .cloned()
                            .unwrap_or_else(|| r.conditional())
                    });
                    Cow::Owned(Resource::from(resource))
                }
            };
            Ok(TransactionEntry {
                full_url: full_url(&i.resource_id),
                resource: Tagged {
                    resource,
                    hash: &i.hash,
                    revision: i.revision,
                },
                request: Request {
                    method: "PUT",
                    url: upsert_url(i, mode)?,
                },
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Transaction {
        resource_type: "Bundle",
        kind: "transaction",
        entry,
    })
}

/// A `transaction` Bundle as sent ([`transaction_bundle`]).
#[derive(Debug, Serialize)]
pub struct Transaction<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    entry: Vec<TransactionEntry<'a>>,
}

#[derive(Debug, Serialize)]
struct TransactionEntry<'a> {
    #[serde(rename = "fullUrl")]
    full_url: String,
    resource: Tagged<'a>,
    request: Request,
}

#[derive(Debug, Serialize)]
struct Request {
    method: &'static str,
    url: String,
}

/// A resource serialized as [`with_tags`] would return it, without copying it: its members
/// written as they came, but `meta`.
#[derive(Debug)]
struct Tagged<'a> {
    resource: Cow<'a, Resource>,
    hash: &'a str,
    revision: i64,
}

impl Serialize for Tagged<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let has_meta = self.resource.contains("meta");
        let mut map = s.serialize_map(Some(self.resource.len() + usize::from(!has_meta)))?;
        for (key, value) in self.resource.members() {
            if key != "meta" {
                map.serialize_entry(key, value)?;
                continue;
            }
            match self.resource.member("meta") {
                Some(Value::Object(meta)) => map.serialize_entry(
                    key,
                    &TaggedMeta {
                        meta: &meta,
                        of: self,
                    },
                )?,
                _ => map.serialize_entry(key, value)?,
            }
        }
        if !has_meta {
            map.serialize_entry(
                "meta",
                &TaggedMeta {
                    meta: &Map::new(),
                    of: self,
                },
            )?;
        }
        map.end()
    }
}

/// A resource's `meta` with ohx's two tags in place of any earlier ones (other tags kept).
struct TaggedMeta<'a> {
    meta: &'a Map<String, Value>,
    of: &'a Tagged<'a>,
}

impl Serialize for TaggedMeta<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ours = [
            json!({"system": HASH_TAG_SYSTEM, "code": self.of.hash}),
            json!({"system": REVISION_TAG_SYSTEM, "code": self.of.revision.to_string()}),
        ];
        let tag = self.meta.get("tag");
        let mut map = s.serialize_map(Some(self.meta.len() + usize::from(tag.is_none())))?;
        for (key, value) in self.meta {
            match (key.as_str(), value.as_array()) {
                ("tag", Some(tags)) => {
                    map.serialize_entry(key, &SeqOf(tags.iter().filter(not_ours).chain(&ours)))?
                }
                _ => map.serialize_entry(key, value)?,
            }
        }
        if tag.is_none() {
            map.serialize_entry("tag", &ours)?;
        }
        map.end()
    }
}

/// Whether a tag is not one of the two ohx sets.
fn not_ours(tag: &&Value) -> bool {
    let system = tag.get("system").and_then(Value::as_str);
    system != Some(HASH_TAG_SYSTEM) && system != Some(REVISION_TAG_SYSTEM)
}

/// Serializes the items of an iterator as a sequence.
struct SeqOf<I>(I);

impl<'v, I: Iterator<Item = &'v Value> + Clone> Serialize for SeqOf<I> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.clone())
    }
}

/// `(resource type, ohx id)` of a resource ohx writes.
pub type RefKey = (String, String);

/// A reference to a resource ohx writes, as the fhir-mapper writes it: `Type/id` with the
/// resource's identifier (e.g. an Observation's `device`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnRef {
    pub resource_type: String,
    pub id: String,
    pub system: String,
    pub value: String,
}

impl OwnRef {
    /// `(type, id)`.
    pub fn key(&self) -> RefKey {
        (self.resource_type.clone(), self.id.clone())
    }

    /// `Type?identifier=system|value`.
    pub fn conditional(&self) -> String {
        identifier_query(&self.resource_type, &self.system, &self.value)
    }

    /// How to read the referenced resource: `Type/id`, or by identifier in conditional mode.
    pub fn read_url(&self, mode: UpsertMode) -> String {
        match mode {
            UpsertMode::Put => format!("{}/{}", self.resource_type, self.id),
            UpsertMode::Conditional => self.conditional(),
        }
    }
}

/// Every reference in `resource` to a resource of `types` that names its identifier, once
/// each, in order.
pub fn own_references(resource: &Value, types: &[&str]) -> Vec<OwnRef> {
    fn walk(value: &Value, types: &[&str], out: &mut Vec<OwnRef>) {
        match value {
            Value::Object(object) => {
                if let Some(r) = own_reference(object, types) {
                    if !out.contains(&r) {
                        out.push(r);
                    }
                    return;
                }
                object.values().for_each(|v| walk(v, types, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, types, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(resource, types, &mut out);
    out
}

/// [`own_references`] of a resource, parsing only the members that may hold a reference.
pub fn resource_references(resource: &Resource, types: &[&str]) -> Vec<OwnRef> {
    let mut out = Vec::new();
    for (_, member) in resource.members_holding("\"reference\"") {
        for r in own_references(&member, types) {
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}

fn own_reference(object: &serde_json::Map<String, Value>, types: &[&str]) -> Option<OwnRef> {
    let (resource_type, id) = object.get("reference")?.as_str()?.split_once('/')?;
    if !types.contains(&resource_type) || id.is_empty() || id.contains('/') {
        return None;
    }
    let identifier = object.get("identifier")?;
    Some(OwnRef {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        system: identifier.get("system")?.as_str()?.to_owned(),
        value: identifier.get("value")?.as_str()?.to_owned(),
    })
}

/// Rewrites each reference of [`own_references`] to `to(reference)`.
fn rewrite_references(value: &mut Value, types: &[&str], to: &impl Fn(&OwnRef) -> String) {
    match value {
        Value::Object(object) => {
            if let Some(r) = own_reference(object, types) {
                object.insert("reference".to_owned(), Value::String(to(&r)));
                return;
            }
            object
                .values_mut()
                .for_each(|v| rewrite_references(v, types, to));
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| rewrite_references(v, types, to)),
        _ => {}
    }
}

/// The `fullUrl` of a resource's transaction entry.
fn full_url(resource_id: &str) -> String {
    format!("urn:uuid:{}", uuid_from_id(resource_id))
}

/// Formats a deterministic UUID-shaped string from a resource id (for `fullUrl`).
fn uuid_from_id(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(id.as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The server's answer for one upsert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryOutcome {
    pub http_status: i32,
    pub version_id: Option<String>,
}

/// Parses `"201 Created"`-style statuses and `W/"3"` etags from a transaction response.
pub fn transaction_outcomes(response: &Value, count: usize) -> Result<Vec<EntryOutcome>, String> {
    let entries = response
        .get("entry")
        .and_then(Value::as_array)
        .ok_or("transaction response has no entries")?;
    if entries.len() != count {
        return Err(format!(
            "transaction response has {} entries for {count} requests",
            entries.len()
        ));
    }
    entries
        .iter()
        .map(|e| {
            let resp = e.get("response").ok_or("entry without response")?;
            let status = resp
                .get("status")
                .and_then(Value::as_str)
                .ok_or("entry without status")?;
            let code = status
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<i32>().ok())
                .ok_or("unreadable entry status")?;
            let version_id = resp
                .get("etag")
                .and_then(Value::as_str)
                .map(|t| t.trim_start_matches("W/").trim_matches('"').to_string());
            Ok(EntryOutcome {
                http_status: code,
                version_id,
            })
        })
        .collect()
}

/// Summarizes an OperationOutcome by its issues' severity and code only, without diagnostics
/// (which may quote values): safe for logs and transient-failure reasons.
pub fn outcome_codes(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return format!("{} bytes, not an OperationOutcome", body.len());
    };
    let codes: Vec<String> = v
        .get("issue")
        .and_then(Value::as_array)
        .map(|issues| {
            issues
                .iter()
                .take(5)
                .map(|i| {
                    let sev = i.get("severity").and_then(Value::as_str).unwrap_or("?");
                    let code = i.get("code").and_then(Value::as_str).unwrap_or("?");
                    format!("{sev}/{code}")
                })
                .collect()
        })
        .unwrap_or_default();
    if codes.is_empty() {
        "no issues".to_string()
    } else {
        codes.join("; ")
    }
}

/// Summarizes an OperationOutcome (severity, code, diagnostics) for a dead letter.
pub fn outcome_summary(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return body.chars().take(500).collect();
    };
    let issues = v
        .get("issue")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let parts: Vec<String> = issues
        .iter()
        .take(5)
        .map(|i| {
            let sev = i.get("severity").and_then(Value::as_str).unwrap_or("?");
            let code = i.get("code").and_then(Value::as_str).unwrap_or("?");
            let diag = i
                .get("diagnostics")
                .and_then(Value::as_str)
                .or_else(|| {
                    i.get("details")
                        .and_then(|d| d.get("text"))
                        .and_then(Value::as_str)
                })
                .unwrap_or("");
            format!("{sev}/{code}: {diag}")
        })
        .collect();
    if parts.is_empty() {
        body.chars().take(500).collect()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn item(id: &str) -> Item {
        Item {
            bytes: 100,
            resource_type: "Observation".into(),
            resource_id: id.into(),
            resource: json!({"resourceType": "Observation", "id": id, "status": "final",
                "identifier": [{"system": "https://ohx.example/fhir/sid/observation", "value": "withings-1-2 bp"}],
                "meta": {"source": "https://ohx.example/fhir/source/withings"}})
            .into(),
            hash: "abc".into(),
            revision: 12,
        }
    }

    #[test]
    fn test_upsert_urls_per_mode() {
        let i = item("ohx-1");
        assert_eq!(
            upsert_url(&i, UpsertMode::Put).unwrap(),
            "Observation/ohx-1"
        );
        assert_eq!(
            upsert_url(&i, UpsertMode::Conditional).unwrap(),
            "Observation?identifier=https://ohx.example/fhir/sid/observation%7Cwithings-1-2%20bp"
        );
    }

    #[test]
    fn test_tags_set_once_and_read_back() {
        let i = item("x");
        let tagged = with_tags(&with_tags(&i.resource.to_value(), "old", 1), "new", 2);
        assert_eq!(stored_hash(&tagged), Some("new"));
        assert_eq!(stored_revision(&tagged), 2);
        assert_eq!(tagged["meta"]["tag"].as_array().unwrap().len(), 2);
        assert_eq!(stored_revision(&i.resource.to_value()), 0);
        assert_eq!(
            tagged["meta"]["source"],
            "https://ohx.example/fhir/source/withings"
        );
    }

    /// The transaction Bundle as the server receives it.
    fn tx(items: &[&Item], mode: UpsertMode, known: &HashMap<RefKey, String>) -> Value {
        serde_json::to_value(transaction_bundle(items, mode, known).unwrap()).unwrap()
    }

    #[test]
    fn test_a_transaction_writes_each_resource_as_with_tags_returns_it() {
        let ohx_tag = json!({"system": HASH_TAG_SYSTEM, "code": "stale"});
        let other = json!({"system": "https://x.example/tags", "code": "keep"});
        let resources = [
            json!({"resourceType": "Observation", "id": "a", "status": "final"}),
            json!({"resourceType": "Observation", "id": "a", "meta": {"source": "s"}}),
            json!({"resourceType": "Observation", "id": "a", "meta": {"tag": [other, ohx_tag], "source": "s"}}),
            json!({"resourceType": "Observation", "id": "a", "meta": "not an object"}),
            json!({"resourceType": "Observation", "id": "a", "meta": {"tag": "not a list"}}),
        ];
        for resource in resources {
            let i = Item {
                resource: resource.clone().into(),
                ..item("a")
            };
            assert_eq!(
                tx(&[&i], UpsertMode::Put, &HashMap::new())["entry"][0]["resource"],
                with_tags(&resource, &i.hash, i.revision),
                "{resource}"
            );
        }
    }

    #[test]
    fn test_transaction_bundle_shape() {
        let (a, b) = (item("a"), item("b"));
        let bundle = tx(&[&a, &b], UpsertMode::Put, &HashMap::new());
        assert_eq!(bundle["type"], "transaction");
        assert_eq!(bundle["entry"][1]["request"]["method"], "PUT");
        assert_eq!(bundle["entry"][1]["request"]["url"], "Observation/b");
        assert_eq!(stored_hash(&bundle["entry"][0]["resource"]), Some("abc"));
        assert_eq!(stored_revision(&bundle["entry"][0]["resource"]), 12);
        assert!(
            bundle["entry"][0]["fullUrl"]
                .as_str()
                .unwrap()
                .starts_with("urn:uuid:")
        );
    }

    const DEVICE_SYSTEM: &str = "https://ohx.example/fhir/sid/device";

    /// A Device, and an Observation referencing it as the mapper does.
    pub(crate) fn device_and_observation() -> (Item, Item) {
        let device = Item {
            bytes: 100,
            resource_type: "Device".into(),
            resource_id: "dev-1".into(),
            resource: json!({"resourceType": "Device", "id": "dev-1",
                "identifier": [{"system": DEVICE_SYSTEM, "value": "withings-abc"}]})
            .into(),
            hash: "d".into(),
            revision: 0,
        };
        let mut obs = item("obs-1");
        obs.resource.set(
            "device",
            json!({"reference": "Device/dev-1",
                "identifier": {"system": DEVICE_SYSTEM, "value": "withings-abc"}}),
        );
        obs.resource
            .set("subject", json!({"reference": "Patient/7"}));
        (device, obs)
    }

    #[test]
    fn test_own_references_are_those_to_written_types_that_name_their_identifier() {
        let (_, obs) = device_and_observation();
        let refs = own_references(&obs.resource.to_value(), WRITTEN_TYPES);
        assert_eq!(resource_references(&obs.resource, WRITTEN_TYPES), refs);
        assert_eq!(
            refs,
            [OwnRef {
                resource_type: "Device".into(),
                id: "dev-1".into(),
                system: DEVICE_SYSTEM.into(),
                value: "withings-abc".into(),
            }],
            "the EHR's Patient is not one of ours"
        );
        assert_eq!(refs[0].read_url(UpsertMode::Put), "Device/dev-1");
        assert_eq!(
            refs[0].read_url(UpsertMode::Conditional),
            "Device?identifier=https://ohx.example/fhir/sid/device%7Cwithings-abc"
        );
        let mut bare = obs.resource.clone();
        bare.set("device", json!({"reference": "Device/dev-1"}));
        assert!(own_references(&bare.to_value(), WRITTEN_TYPES).is_empty());
        assert!(resource_references(&bare, WRITTEN_TYPES).is_empty());
    }

    #[test]
    fn test_put_mode_sends_references_and_ids_as_mapped() {
        let (device, obs) = device_and_observation();
        let bundle = tx(&[&obs], UpsertMode::Put, &HashMap::new());
        let sent = &bundle["entry"][0]["resource"];
        assert_eq!(sent["id"], "obs-1");
        assert_eq!(
            Some(&sent["device"]),
            obs.resource.member("device").as_ref()
        );
        let both = tx(&[&device, &obs], UpsertMode::Put, &HashMap::new());
        assert_eq!(
            both["entry"][1]["resource"]["device"]["reference"],
            "Device/dev-1"
        );
    }

    #[test]
    fn test_conditional_mode_points_references_at_the_entry_the_server_id_or_a_search() {
        let (device, obs) = device_and_observation();
        // Written together: the Device's entry.
        let both = tx(&[&device, &obs], UpsertMode::Conditional, &HashMap::new());
        let entries = both["entry"].as_array().unwrap();
        assert_eq!(
            entries[1]["resource"]["device"]["reference"],
            entries[0]["fullUrl"]
        );
        assert!(
            entries.iter().all(|e| e["resource"].get("id").is_none()),
            "the server assigns the ids"
        );
        assert_eq!(
            entries[1]["resource"]["device"]["identifier"]["value"],
            "withings-abc"
        );
        assert_eq!(entries[1]["resource"]["subject"]["reference"], "Patient/7");
        // Already on the server: its id there.
        let known = HashMap::from([(
            ("Device".to_owned(), "dev-1".to_owned()),
            "Device/42".to_owned(),
        )]);
        let alone = tx(&[&obs], UpsertMode::Conditional, &known);
        assert_eq!(
            alone["entry"][0]["resource"]["device"]["reference"],
            "Device/42"
        );
        // Unknown: a conditional reference the server resolves.
        let alone = tx(&[&obs], UpsertMode::Conditional, &HashMap::new());
        assert_eq!(
            alone["entry"][0]["resource"]["device"]["reference"],
            "Device?identifier=https://ohx.example/fhir/sid/device%7Cwithings-abc"
        );
    }

    #[test]
    fn test_parse_transaction_responses() {
        let resp = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "etag": "W/\"1\""}},
            {"response": {"status": "200 OK", "etag": "W/\"4\""}}]});
        let o = transaction_outcomes(&resp, 2).unwrap();
        assert_eq!(
            o[0],
            EntryOutcome {
                http_status: 201,
                version_id: Some("1".into())
            }
        );
        assert_eq!(o[1].version_id.as_deref(), Some("4"));
        assert!(transaction_outcomes(&resp, 3).is_err());
    }

    #[test]
    fn test_outcome_summary() {
        let body = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"bad status"}]}"#;
        assert_eq!(outcome_summary(body), "error/invalid: bad status");
        assert_eq!(outcome_summary("plain"), "plain");
        assert_eq!(outcome_codes(body), "error/invalid");
        assert!(!outcome_codes("value 72 is wrong").contains("72"));
    }

    #[test]
    fn test_transactions_hold_at_most_their_count_and_bytes_and_a_big_item_alone() {
        let sized = |bytes: &[usize]| -> Vec<Item> {
            bytes
                .iter()
                .enumerate()
                .map(|(i, b)| Item {
                    bytes: *b,
                    ..item(&format!("o{i}"))
                })
                .collect()
        };
        let small = sized(&[10; 7]);
        assert_eq!(
            transaction_ranges(&small, 3, usize::MAX),
            [0..3, 3..6, 6..7]
        );
        assert_eq!(
            transaction_ranges(&small, 100, 25),
            [0..2, 2..4, 4..6, 6..7]
        );
        assert_eq!(transaction_ranges(&small, 100, 70), vec![0..7]);
        // An ECG larger than the budget goes alone, between the others.
        let mixed = sized(&[10, 10, 500, 10, 10]);
        assert_eq!(transaction_ranges(&mixed, 100, 100), [0..2, 2..3, 3..5]);
        assert!(transaction_ranges(&[], 100, 100).is_empty());
        // Every item is in exactly one transaction, in order.
        let many = sized(&[7, 300, 1, 1, 90, 90, 90, 5, 400, 2]);
        let ranges = transaction_ranges(&many, 3, 200);
        let flat: Vec<usize> = ranges.iter().flat_map(Clone::clone).collect();
        assert_eq!(flat, (0..many.len()).collect::<Vec<_>>());
        for r in &ranges {
            let bytes: usize = many[r.clone()].iter().map(|i| i.bytes).sum();
            assert!(r.len() <= 3 && (bytes <= 200 || r.len() == 1), "{r:?}");
        }
    }
}
