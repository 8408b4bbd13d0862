//! What an EHR holds of the resources about to be written: the read Bundles (one search per
//! resource type in put mode, else one read per resource) and their answers.

use crate::bundle::{Item, OwnRef, RefKey, UpsertMode, stored_hash, stored_revision, upsert_url};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};

/// What the server holds for a resource: its source revision and content hash (`None`:
/// untagged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub revision: i64,
    pub hash: Option<String>,
    /// `Type/id` on the server (in conditional mode, the server's own id).
    pub reference: Option<String>,
}

/// Returns a `batch` Bundle that reads the current state of each item, then of each
/// resource the items reference ([`OwnRef::read_url`]). Each read asks for `meta` only
/// (`_elements`): the state is the id and the tags, and an ECG's waveform need not travel
/// back (a server that ignores `_elements` answers the whole resource, read the same way).
pub fn read_bundle(items: &[&Item], refs: &[OwnRef], mode: UpsertMode) -> Result<Value, String> {
    let get = |url: String| json!({"request": {"method": "GET", "url": meta_only(url)}});
    let mut entries = items
        .iter()
        .map(|i| Ok(get(upsert_url(i, mode)?)))
        .collect::<Result<Vec<_>, String>>()?;
    entries.extend(refs.iter().map(|r| get(r.read_url(mode))));
    Ok(bundle_of("batch", entries))
}

/// Returns, in put mode, a `batch` Bundle that reads the state of every resource of `keys`
/// with one search per resource type (`Type?_id=a,b,…`, meta only): one query for the server
/// where [`read_bundle`] makes one read per resource, each serialized with the writes on a
/// server like hfs on SQLite. `None` when an id cannot go in a search list (it must then be
/// read by itself).
pub fn search_bundle(keys: &[RefKey]) -> Option<Value> {
    let entries = ids_by_type(keys)?
        .into_iter()
        .map(|(resource_type, ids)| {
            let url = format!("{resource_type}?_id={}&_count={}", ids.join(","), ids.len());
            json!({"request": {"method": "GET", "url": meta_only(url)}})
        })
        .collect();
    Some(bundle_of("batch", entries))
}

/// The distinct ids of `keys` per resource type, types in order (the order of a search
/// bundle's entries); `None` if an id is not a plain FHIR id (a comma would split it).
fn ids_by_type(keys: &[RefKey]) -> Option<BTreeMap<&str, Vec<&str>>> {
    let mut by_type: BTreeMap<&str, Vec<&str>> = Default::default();
    for (resource_type, id) in keys {
        if !plain(resource_type) || !plain(id) {
            return None;
        }
        let ids = by_type.entry(resource_type.as_str()).or_default();
        if !ids.contains(&id.as_str()) {
            ids.push(id);
        }
    }
    Some(by_type)
}

/// Whether `s` is a type or id that can go in a search list as it is.
fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A Bundle of `kind` with these entries, moved in (`json!` would copy them).
fn bundle_of(kind: &str, entries: Vec<Value>) -> Value {
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), Value::from("Bundle"));
    bundle.insert("type".into(), Value::from(kind));
    bundle.insert("entry".into(), Value::Array(entries));
    Value::Object(bundle)
}

/// What the server holds for each of `keys`, from the answer to [`search_bundle`]: a resource
/// the search of its type found, else absent. `None` when an answer does not settle its type
/// (a status other than 2xx, no searchset, or a further page): those are then read one by one.
pub fn states_from_search(response: &Value, keys: &[RefKey]) -> Option<Vec<Option<ServerState>>> {
    let types = ids_by_type(keys)?;
    let entries = response.get("entry").and_then(Value::as_array)?;
    if entries.len() != types.len() {
        return None;
    }
    let mut found: HashMap<(&str, &str), ServerState> = HashMap::new();
    for (entry, resource_type) in entries.iter().zip(types.keys()) {
        let status = entry.pointer("/response/status").and_then(Value::as_str)?;
        let set = entry.get("resource")?;
        let further_page = set
            .get("link")
            .and_then(Value::as_array)
            .is_some_and(|links| {
                links
                    .iter()
                    .any(|l| l.get("relation") == Some(&json!("next")))
            });
        if !status.starts_with('2')
            || set.get("resourceType").and_then(Value::as_str) != Some("Bundle")
            || further_page
        {
            return None;
        }
        for r in set
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("resource"))
        {
            if r.get("resourceType").and_then(Value::as_str) == Some(*resource_type)
                && let Some(id) = r.get("id").and_then(Value::as_str)
            {
                found.insert((resource_type, id), server_state(r));
            }
        }
    }
    Some(
        keys.iter()
            .map(|(t, id)| found.get(&(t.as_str(), id.as_str())).cloned())
            .collect(),
    )
}

/// `url` asking for the resource's mandatory elements and `meta` only.
fn meta_only(mut url: String) -> String {
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str("_elements=meta");
    url
}

/// What the server holds for each item of a read batch response: `Ok(None)` if absent
/// (404/410), `Ok(Some(..))` if present, `Err(status)` if the server could not say (any other
/// entry status, or a missing entry), so nothing is written without knowing.
pub fn current_states(response: &Value, count: usize) -> Vec<Result<Option<ServerState>, String>> {
    let entries = response.get("entry").and_then(Value::as_array);
    (0..count)
        .map(|i| {
            let entry = entries
                .and_then(|e| e.get(i))
                .ok_or_else(|| format!("read response has no entry {i}"))?;
            let status = entry
                .get("response")
                .and_then(|r| r.get("status"))
                .and_then(Value::as_str)
                .ok_or("read entry without status")?;
            if status.starts_with("404") || status.starts_with("410") {
                return Ok(None);
            }
            if !status.starts_with('2') {
                return Err(format!("read entry status {status}"));
            }
            let Some(resource) = entry.get("resource") else {
                return Err("read entry without resource".to_string());
            };
            // A conditional read answers with a searchset Bundle (empty: absent).
            let resource = if resource.get("resourceType").and_then(Value::as_str) == Some("Bundle")
            {
                match resource
                    .get("entry")
                    .and_then(|e| e.get(0))
                    .and_then(|e| e.get("resource"))
                {
                    Some(r) => r,
                    None => return Ok(None),
                }
            } else {
                resource
            };
            Ok(Some(server_state(resource)))
        })
        .collect()
}

/// A stored resource's state: its tags and its `Type/id` on the server.
fn server_state(resource: &Value) -> ServerState {
    let reference = match (
        resource.get("resourceType").and_then(Value::as_str),
        resource.get("id").and_then(Value::as_str),
    ) {
        (Some(t), Some(id)) => Some(format!("{t}/{id}")),
        _ => None,
    };
    ServerState {
        revision: stored_revision(resource),
        hash: stored_hash(resource).map(str::to_string),
        reference,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::WRITTEN_TYPES;
    use crate::bundle::tests::{device_and_observation, item};
    use crate::bundle::{own_references, with_tags};

    #[test]
    fn test_read_bundle_reads_the_items_then_the_referenced_resources() {
        let (device, obs) = device_and_observation();
        let refs = own_references(&obs.resource.to_value(), WRITTEN_TYPES);
        let read = read_bundle(&[&obs], &refs, UpsertMode::Conditional).unwrap();
        let urls: Vec<&str> = read["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["request"]["url"].as_str().unwrap())
            .collect();
        assert_eq!(
            urls,
            [
                format!(
                    "{}&_elements=meta",
                    upsert_url(&obs, UpsertMode::Conditional).unwrap()
                ),
                format!(
                    "{}&_elements=meta",
                    upsert_url(&device, UpsertMode::Conditional).unwrap()
                )
            ]
        );
        let by_id = read_bundle(&[&obs], &refs, UpsertMode::Put).unwrap();
        assert_eq!(
            by_id["entry"][0]["request"]["url"],
            format!("Observation/{}?_elements=meta", obs.resource_id)
        );
    }

    #[test]
    fn test_parse_read_responses() {
        let read = json!({"entry": [
            {"response": {"status": "200 OK"}, "resource": with_tags(&item("a").resource.to_value(), "h1", 5)},
            {"response": {"status": "404 Not Found"}},
            {"response": {"status": "200 OK"}, "resource": {"resourceType": "Bundle", "entry": [{"resource": with_tags(&item("c").resource.to_value(), "h3", 0)}]}},
            {"response": {"status": "200 OK"}, "resource": {"resourceType": "Bundle", "type": "searchset"}},
            {"response": {"status": "200 OK"}, "resource": item("e").resource.to_value()},
            {"response": {"status": "500 Internal Server Error"}}]});
        let state = |revision, hash: Option<&str>, id: &str| {
            Ok(Some(ServerState {
                revision,
                hash: hash.map(str::to_string),
                reference: Some(format!("Observation/{id}")),
            }))
        };
        let got = current_states(&read, 7);
        assert_eq!(got[0], state(5, Some("h1"), "a"));
        assert_eq!(got[1], Ok(None));
        assert_eq!(got[2], state(0, Some("h3"), "c"));
        assert_eq!(got[3], Ok(None));
        assert_eq!(got[4], state(0, None, "e"));
        assert!(got[5].is_err());
        assert!(got[6].is_err(), "a missing entry is not an absent resource");
    }

    fn keys(pairs: &[(&str, &str)]) -> Vec<RefKey> {
        pairs
            .iter()
            .map(|(t, id)| (t.to_string(), id.to_string()))
            .collect()
    }

    #[test]
    fn test_search_bundle_reads_each_type_once_by_its_distinct_ids() {
        let k = keys(&[
            ("Observation", "o-1"),
            ("Device", "d-1"),
            ("Observation", "o-2"),
            ("Device", "d-1"),
        ]);
        let urls: Vec<Value> = search_bundle(&k).unwrap()["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["request"]["url"].clone())
            .collect();
        assert_eq!(
            urls,
            [
                "Device?_id=d-1&_count=1&_elements=meta",
                "Observation?_id=o-1,o-2&_count=2&_elements=meta"
            ]
        );
        for odd in ["a,b", "", "a b", "a&_id=b"] {
            assert!(
                search_bundle(&keys(&[("Observation", odd)])).is_none(),
                "{odd:?}"
            );
        }
    }

    #[test]
    fn test_states_from_search_are_found_or_absent_and_unsettled_answers_are_none() {
        let k = keys(&[("Observation", "a"), ("Observation", "b"), ("Device", "d")]);
        let set = |resources: Vec<Value>| {
            json!({"response": {"status": "200 OK"}, "resource": {"resourceType": "Bundle", "type": "searchset",
                "entry": resources.into_iter().map(|r| json!({"resource": r, "search": {"mode": "match"}})).collect::<Vec<_>>()}})
        };
        let device = json!({"resourceType": "Device", "id": "d"});
        let outcome = json!({"resourceType": "OperationOutcome", "id": "a"});
        let answer = json!({"entry": [set(vec![device.clone()]),
                                      set(vec![with_tags(&item("b").resource.to_value(), "h", 7), outcome])]});
        assert_eq!(
            states_from_search(&answer, &k),
            Some(vec![
                None,
                Some(ServerState {
                    revision: 7,
                    hash: Some("h".into()),
                    reference: Some("Observation/b".into())
                }),
                Some(ServerState {
                    revision: 0,
                    hash: None,
                    reference: Some("Device/d".into())
                }),
            ])
        );
        let mut paged = answer.clone();
        paged["entry"][1]["resource"]["link"] = json!([{"relation": "next", "url": "x"}]);
        assert_eq!(states_from_search(&paged, &k), None, "a further page");
        let mut failed = answer.clone();
        failed["entry"][0] =
            json!({"response": {"status": "400 Bad Request"}, "resource": outcome_of("invalid")});
        assert_eq!(states_from_search(&failed, &k), None, "an error answer");
        let short = json!({"entry": [set(vec![device])]});
        assert_eq!(states_from_search(&short, &k), None, "an answer missing");
    }

    fn outcome_of(code: &str) -> Value {
        json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code}]})
    }
}
