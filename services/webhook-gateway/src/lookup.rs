//! What a webhook looks up in the configuration database (the app of a token, the links of a
//! provider user), cached in memory and dropped whenever PostgreSQL announces a change.
//!
//! Migration 0004 makes PostgreSQL notify `ohx_config_changed` when a row of `provider_apps`,
//! `provider_links` or `patients` that a lookup reads is added, removed or changed. A listener
//! connection hears it and empties the cache. The cache is used only while that connection is
//! up: when it drops, everything cached is forgotten and lookups go to the database until the
//! listener is back (then the cache starts empty, since changes may have been missed).
//!
//! A lookup that started before a change must not store its (possibly older) answer after the
//! change emptied the cache: each change bumps an epoch, and an answer is stored only if the
//! epoch it started in is still current.

use deadpool_postgres::tokio_postgres::{self, AsyncMessage, NoTls};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Most entries per map; past it the map starts over.
const CAPACITY: usize = 100_000;

/// A provider link with the patient and target its data goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRow {
    pub link_id: uuid::Uuid,
    pub organization_id: uuid::Uuid,
    pub patient_id: uuid::Uuid,
    pub ehr_target_id: uuid::Uuid,
    pub patient_reference: String,
    pub status: String,
}

/// The cache's state, free of I/O.
#[derive(Debug, Default)]
pub struct CacheState {
    /// Whether the listener is up (the cache is used only then).
    live: bool,
    epoch: u64,
    /// The payload of the last notification heard (the table that changed).
    last_heard: Option<String>,
    apps: HashMap<String, Option<uuid::Uuid>>,
    links: HashMap<(uuid::Uuid, String), Vec<LinkRow>>,
}

impl CacheState {
    /// The epoch a lookup starts in, or `None` when answers may not be cached now.
    pub fn begin(&self) -> Option<u64> {
        self.live.then_some(self.epoch)
    }

    /// Something changed (or may have): forget everything.
    pub fn invalidate(&mut self) {
        self.epoch += 1;
        self.apps.clear();
        self.links.clear();
    }

    /// The listener came up (`true`, after `LISTEN` succeeded) or went down.
    pub fn set_live(&mut self, live: bool) {
        self.invalidate();
        self.live = live;
    }

    pub fn app(&self, token_hash: &str) -> Option<Option<uuid::Uuid>> {
        if !self.live {
            return None;
        }
        self.apps.get(token_hash).copied()
    }

    pub fn links(&self, app: uuid::Uuid, user: &str) -> Option<Vec<LinkRow>> {
        if !self.live {
            return None;
        }
        self.links.get(&(app, user.to_owned())).cloned()
    }

    /// Stores an app lookup that began in `epoch`, unless something changed since.
    pub fn store_app(&mut self, epoch: Option<u64>, token_hash: &str, app: Option<uuid::Uuid>) {
        if self.live && epoch == Some(self.epoch) {
            if self.apps.len() >= CAPACITY {
                self.apps.clear();
            }
            self.apps.insert(token_hash.to_owned(), app);
        }
    }

    /// Stores a link lookup that began in `epoch`, unless something changed since.
    pub fn store_links(
        &mut self,
        epoch: Option<u64>,
        app: uuid::Uuid,
        user: &str,
        rows: &[LinkRow],
    ) {
        if self.live && epoch == Some(self.epoch) {
            if self.links.len() >= CAPACITY {
                self.links.clear();
            }
            self.links.insert((app, user.to_owned()), rows.to_vec());
        }
    }
}

/// The shared cache and its listener.
#[derive(Clone, Debug, Default)]
pub struct LookupCache(Arc<Mutex<CacheState>>);

impl LookupCache {
    pub fn lock(&self) -> MutexGuard<'_, CacheState> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// How many changes (or listener restarts) the cache has seen: tests wait on it.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// The payload of the last notification heard.
    pub fn last_heard(&self) -> Option<String> {
        self.lock().last_heard.clone()
    }

    /// Whether the listener is up.
    pub fn is_live(&self) -> bool {
        self.lock().live
    }

    /// Keeps a connection to `url` listening on `channel` until the process ends, reconnecting
    /// after a second whenever it drops.
    pub fn spawn_listener(
        &self,
        url: String,
        channel: &'static str,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = cache.listen(&url, channel).await {
                    tracing::warn!(%error, "configuration listener down, lookups uncached");
                }
                cache.lock().set_live(false);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    async fn listen(&self, url: &str, channel: &str) -> Result<(), tokio_postgres::Error> {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
        let (up, mut ended) = tokio::sync::oneshot::channel::<Result<(), tokio_postgres::Error>>();
        let cache = self.clone();
        let driver = tokio::spawn(async move {
            let result = loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let mut state = cache.lock();
                        state.invalidate();
                        state.last_heard = Some(n.payload().to_owned());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => break Err(error),
                    None => break Ok(()),
                }
            };
            let _ = up.send(result);
        });
        let listening = client.batch_execute(&format!("LISTEN {channel}")).await;
        if let Err(error) = listening {
            driver.abort();
            return Err(error);
        }
        self.lock().set_live(true);
        tracing::info!(channel, "configuration listener up, lookups cached");
        let result = match (&mut ended).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        };
        drop(client);
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(status: &str) -> LinkRow {
        LinkRow {
            link_id: uuid::Uuid::nil(),
            organization_id: uuid::Uuid::nil(),
            patient_id: uuid::Uuid::nil(),
            ehr_target_id: uuid::Uuid::nil(),
            patient_reference: "Patient/1".into(),
            status: status.into(),
        }
    }

    #[test]
    fn test_nothing_is_cached_while_the_listener_is_down() {
        let mut s = CacheState::default();
        assert_eq!(s.begin(), None);
        s.store_app(Some(0), "h", Some(uuid::Uuid::nil()));
        assert_eq!(s.app("h"), None);
        s.set_live(true);
        let epoch = s.begin();
        s.store_app(epoch, "h", Some(uuid::Uuid::nil()));
        assert_eq!(s.app("h"), Some(Some(uuid::Uuid::nil())));
        // Down again: forgotten, and not used even if stored.
        s.set_live(false);
        assert_eq!(s.app("h"), None);
        s.set_live(true);
        assert_eq!(s.app("h"), None);
    }

    #[test]
    fn test_an_answer_from_before_a_change_is_not_stored() {
        let mut s = CacheState::default();
        s.set_live(true);
        let app = uuid::Uuid::nil();
        let before = s.begin();
        // The lookup reads "active", then the link is disabled and the change announced.
        s.invalidate();
        s.store_links(before, app, "42", &[row("active")]);
        assert_eq!(s.links(app, "42"), None);
        let after = s.begin();
        s.store_links(after, app, "42", &[row("disabled")]);
        assert_eq!(s.links(app, "42"), Some(vec![row("disabled")]));
    }

    #[test]
    fn test_a_change_forgets_every_answer_including_unknown_tokens() {
        let mut s = CacheState::default();
        s.set_live(true);
        let e = s.begin();
        s.store_app(e, "unknown", None);
        s.store_links(e, uuid::Uuid::nil(), "42", &[]);
        assert_eq!(s.app("unknown"), Some(None));
        assert_eq!(s.links(uuid::Uuid::nil(), "42"), Some(vec![]));
        s.invalidate();
        assert_eq!(s.app("unknown"), None);
        assert_eq!(s.links(uuid::Uuid::nil(), "42"), None);
    }
}
