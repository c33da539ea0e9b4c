//! The Pub/Sub backend's settings: the `[broker.pubsub]` section, and the names of the
//! resources it uses.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Settings of the Pub/Sub backend (the `[broker.pubsub]` manifest section).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PubSubConfig {
    /// The Google Cloud project.
    pub project: String,
    /// The endpoint, such as `http://127.0.0.1:8085` for an emulator. Without it:
    /// `$PUBSUB_EMULATOR_HOST` if set, else Google's endpoint.
    pub endpoint: Option<String>,
    /// Use anonymous credentials (the emulator's); implied by an emulator endpoint from
    /// `$PUBSUB_EMULATOR_HOST`. Otherwise Application Default Credentials.
    #[serde(default)]
    pub anonymous: bool,
    /// Create missing topics and subscriptions at start-up. Turn it off in production
    /// projects where the application may not administer them.
    #[serde(default = "default_true")]
    pub create_resources: bool,
    /// Explicit subscription names per topic, overriding the `GROUP--TOPIC` convention.
    #[serde(default)]
    pub subscriptions: BTreeMap<String, String>,
    /// Ack deadline of subscriptions switchyard creates, in seconds (10 to 600). The SDK
    /// extends leases automatically while a message is being handled, so a short deadline
    /// costs nothing and bounds how long a message leased by a client that vanished (or was
    /// closing) waits before going to another one.
    #[serde(default = "default_ack_deadline")]
    pub ack_deadline_s: i32,
    /// Streaming pulls per subscription (one stream carries about 2,000 messages/s on the
    /// emulator).
    #[serde(default = "default_streams")]
    pub streams: usize,
    /// Flow control: messages received but not yet settled, per stream.
    #[serde(default = "default_outstanding")]
    pub max_outstanding_messages: i64,
    /// Messages published but not yet confirmed by the server before `publish` waits.
    #[serde(default = "default_outstanding_publishes")]
    pub max_outstanding_publishes: usize,
    /// Publish batching: send a batch once it holds this many messages...
    #[serde(default = "default_batch_messages")]
    pub batch_max_messages: u32,
    /// ...or after this many milliseconds.
    #[serde(default = "default_batch_delay_ms")]
    pub batch_max_delay_ms: u64,
    /// How long to wait for the service at start-up, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Dead-letter policy for subscriptions switchyard creates: after
    /// `max_delivery_attempts` deliveries (5 to 100) Pub/Sub moves a message to this topic.
    pub dead_letter_topic: Option<String>,
    /// Deliveries before a message is dead-lettered (with `dead_letter_topic`).
    #[serde(default = "default_max_delivery_attempts")]
    pub max_delivery_attempts: i32,
}

fn default_max_delivery_attempts() -> i32 {
    5
}

fn default_true() -> bool {
    true
}
fn default_ack_deadline() -> i32 {
    10
}
fn default_streams() -> usize {
    4
}
fn default_outstanding() -> i64 {
    1000
}
fn default_outstanding_publishes() -> usize {
    10_000
}
fn default_batch_messages() -> u32 {
    100
}
fn default_batch_delay_ms() -> u64 {
    5
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}

impl PubSubConfig {
    /// Settings for `project`, defaults otherwise.
    pub fn new(project: impl Into<String>) -> Self {
        Self {
            project: project.into(),
            endpoint: None,
            anonymous: false,
            create_resources: true,
            subscriptions: BTreeMap::new(),
            ack_deadline_s: default_ack_deadline(),
            streams: default_streams(),
            max_outstanding_messages: default_outstanding(),
            max_outstanding_publishes: default_outstanding_publishes(),
            batch_max_messages: default_batch_messages(),
            batch_max_delay_ms: default_batch_delay_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            dead_letter_topic: None,
            max_delivery_attempts: default_max_delivery_attempts(),
        }
    }

    /// The endpoint and whether to use anonymous credentials, after `$PUBSUB_EMULATOR_HOST`.
    pub(super) fn resolved_endpoint(&self) -> (Option<String>, bool) {
        if let Some(endpoint) = &self.endpoint {
            return (Some(endpoint.clone()), self.anonymous);
        }
        match std::env::var("PUBSUB_EMULATOR_HOST") {
            Ok(host) if !host.is_empty() => {
                let endpoint = if host.contains("://") {
                    host
                } else {
                    format!("http://{host}")
                };
                (Some(endpoint), true)
            }
            _ => (None, self.anonymous),
        }
    }

    /// The full resource name of a topic in this project (`projects/P/topics/T`).
    pub fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.project)
    }

    /// The full resource name of a subscription in this project.
    pub fn subscription_path(&self, subscription: &str) -> String {
        format!("projects/{}/subscriptions/{subscription}", self.project)
    }

    /// The subscription a group uses for a topic.
    pub fn subscription_for(&self, group: &str, topic: &str, topics_in_group: usize) -> String {
        if let Some(name) = self.subscriptions.get(topic) {
            return name.clone();
        }
        if topics_in_group == 1 {
            group.to_string()
        } else {
            format!("{group}--{topic}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_names_follow_the_group() {
        let mut config = PubSubConfig::new("p");
        assert_eq!(
            config.subscription_for("classifier", "requests", 1),
            "classifier"
        );
        assert_eq!(config.subscription_for("g", "a", 2), "g--a");
        config.subscriptions.insert("a".into(), "custom".into());
        assert_eq!(config.subscription_for("g", "a", 2), "custom");
    }

    #[test]
    fn an_explicit_endpoint_wins_over_the_environment() {
        let mut config = PubSubConfig::new("p");
        config.endpoint = Some("http://localhost:1".into());
        assert_eq!(
            config.resolved_endpoint(),
            (Some("http://localhost:1".into()), false)
        );
    }
}
