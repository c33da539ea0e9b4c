//! One component's manifest entry: what it is (handler or command), what it is granted
//! (topics, tables, directories, `wasi:nn`), its limits, its retries and its dead letters.

use std::path::PathBuf;

use serde::Deserialize;

use switchyard_broker::StartPosition;

/// One component and what it is granted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// Path to the component's `.wasm`.
    pub wasm: PathBuf,
    /// Topics delivered to the component's `incoming-handler`. Empty: the component is a
    /// command, run once through `wasi:cli/run`.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Consumer group (subscription); defaults to the component's name.
    pub group: Option<String>,
    /// Where a new group starts: `earliest` (default) or `latest`.
    #[serde(default)]
    pub start: StartPosition,
    /// Topics the component may send to; sending elsewhere is `permission-denied`.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Results tables the component may write through `switchyard:host/results` (such as
    /// `"predictions"`); opening any other is `access-denied`.
    #[serde(default)]
    pub results: Vec<String>,
    /// Instances handling messages concurrently (handlers only).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// The most messages one call may take, for components that export
    /// `switchyard:host/batch`: a worker takes what is already waiting, up to this many,
    /// without waiting for more (unless `batch_max_wait_ms` says so), so a quiet topic still
    /// gets one message per call. 1 turns batching off. Components without the export get one
    /// message per call whatever it says.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// How long a batch may wait to fill, in milliseconds, from its first message: at a low
    /// rate a call then carries more messages (its fixed cost shared) at the price of up to
    /// this much latency. 0, the default, never waits. At most [`MAX_BATCH_WAIT_MS`].
    #[serde(default)]
    pub batch_max_wait_ms: u64,
    /// Arguments the component sees (`wasi:cli/environment`); the component's name is `argv[0]`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Host directories the component may read, and where it sees them.
    #[serde(default)]
    pub preopens: Vec<Preopen>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// What to do when the handler fails.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Where a message goes after its last failed attempt: `true` (the default) sends it to
    /// `<topic>.dlq` beside the topic it came from, a string names one dead-letter topic for
    /// every subscribed topic, and `false` drops it (logged and counted) instead.
    #[serde(default)]
    pub dead_letter: DeadLetter,
    /// Lets the component run models on the host through `wasi:nn`, and with which engine:
    /// `"auto"` (ONNX Runtime when installed, else tract), `"tract"` or `"onnxruntime"`.
    /// Absent: its `wasi:nn` calls get the `security` error.
    #[serde(default)]
    pub nn: Option<crate::nn::NnEngine>,
    /// What the handler promises about each message: `"at-least-once"` (the default) or
    /// `"exactly-once"` (Kafka brokers that keep transactions, and Pub/Sub with its
    /// exactly-once delivery; see [`DeliveryGuarantee`]).
    #[serde(default)]
    pub delivery: DeliveryGuarantee,
}

/// What a handler promises about each message it handles (the manifest's `delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryGuarantee {
    /// A message is acknowledged once what its call sent is stored: none is lost, but a host
    /// that dies in between sends it again after the redelivery.
    #[default]
    AtLeastOnce,
    /// On Kafka, what a call sent and the acknowledgement of its message commit in one
    /// transaction: readers that read committed data (librdkafka's and Kafka's default) see
    /// each message's outputs once, however often a host dies. librdkafka's mock cluster (the
    /// embedded broker) does not keep the offsets a transaction commits, so it refuses it
    /// when the handler starts.
    ///
    /// On Pub/Sub, which has no such transaction, the subscription has Pub/Sub's exactly-once
    /// delivery: what a call sent is stored, then the message's acknowledgement is confirmed,
    /// and a confirmed message is never delivered again. A host that dies between the two
    /// handles the message again and sends its outputs again (as at-least-once does), so
    /// readers still need an idempotent sink there.
    ExactlyOnce,
}

impl DeliveryGuarantee {
    /// Its name in a manifest: `at-least-once`, `exactly-once`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AtLeastOnce => "at-least-once",
            Self::ExactlyOnce => "exactly-once",
        }
    }
}

fn default_workers() -> usize {
    1
}

fn default_batch() -> usize {
    32
}

/// The longest `batch_max_wait_ms` a manifest may ask for: a batch that waits longer is a
/// schedule, not a latency trade-off.
pub const MAX_BATCH_WAIT_MS: u64 = 1_000;

/// The largest `batch` a manifest may ask for: a batch's messages are all held, and their
/// replies all wait for the broker, before any of them is settled.
pub const MAX_BATCH: usize = 1024;

impl ComponentConfig {
    /// A component at `wasm` with what a manifest entry naming only `wasm` gets: a command
    /// with one instance, no grants, the default limits and retries.
    pub fn new(wasm: impl Into<PathBuf>) -> Self {
        Self {
            wasm: wasm.into(),
            subscribe: Vec::new(),
            group: None,
            start: StartPosition::default(),
            publish: Vec::new(),
            results: Vec::new(),
            workers: default_workers(),
            batch: default_batch(),
            batch_max_wait_ms: 0,
            args: Vec::new(),
            preopens: Vec::new(),
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            dead_letter: DeadLetter::default(),
            nn: None,
            delivery: DeliveryGuarantee::default(),
        }
    }

    /// Whether the host calls the component per message (it subscribes to something).
    pub fn is_handler(&self) -> bool {
        !self.subscribe.is_empty()
    }

    /// Whether a running handler with this entry can take `new`'s build between messages,
    /// keeping its subscription and workers: only what an instance is made from differs (the
    /// `.wasm`, `args`, `preopens`, `publish`, `limits`, `nn`, `retry`, `dead_letter`). A new
    /// subscription (`subscribe`, `group`, `start`, `delivery`) or pool (`workers`, `batch`)
    /// needs the handler stopped and started again.
    pub fn can_replace_in_place(&self, new: &ComponentConfig) -> bool {
        self.is_handler()
            && self.subscribe == new.subscribe
            && self.group == new.group
            && self.start == new.start
            && self.workers == new.workers
            && self.batch == new.batch
            && self.delivery == new.delivery
    }

    /// The dead-letter topic of messages from `topic`, if dead letters are on.
    pub fn dead_letter_topic(&self, topic: &str) -> Option<String> {
        match &self.dead_letter {
            DeadLetter::Beside => Some(format!("{topic}{DEAD_LETTER_SUFFIX}")),
            DeadLetter::Topic(name) => Some(name.clone()),
            DeadLetter::Off => None,
        }
    }

    /// Every dead-letter topic this component may write: one per subscribed topic, or the
    /// one it names.
    pub fn dead_letter_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .subscribe
            .iter()
            .filter_map(|topic| self.dead_letter_topic(topic))
            .collect();
        topics.dedup();
        topics
    }
}

/// What `dead_letter = true` appends to a topic's name.
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";

/// Where a handler's failed messages go (the manifest's `dead_letter`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeadLetter {
    /// `<topic>.dlq` for messages from `<topic>` (`dead_letter = true`, or no key).
    #[default]
    Beside,
    /// One named topic (`dead_letter = "failed-requests"`).
    Topic(String),
    /// No dead letters: a message is logged, counted and settled after its last attempt
    /// (`dead_letter = false`).
    Off,
}

impl<'de> Deserialize<'de> for DeadLetter {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "true, false or a topic name")]
        enum Given {
            Switch(bool),
            Topic(String),
        }
        Ok(match Given::deserialize(deserializer)? {
            Given::Switch(true) => Self::Beside,
            Given::Switch(false) => Self::Off,
            Given::Topic(name) => Self::Topic(name),
        })
    }
}

/// A host directory made visible to a component.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preopen {
    /// Directory on the host.
    pub host: PathBuf,
    /// Path the component uses for it.
    pub guest: String,
    /// Allow writing (default: read-only).
    #[serde(default)]
    pub writable: bool,
}

/// Limits one instance runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory an instance may grow to, in MiB.
    #[serde(default = "default_memory_mb")]
    pub max_memory_mb: u64,
    /// Wall-clock time one call (`handle`, or a command's `run`) may take, in milliseconds;
    /// 0 means no limit. A call past it traps and costs its instance. It is per message: a
    /// `handle-batch` call with n messages may take n times as long.
    #[serde(default = "default_call_ms")]
    pub max_call_ms: u64,
    /// The largest message the component may create or send: payload, content type and
    /// metadata, in bytes. Creating a larger one traps (the WIT gives `message.new` and
    /// `set-data` no error to return) and costs the instance.
    #[serde(default = "default_message_bytes")]
    pub max_message_bytes: u64,
    /// What one instance may hold in host messages at once (created and not yet sent or
    /// dropped), in MiB: these bytes live in the host, outside `max_memory_mb`.
    #[serde(default = "default_held_mb")]
    pub max_held_mb: u64,
    /// Messages one call may send, per message it handles (a batch of n may send n times as
    /// many); past it `send` returns an `error`.
    #[serde(default = "default_sends_per_call")]
    pub max_sends_per_call: u32,
    /// Entries in the instance's resource table: messages, clients, streams, pollables.
    #[serde(default = "default_resources")]
    pub max_resources: u32,
}

fn default_memory_mb() -> u64 {
    256
}

fn default_call_ms() -> u64 {
    30_000
}

/// Pub/Sub's limit for one message; Kafka's default is 1 MB, so its producer refuses sooner.
fn default_message_bytes() -> u64 {
    10 << 20
}

fn default_held_mb() -> u64 {
    64
}

fn default_sends_per_call() -> u32 {
    1000
}

fn default_resources() -> u32 {
    10_000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory_mb: default_memory_mb(),
            max_call_ms: default_call_ms(),
            max_message_bytes: default_message_bytes(),
            max_held_mb: default_held_mb(),
            max_sends_per_call: default_sends_per_call(),
            max_resources: default_resources(),
        }
    }
}

/// How often to retry a message whose handler failed before settling it anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles each time.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_attempts() -> u32 {
    3
}

fn default_backoff_ms() -> u64 {
    100
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            backoff_ms: default_backoff_ms(),
        }
    }
}
