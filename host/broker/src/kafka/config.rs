//! The Kafka backend's settings: the `[broker.kafka]` section, and the client rule of the
//! embedded broker, written once.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;
use serde::Deserialize;

/// librdkafka settings for clients of the embedded broker, here or in another process
/// (`switchyard broker`); see [`KafkaConfig::for_embedded`].
const EMBEDDED_PROPERTIES: [(&str, &str); 3] = [
    ("fetch.wait.max.ms", "1"),
    ("session.timeout.ms", "2000"),
    ("heartbeat.interval.ms", "500"),
];

/// Settings of the Kafka backend (the `[broker.kafka]` manifest section).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// How long to wait for the cluster at start-up before giving up, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Create missing topics at start-up (needs the CreateTopics permission).
    #[serde(default = "default_true")]
    pub create_topics: bool,
    /// Replication factor for created topics; `-1` uses the broker's default.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// librdkafka properties passed through as they are, for producer and consumer alike
    /// (`security.protocol`, `sasl.*`, `compression.type`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

fn default_true() -> bool {
    true
}

fn default_replication() -> i32 {
    -1
}

impl KafkaConfig {
    /// Settings for a cluster at `bootstrap_servers`, defaults otherwise.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            connect_timeout_ms: default_connect_timeout_ms(),
            create_topics: true,
            replication_factor: default_replication(),
            properties: BTreeMap::new(),
        }
    }

    /// Settings for a client of the embedded broker at `bootstrap_servers` (this process's or
    /// another's, such as `switchyard broker`): the one place its client rule is written.
    ///
    /// The mock broker answers an empty fetch only when `fetch.wait.max.ms` has passed, even
    /// if data arrives meanwhile (a real broker answers at once): poll briefly instead of
    /// adding half a second to every message's latency.
    ///
    /// When the last member leaves a group, the mock keeps the group rebalancing for the
    /// session timeout minus one second before a new member may join; a short session timeout
    /// keeps a restarted consumer from waiting 44 s. It also bounds how long the partitions of
    /// a member that died (kill -9) wait: 2 s to notice, then one join round of 1 s (measured
    /// in crash_safety.rs: a restarted host resumes 2.8 s after it starts, 4.8 s with a 3 s
    /// session).
    pub fn for_embedded(bootstrap_servers: impl Into<String>) -> Self {
        let mut config = Self::new(bootstrap_servers);
        for (key, value) in EMBEDDED_PROPERTIES {
            config.properties.insert(key.to_string(), value.to_string());
        }
        config
    }

    /// The librdkafka client configuration: bootstrap servers and every property.
    pub(super) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        // librdkafka logs connection refusals at error level every second; they reach the user
        // as one clear error instead (see `Kafka::connect`).
        config.set("log_level", "3");
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}
