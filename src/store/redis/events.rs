//! Change streams on Redis pub/sub: channel names, and the subscriber side.

use super::super::events::{
    parse_message, BufferLimits, Change, ChangeKind, Event, EventHub, RedisSubscriptions, Watch,
};
use super::super::{AssetKey, StoreError, StoreResult, TaskScope};
use super::call;
use super::codec::decode;
use super::{RedisSettings, RedisStore};

/// The change channel of a task: `<prefix>ev:{t:<digest>}`, shared by its map indices.
/// Derived from a scope key (`<prefix>{t:<digest>}:<map_index>`), so purges and writes
/// need no extra arguments.
pub(super) fn task_channel(scope_key: &str) -> String {
    match scope_key.rfind("{t:") {
        Some(tag) => {
            let base = scope_key
                .rsplit_once(':')
                .map_or(scope_key, |(base, _)| base);
            [&scope_key[..tag], "ev:", &base[tag..]].concat()
        }
        None => String::new(),
    }
}

/// A published change message (see `events::parse_message`) as an event.
pub(super) fn decode_event(message: &str) -> Option<Event> {
    let (map_index, kind, key, rest) = parse_message(message)?;
    let change = match kind {
        ChangeKind::Set => {
            let value = decode(rest.to_owned()).ok()?;
            Change::Set {
                key: key?.to_owned(),
                json: value.json,
                version: value.version,
            }
        }
        ChangeKind::Delete => Change::Delete {
            key: key?.to_owned(),
        },
        ChangeKind::Clear => Change::Clear,
    };
    Some(Event { map_index, change })
}

impl RedisStore {
    /// The channel a write publishes its change on: none (`""`, which the scripts skip)
    /// when change events are off.
    pub(super) fn announced(&self, channel: String) -> String {
        if self.change_events {
            channel
        } else {
            String::new()
        }
    }

    pub(super) fn asset_channel(&self, asset: &AssetKey) -> String {
        [&self.prefix, "ev:{a:", &asset.0, "}"].concat()
    }

    /// Starts the change streams: one subscriber connection, each watcher buffering at
    /// most `limits`. Until called, watching is refused (writes publish regardless).
    pub async fn enable_change_streams(
        &self,
        settings: &RedisSettings,
        limits: BufferLimits,
    ) -> StoreResult<()> {
        let subscriber = call::subscriber(settings, &self.redis).await?;
        self.events.set_limits(limits);
        RedisSubscriptions::spawn(subscriber, self.events.clone(), decode_event);
        Ok(())
    }

    pub(super) fn hub(&self) -> StoreResult<&EventHub> {
        let hub = &self.events;
        if hub.has_upstream() {
            Ok(hub)
        } else {
            Err(StoreError::Internal(
                "change streams are not started".into(),
            ))
        }
    }

    pub(super) async fn watch_task(&self, scope: &TaskScope) -> StoreResult<Watch> {
        let keys = self.task_keys(scope);
        self.hub()?
            .watch(task_channel(&keys.scope), Some(scope.map_index))
            .await
    }

    pub(super) async fn watch_asset(&self, asset: &AssetKey) -> StoreResult<Watch> {
        self.hub()?.watch(self.asset_channel(asset), None).await
    }

    pub(super) fn close_watches(&self) {
        self.events.close();
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::encode;
    use super::*;

    #[test]
    fn change_channels_and_events() {
        assert_eq!(task_channel("p:{t:ab12}:-1"), "p:ev:{t:ab12}");
        assert_eq!(task_channel("{t:ab12}:3"), "ev:{t:ab12}");
        let set = decode_event(&format!("s-1:3:k:v{}", encode("1.0", 5, "0a", None))).unwrap();
        assert_eq!(set.map_index, Some(-1));
        assert_eq!(
            set.change,
            Change::Set {
                key: "k:v".into(),
                json: "1.0".into(),
                version: "0a".into()
            }
        );
        assert_eq!(decode_event("c:").unwrap().change, Change::Clear);
        assert_eq!(decode_event("x:"), None);
    }
}
