//! Change events: every set, delete and clear of a task scope's or an asset's keys, fanned
//! out to this process's watchers (the SSE change streams).
//!
//! Events travel on channels: one per asset, and one per task shared by all its map
//! indices (an event names its map index; a clear of every map index names none), so a
//! clear of all map indices is one message. With Redis, the write scripts `PUBLISH` in the
//! same atomic step as the write, and one subscriber connection per process (see
//! [`RedisSubscriptions`]) subscribes to a channel while at least one local watcher wants
//! it; that is what makes a write through any replica reach watchers on every replica.
//! The in-memory store delivers straight to its hub.
//!
//! Buffers are bounded, per watcher, in events and in bytes ([`BufferLimits`]): a watcher
//! that falls further behind (a client that stopped reading) is cut off. What it had
//! buffered is dropped at once, and its next read is [`RecvError::Lagged`] (its stream
//! ends). Every watcher has a queue of its own, so one slow client never holds events for
//! the others, nor they for it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};

pub use tokio::sync::broadcast::error::RecvError;

use super::{StoreError, StoreResult};

/// Events buffered per watcher and channel unless configured (`AIRSTATE_CHANGE_STREAM_BUFFER`
/// shows it as its default).
pub const DEFAULT_EVENT_BUFFER: usize = 256;

/// Bytes of events buffered per watcher unless configured
/// (`AIRSTATE_CHANGE_STREAM_BUFFER_BYTES`).
pub const DEFAULT_EVENT_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// How much one watcher may have buffered before it is cut off. One event is always
/// accepted into an empty buffer, whatever its size (request bodies bound it), so a value
/// larger than `bytes` still reaches a watcher that keeps up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    pub events: usize,
    pub bytes: usize,
}

impl Default for BufferLimits {
    fn default() -> Self {
        Self {
            events: DEFAULT_EVENT_BUFFER,
            bytes: DEFAULT_EVENT_BUFFER_BYTES,
        }
    }
}

/// One change to a task scope or an asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Set {
        key: String,
        /// The JSON text exactly as stored.
        json: String,
        version: String,
    },
    Delete {
        key: String,
    },
    Clear,
}

/// What kind of change an event is: the one place Rust reads the scripts' spelling of it
/// (the first byte of a published message, see [`parse_message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Set,
    Delete,
    Clear,
}

impl ChangeKind {
    fn from_wire(op: char) -> Option<Self> {
        match op {
            's' => Some(ChangeKind::Set),
            'd' => Some(ChangeKind::Delete),
            'c' => Some(ChangeKind::Clear),
            _ => None,
        }
    }

    /// The name a change stream gives an event of this kind.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Set => "set",
            ChangeKind::Delete => "delete",
            ChangeKind::Clear => "clear",
        }
    }
}

impl Change {
    pub fn kind(&self) -> ChangeKind {
        match self {
            Change::Set { .. } => ChangeKind::Set,
            Change::Delete { .. } => ChangeKind::Delete,
            Change::Clear => ChangeKind::Clear,
        }
    }
}

/// A change, with the map index it happened at (task channels only; `None` on an asset
/// channel, or for a clear of every map index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub map_index: Option<i64>,
    pub change: Change,
}

impl Event {
    /// What the event costs a watcher's buffer: its text plus a fixed overhead.
    pub fn weight(&self) -> usize {
        EVENT_OVERHEAD
            + match &self.change {
                Change::Set { key, json, version } => key.len() + json.len() + version.len(),
                Change::Delete { key } => key.len(),
                Change::Clear => 0,
            }
    }

    /// Whether a watcher of `map_index` (`None`: an asset watcher) should see this event.
    pub fn concerns(&self, map_index: Option<i64>) -> bool {
        self.map_index.is_none() || self.map_index == map_index
    }
}

/// The bytes an event costs beyond its text (allocation headers, the shared `Arc`).
pub const EVENT_OVERHEAD: usize = 64;

/// What a channel delivers: an event, or word that events were lost upstream.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Event>),
    /// The process's own subscription fell behind (or reconnected); events may be missing.
    Lost,
}

/// Requests to the one task that owns the Redis subscriber connection.
pub enum Upstream {
    /// A watcher wants `channel`; the reply comes once Redis confirms the subscription.
    Subscribe(String, oneshot::Sender<StoreResult<()>>),
    /// A watcher of `channel` left.
    Unsubscribe(String),
}

impl Delivery {
    fn weight(&self) -> usize {
        match self {
            Delivery::Event(event) => event.weight(),
            Delivery::Lost => EVENT_OVERHEAD,
        }
    }
}

/// One watcher's buffer.
struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    pending: VecDeque<(Delivery, usize)>,
    bytes: usize,
    /// Set once the watcher was cut off: the events it will never see.
    missed: Option<u64>,
}

impl Queue {
    fn push(&self, delivery: Delivery, size: usize, limits: BufferLimits) {
        let mut state = self.state.lock().unwrap();
        if let Some(missed) = state.missed.as_mut() {
            *missed += 1;
            return;
        }
        let full = state.pending.len() >= limits.events
            || (!state.pending.is_empty() && state.bytes + size > limits.bytes);
        if full {
            // Freed now, not whenever the client reads again (it may never).
            let missed = state.pending.len() as u64 + 1;
            state.pending.clear();
            state.bytes = 0;
            state.missed = Some(missed);
            metrics::counter!("airstate_change_streams_cut_total").increment(1);
        } else {
            state.bytes += size;
            state.pending.push_back((delivery, size));
        }
        drop(state);
        // One consumer: a permit is kept if it is not waiting right now.
        self.ready.notify_one();
    }
}

/// A watcher's end of its buffer.
pub struct Deliveries {
    queue: Arc<Queue>,
}

impl Deliveries {
    /// The next delivery, in order; [`RecvError::Lagged`] once the watcher was cut off.
    pub async fn recv(&mut self) -> Result<Delivery, RecvError> {
        loop {
            {
                let mut state = self.queue.state.lock().unwrap();
                if let Some((delivery, size)) = state.pending.pop_front() {
                    state.bytes -= size;
                    return Ok(delivery);
                }
                if let Some(missed) = state.missed {
                    return Err(RecvError::Lagged(missed));
                }
            }
            self.queue.ready.notified().await;
        }
    }
}

struct HubInner {
    channels: Mutex<HashMap<String, Vec<Arc<Queue>>>>,
    events: AtomicUsize,
    bytes: AtomicUsize,
    closed: watch::Sender<bool>,
    upstream: Mutex<Option<mpsc::UnboundedSender<Upstream>>>,
}

/// This process's fan-out of events to watchers, per channel.
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<HubInner>,
}

/// One watcher's view of a channel. Dropping it ends the watch (and, for the last local
/// watcher of a channel, the Redis subscription).
pub struct Watch {
    pub deliveries: Deliveries,
    /// Turns `true` when the process shuts down: the stream should end.
    pub closed: watch::Receiver<bool>,
    /// Which map index this watcher follows (`None` for an asset).
    pub map_index: Option<i64>,
    _guard: Guard,
}

struct Guard {
    hub: Arc<HubInner>,
    channel: String,
    queue: Arc<Queue>,
    upstream: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut channels = self.hub.channels.lock().unwrap();
        if let Some(queues) = channels.get_mut(&self.channel) {
            queues.retain(|queue| !Arc::ptr_eq(queue, &self.queue));
            if queues.is_empty() {
                channels.remove(&self.channel);
            }
        }
        drop(channels);
        if self.upstream {
            if let Some(upstream) = self.hub.upstream.lock().unwrap().as_ref() {
                let _ = upstream.send(Upstream::Unsubscribe(self.channel.clone()));
            }
        }
    }
}

impl EventHub {
    /// A hub whose watchers buffer at most `limits` each.
    pub fn new(limits: BufferLimits) -> Self {
        let hub = Self {
            inner: Arc::new(HubInner {
                channels: Mutex::new(HashMap::new()),
                events: AtomicUsize::new(1),
                bytes: AtomicUsize::new(1),
                closed: watch::channel(false).0,
                upstream: Mutex::new(None),
            }),
        };
        hub.set_limits(limits);
        hub
    }

    /// Sets the per-watcher buffer limits.
    pub fn set_limits(&self, limits: BufferLimits) {
        let inner = &self.inner;
        inner.events.store(limits.events.max(1), Ordering::Relaxed);
        inner.bytes.store(limits.bytes.max(1), Ordering::Relaxed);
    }

    fn limits(&self) -> BufferLimits {
        BufferLimits {
            events: self.inner.events.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
        }
    }

    /// Routes subscriptions to a Redis subscriber task (see [`RedisSubscriptions`]).
    pub fn set_upstream(&self, upstream: mpsc::UnboundedSender<Upstream>) {
        *self.inner.upstream.lock().unwrap() = Some(upstream);
    }

    pub fn has_upstream(&self) -> bool {
        self.inner.upstream.lock().unwrap().is_some()
    }

    /// Starts watching `channel`; returns once events on it will be delivered.
    pub async fn watch(&self, channel: String, map_index: Option<i64>) -> StoreResult<Watch> {
        if *self.inner.closed.borrow() {
            return Err(StoreError::Unavailable("shutting down".into()));
        }
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            ready: Notify::new(),
        });
        self.inner
            .channels
            .lock()
            .unwrap()
            .entry(channel.clone())
            .or_default()
            .push(queue.clone());
        let upstream = self.inner.upstream.lock().unwrap().clone();
        let mut guard = Guard {
            hub: self.inner.clone(),
            channel: channel.clone(),
            queue: queue.clone(),
            upstream: false,
        };
        if let Some(upstream) = upstream {
            let (reply, confirmed) = oneshot::channel();
            upstream
                .send(Upstream::Subscribe(channel, reply))
                .map_err(|_| StoreError::Unavailable("change stream subscriber stopped".into()))?;
            confirmed.await.map_err(|_| {
                StoreError::Unavailable("change stream subscriber stopped".into())
            })??;
            // The subscriber counts this watcher now, so the guard must uncount it.
            guard.upstream = true;
        }
        Ok(Watch {
            deliveries: Deliveries { queue },
            closed: self.inner.closed.subscribe(),
            map_index,
            _guard: guard,
        })
    }

    /// Delivers to this process's watchers of `channel`, if any.
    pub fn deliver(&self, channel: &str, delivery: Delivery) {
        let limits = self.limits();
        let size = delivery.weight();
        if let Some(queues) = self.inner.channels.lock().unwrap().get(channel) {
            for queue in queues {
                queue.push(delivery.clone(), size, limits);
            }
        }
    }

    /// Tells every watcher that events may have been lost.
    pub fn deliver_lost_everywhere(&self) {
        let limits = self.limits();
        for queues in self.inner.channels.lock().unwrap().values() {
            for queue in queues {
                queue.push(Delivery::Lost, Delivery::Lost.weight(), limits);
            }
        }
    }

    /// Ends every stream (on shutdown), and refuses new ones.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// Local channels with at least one watcher.
    pub fn watched_channels(&self) -> usize {
        self.inner.channels.lock().unwrap().len()
    }
}

/// `<op><map_index>:<key bytes>:<key><encoded value>`: the message the write scripts
/// publish (`op` is `s`et, `d`elete or `c`lear; clear has no key and an empty map index
/// when it covers every map index). Returns the event and, for a set, the encoded value
/// for the caller to decode.
pub fn parse_message(message: &str) -> Option<(Option<i64>, ChangeKind, Option<&str>, &str)> {
    let op = message.chars().next()?;
    let kind = ChangeKind::from_wire(op)?;
    let rest = &message[op.len_utf8()..];
    let (index, rest) = rest.split_once(':')?;
    let map_index = if index.is_empty() {
        None
    } else {
        Some(index.parse().ok()?)
    };
    if kind == ChangeKind::Clear {
        return Some((map_index, kind, None, ""));
    }
    let (length, rest) = rest.split_once(':')?;
    let length: usize = length.parse().ok()?;
    let key = rest.get(..length)?;
    Some((map_index, kind, Some(key), &rest[length..]))
}

/// Owns the Redis subscriber connection: subscribes to a channel for its first local
/// watcher and unsubscribes after its last, in request order, and feeds every message to
/// the hub. `decode` turns a message into an event.
pub struct RedisSubscriptions;

impl RedisSubscriptions {
    pub fn spawn(
        subscriber: fred::clients::SubscriberClient,
        hub: EventHub,
        decode: fn(&str) -> Option<Event>,
    ) {
        use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
        let (requests, mut incoming) = mpsc::unbounded_channel();
        hub.set_upstream(requests);
        // Redelivers subscriptions after a reconnect; events during the gap are lost, and
        // watchers are told so.
        let _resubscribe = subscriber.manage_subscriptions();
        let mut reconnects = subscriber.reconnect_rx();
        let lost_hub = hub.clone();
        tokio::spawn(async move {
            while reconnects.recv().await.is_ok() {
                lost_hub.deliver_lost_everywhere();
            }
        });
        let mut messages = subscriber.message_rx();
        let message_hub = hub.clone();
        tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(message) => {
                        let Some(text) = message.value.as_str() else {
                            continue;
                        };
                        match decode(&text) {
                            Some(event) => message_hub.deliver(
                                &message.channel.to_string(),
                                Delivery::Event(event.into()),
                            ),
                            None => tracing::warn!(
                                channel = %message.channel,
                                "unreadable change event; ignored"
                            ),
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "change stream subscriber lagged");
                        message_hub.deliver_lost_everywhere();
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        tokio::spawn(async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            while let Some(request) = incoming.recv().await {
                match request {
                    Upstream::Subscribe(channel, reply) => {
                        let count = counts.entry(channel.clone()).or_default();
                        *count += 1;
                        let outcome = if *count == 1 {
                            subscriber
                                .subscribe(channel.as_str())
                                .await
                                .map_err(|e| StoreError::Unavailable(e.to_string()))
                        } else {
                            Ok(())
                        };
                        if outcome.is_err() {
                            // Not subscribed: this watcher is not counted, and the next
                            // one tries again.
                            counts.remove(&channel);
                        }
                        let _ = reply.send(outcome);
                    }
                    Upstream::Unsubscribe(channel) => {
                        let Some(count) = counts.get_mut(&channel) else {
                            continue;
                        };
                        *count -= 1;
                        if *count == 0 {
                            counts.remove(&channel);
                            if let Err(error) = subscriber.unsubscribe(channel.as_str()).await {
                                tracing::debug!(%error, "unsubscribe failed");
                            }
                        }
                    }
                }
            }
            let _ = subscriber.quit().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        assert_eq!(
            parse_message("s3:4:a:b:1.x::\"v\""),
            Some((Some(3), ChangeKind::Set, Some("a:b:"), "1.x::\"v\""))
        );
        assert_eq!(
            parse_message("d-1:2:ké"),
            None,
            "byte length 2 cuts 'é' in half"
        );
        assert_eq!(
            parse_message("d-1:3:ké"),
            Some((Some(-1), ChangeKind::Delete, Some("ké"), ""))
        );
        assert_eq!(
            parse_message("c:"),
            Some((None, ChangeKind::Clear, None, ""))
        );
        assert_eq!(
            parse_message("c7:"),
            Some((Some(7), ChangeKind::Clear, None, ""))
        );
        for bad in ["", "s", "sx:1:a", "s1:9:a", "s:1", "x:", "x1:1:a"] {
            assert_eq!(parse_message(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn watchers_get_their_channel_and_lagging_is_bounded() {
        let hub = EventHub::new(BufferLimits {
            events: 2,
            bytes: usize::MAX,
        });
        let mut watch = hub.watch("a".into(), None).await.unwrap();
        let event = |key: &str| {
            Delivery::Event(Arc::new(Event {
                map_index: None,
                change: Change::Delete { key: key.into() },
            }))
        };
        hub.deliver("b", event("other channel"));
        hub.deliver("a", event("k"));
        match watch.deliveries.recv().await.unwrap() {
            Delivery::Event(e) => assert_eq!(e.change, Change::Delete { key: "k".into() }),
            Delivery::Lost => panic!("lost"),
        }
        for key in ["1", "2", "3"] {
            hub.deliver("a", event(key));
        }
        // The third undelivered event cuts the watcher off; the two it had are dropped.
        assert!(matches!(
            watch.deliveries.recv().await,
            Err(RecvError::Lagged(3))
        ));
        assert_eq!(hub.watched_channels(), 1);
        drop(watch);
        assert_eq!(hub.watched_channels(), 0);
        hub.close();
        assert!(hub.watch("a".into(), None).await.is_err());
    }
}
