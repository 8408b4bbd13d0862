//! Whether to write a resource, given what the server holds: the rule that keeps older content
//! from overwriting newer content at the EHR.
//!
//! The publisher tags every resource it writes with its content hash and source revision
//! (`meta.tag`, see [`crate::bundle`]) and reads both back before writing:
//! * nothing on the server → write;
//! * the same content → nothing to write (a replay creates no version), whatever the revisions;
//! * a higher source revision on the server → `stale`: the server keeps its newer content and
//!   no version is created (the deduplicator refuses older content too, but a replay through a
//!   fresh deduplicator state, or two deduplicator generations, can still deliver it);
//! * otherwise (same or lower revision on the server, different content) → write. Equal
//!   revisions with different content follow the deduplicator's rule: a re-mapping of the same
//!   source revision, or a source without revisions (0), where the last content wins. Content
//!   the server holds untagged (written by someone else or before revisions) counts as
//!   revision 0.

/// What to do with one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishDecision {
    Put,
    Unchanged,
    Stale,
}

/// Decides for content `incoming` = (revision, hash) against the server's current
/// `(revision, hash)` (`None`: absent; an untagged hash is `""`).
pub fn publish_decision(server: Option<(i64, &str)>, incoming: (i64, &str)) -> PublishDecision {
    let Some((server_revision, server_hash)) = server else {
        return PublishDecision::Put;
    };
    let (revision, hash) = incoming;
    if server_hash == hash {
        PublishDecision::Unchanged
    } else if server_revision > revision {
        PublishDecision::Stale
    } else {
        PublishDecision::Put
    }
}

#[cfg(test)]
mod tests {
    use super::PublishDecision::*;
    use super::*;

    #[test]
    fn test_absent_is_put() {
        assert_eq!(publish_decision(None, (0, "h")), Put);
        assert_eq!(publish_decision(None, (9, "h")), Put);
    }

    #[test]
    fn test_same_content_is_unchanged_whatever_the_revisions() {
        assert_eq!(publish_decision(Some((5, "h")), (5, "h")), Unchanged);
        assert_eq!(publish_decision(Some((9, "h")), (5, "h")), Unchanged);
        assert_eq!(publish_decision(Some((1, "h")), (5, "h")), Unchanged);
    }

    #[test]
    fn test_newer_server_content_is_never_replaced() {
        assert_eq!(publish_decision(Some((9, "h2")), (5, "h1")), Stale);
        assert_eq!(publish_decision(Some((1, "h2")), (0, "h1")), Stale);
    }

    #[test]
    fn test_older_or_equal_server_revision_with_other_content_is_put() {
        assert_eq!(publish_decision(Some((4, "h1")), (5, "h2")), Put);
        assert_eq!(publish_decision(Some((5, "h1")), (5, "h2")), Put);
        assert_eq!(publish_decision(Some((0, "h1")), (0, "h2")), Put);
        // Untagged server content (revision 0, no hash).
        assert_eq!(publish_decision(Some((0, "")), (3, "h2")), Put);
    }
}
