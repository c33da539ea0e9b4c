//! Which broker to use, and connecting to it.
//!
//! A broker is named in two ways that say the same thing: a typed section of a manifest or a
//! client configuration (`[broker.embedded]`, `[broker.kafka]`, `[broker.pubsub]`), and a URL
//! (`embedded`, `kafka://HOST:PORT?…`, `pubsub://PROJECT?…`), which is what a command line and
//! an environment variable take. [`BrokerConfig::from_url`] and [`BrokerConfig::to_url`]
//! convert between the two without loss, so a configuration can be handed to another process
//! (a test's host, a client of `switchyard broker`) as one string, and every setting a section
//! has can be given on a command line too.
//!
//! URL parameters are percent-decoded (`%26` for `&`, `%3D` for `=`); `+` stays a plus sign.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde::Deserialize;

#[cfg(feature = "kafka")]
use crate::kafka::{EmbeddedKafka, Kafka, KafkaConfig};
#[cfg(feature = "pubsub")]
use crate::pubsub::{PubSub, PubSubConfig};
use crate::{Broker, BrokerError};

/// Which broker to use: the `[broker]` section of a manifest or a client configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum BrokerConfig {
    /// A Kafka-protocol broker inside this process (librdkafka's mock cluster).
    #[cfg(feature = "kafka")]
    Embedded(EmbeddedConfig),
    /// A Kafka cluster.
    #[cfg(feature = "kafka")]
    Kafka(KafkaConfig),
    /// A Google Cloud Pub/Sub project (or the emulator).
    #[cfg(feature = "pubsub")]
    Pubsub(PubSubConfig),
}

/// Settings of the embedded broker.
#[cfg(feature = "kafka")]
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Also listen on this address (such as `127.0.0.1:9092`) for other processes and `kcat`.
    pub listen: Option<std::net::SocketAddr>,
}

/// The embedded broker: what a manifest without a `[broker]` section, and a demo, run on.
#[cfg(feature = "kafka")]
impl Default for BrokerConfig {
    fn default() -> Self {
        Self::Embedded(EmbeddedConfig::default())
    }
}

/// Why a broker URL was refused. Each message names the part at fault and the form expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    /// The URL names no backend this crate knows.
    #[error(
        "unknown broker {url:?}: use `embedded`, kafka://HOST:PORT[,HOST:PORT...][?property=value&...] \
         or pubsub://PROJECT[?endpoint=URL&...]"
    )]
    UnknownScheme {
        /// The URL as given.
        url: String,
    },
    /// The backend exists, but this program was built without it.
    #[error(
        "{scheme} brokers are not built into this program: build switchyard-broker with its \
         `{feature}` Cargo feature"
    )]
    NotBuilt {
        /// `embedded`, `kafka://` or `pubsub://`.
        scheme: &'static str,
        /// The Cargo feature that brings it.
        feature: &'static str,
    },
    /// The part after `scheme://` is empty.
    #[error("{scheme} needs {what}, e.g. {example}")]
    Missing {
        /// `kafka://` or `pubsub://`.
        scheme: &'static str,
        /// What is missing.
        what: &'static str,
        /// A URL that has it.
        example: &'static str,
    },
    /// A parameter without `=value`.
    #[error("broker URL parameter {parameter:?} needs a value: {scheme}…?key=value")]
    NoValue {
        /// The backend's scheme.
        scheme: &'static str,
        /// The parameter as given.
        parameter: String,
    },
    /// A parameter the backend does not take.
    #[error("unknown {scheme} parameter {key:?}: it takes {takes}")]
    UnknownParameter {
        /// The backend's scheme.
        scheme: &'static str,
        /// The parameter's name.
        key: String,
        /// The parameters it takes.
        takes: &'static str,
    },
    /// A parameter whose value does not parse.
    #[error("{scheme} parameter {key}={value:?}: {reason}")]
    BadValue {
        /// The backend's scheme.
        scheme: &'static str,
        /// The parameter's name.
        key: String,
        /// Its value, decoded.
        value: String,
        /// Why it does not parse, and what it takes.
        reason: String,
    },
}

/// What an `embedded` URL takes.
#[cfg(feature = "kafka")]
const EMBEDDED_TAKES: &str = "listen=HOST:PORT";
/// What a `pubsub://` URL takes.
#[cfg(feature = "pubsub")]
const PUBSUB_TAKES: &str = "endpoint, anonymous, create_resources, ack_deadline_s, streams, \
     max_outstanding_messages, max_outstanding_publishes, batch_max_messages, \
     batch_max_delay_ms, connect_timeout_ms, dead_letter_topic, max_delivery_attempts and \
     subscription.TOPIC (the [broker.pubsub] keys)";

/// What `to_url` escapes in a parameter: what would end or split it, and `%` and `+`, which
/// other URL readers decode.
const PARAMETER: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'=')
    .add(b'?');

/// Property names whose values a [`BrokerConfig`]'s `Display` hides.
#[cfg(feature = "kafka")]
const SECRET_WORDS: [&str; 3] = ["password", "secret", "token"];

impl BrokerConfig {
    /// Parses a broker URL:
    ///
    /// - `embedded[?listen=HOST:PORT]`;
    /// - `kafka://HOST:PORT[,HOST:PORT...][?key=value&...]`, where `connect_timeout_ms`,
    ///   `create_topics` and `replication_factor` are the `[broker.kafka]` keys and every other
    ///   key is a librdkafka property;
    /// - `pubsub://PROJECT[?key=value&...]` with the `[broker.pubsub]` keys, and
    ///   `subscription.TOPIC=NAME` for its `subscriptions` table.
    pub fn from_url(url: &str) -> Result<Self, BrokerUrlError> {
        let (location, query) = url.split_once('?').unwrap_or((url, ""));
        if location == "embedded" {
            return embedded_from(&parameters("embedded", query)?);
        }
        if let Some(servers) = location.strip_prefix("kafka://") {
            return kafka_from(servers, &parameters("kafka://", query)?);
        }
        if let Some(project) = location.strip_prefix("pubsub://") {
            return pubsub_from(project, &parameters("pubsub://", query)?);
        }
        Err(BrokerUrlError::UnknownScheme {
            url: url.to_string(),
        })
    }

    /// The URL that [`BrokerConfig::from_url`] reads back as this configuration: only what
    /// differs from the defaults, in a stable order. It carries every property as it is,
    /// credentials included; print a configuration with `Display`, which hides them.
    pub fn to_url(&self) -> String {
        self.url(false)
    }

    /// Connects to the broker (starting the embedded one if asked to), failing with an error
    /// that says how to reach it when it cannot be reached.
    pub async fn connect(&self) -> Result<ConnectedBroker, BrokerError> {
        match self {
            #[cfg(feature = "kafka")]
            Self::Embedded(embedded) => {
                let cluster = Arc::new(EmbeddedKafka::start(embedded.listen).await?);
                Ok(ConnectedBroker {
                    broker: Arc::new(Kafka::embedded(cluster.clone())),
                    embedded: Some(cluster),
                })
            }
            #[cfg(feature = "kafka")]
            Self::Kafka(kafka) => Ok(ConnectedBroker {
                broker: Arc::new(Kafka::connect(kafka.clone()).await?),
                embedded: None,
            }),
            #[cfg(feature = "pubsub")]
            Self::Pubsub(pubsub) => Ok(ConnectedBroker {
                broker: Arc::new(PubSub::connect(pubsub.clone()).await?),
                #[cfg(feature = "kafka")]
                embedded: None,
            }),
        }
    }

    // Only Kafka's properties hold secrets: without Kafka there is nothing to hide.
    #[cfg_attr(not(feature = "kafka"), allow(unused_variables))]
    fn url(&self, redact: bool) -> String {
        match self {
            #[cfg(feature = "kafka")]
            Self::Embedded(embedded) => {
                let mut url = Url::new("embedded");
                if let Some(listen) = embedded.listen {
                    url.push("listen", &listen.to_string());
                }
                url.finish()
            }
            #[cfg(feature = "kafka")]
            Self::Kafka(kafka) => kafka_url(kafka, redact),
            #[cfg(feature = "pubsub")]
            Self::Pubsub(pubsub) => pubsub_url(pubsub),
        }
    }
}

/// The URL, with the values of properties that hold secrets (`sasl.password`, say) shown as
/// `***`: what to put in a log.
impl fmt::Display for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url(true))
    }
}

impl FromStr for BrokerConfig {
    type Err = BrokerUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        Self::from_url(url)
    }
}

/// A connected broker, and the embedded broker behind it if there is one (kept alive here).
pub struct ConnectedBroker {
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// The embedded broker, when the configuration asked for one.
    #[cfg(feature = "kafka")]
    pub embedded: Option<Arc<EmbeddedKafka>>,
}

/// A URL's `key=value` pairs, percent-decoded, in order.
fn parameters(scheme: &'static str, query: &str) -> Result<Vec<(String, String)>, BrokerUrlError> {
    let decode = |text: &str| {
        percent_decode_str(text)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|e| BrokerUrlError::BadValue {
                scheme,
                key: text.to_string(),
                value: text.to_string(),
                reason: format!("not UTF-8 once percent-decoded ({e})"),
            })
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) => Ok((decode(key)?, decode(value)?)),
            None => Err(BrokerUrlError::NoValue {
                scheme,
                parameter: pair.to_string(),
            }),
        })
        .collect()
}

/// A parameter's value as the type of its key.
fn value<T: FromStr>(scheme: &'static str, key: &str, value: &str) -> Result<T, BrokerUrlError>
where
    T::Err: fmt::Display,
{
    value.parse().map_err(|e: T::Err| BrokerUrlError::BadValue {
        scheme,
        key: key.to_string(),
        value: value.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(feature = "kafka")]
fn embedded_from(parameters: &[(String, String)]) -> Result<BrokerConfig, BrokerUrlError> {
    let mut config = EmbeddedConfig::default();
    for (key, given) in parameters {
        match key.as_str() {
            "listen" => config.listen = Some(value("embedded", key, given)?),
            _ => {
                return Err(BrokerUrlError::UnknownParameter {
                    scheme: "embedded",
                    key: key.clone(),
                    takes: EMBEDDED_TAKES,
                });
            }
        }
    }
    Ok(BrokerConfig::Embedded(config))
}

#[cfg(not(feature = "kafka"))]
fn embedded_from(_: &[(String, String)]) -> Result<BrokerConfig, BrokerUrlError> {
    Err(BrokerUrlError::NotBuilt {
        scheme: "embedded",
        feature: "kafka",
    })
}

#[cfg(feature = "kafka")]
fn kafka_from(
    servers: &str,
    parameters: &[(String, String)],
) -> Result<BrokerConfig, BrokerUrlError> {
    const SCHEME: &str = "kafka://";
    let servers = servers.trim_end_matches('/');
    if servers.is_empty() {
        return Err(BrokerUrlError::Missing {
            scheme: SCHEME,
            what: "at least one host:port",
            example: "kafka://127.0.0.1:9092",
        });
    }
    let mut config = KafkaConfig::new(servers);
    for (key, given) in parameters {
        match key.as_str() {
            "connect_timeout_ms" => config.connect_timeout_ms = value(SCHEME, key, given)?,
            "create_topics" => config.create_topics = value(SCHEME, key, given)?,
            "replication_factor" => config.replication_factor = value(SCHEME, key, given)?,
            property => {
                config
                    .properties
                    .insert(property.to_string(), given.to_string());
            }
        }
    }
    Ok(BrokerConfig::Kafka(config))
}

#[cfg(not(feature = "kafka"))]
fn kafka_from(_: &str, _: &[(String, String)]) -> Result<BrokerConfig, BrokerUrlError> {
    Err(BrokerUrlError::NotBuilt {
        scheme: "kafka://",
        feature: "kafka",
    })
}

#[cfg(feature = "pubsub")]
fn pubsub_from(
    project: &str,
    parameters: &[(String, String)],
) -> Result<BrokerConfig, BrokerUrlError> {
    const SCHEME: &str = "pubsub://";
    let project = project.trim_end_matches('/');
    if project.is_empty() {
        return Err(BrokerUrlError::Missing {
            scheme: SCHEME,
            what: "a project",
            example: "pubsub://my-project",
        });
    }
    let mut config = PubSubConfig::new(project);
    for (key, given) in parameters {
        let key = key.as_str();
        match key {
            "endpoint" => config.endpoint = Some(given.clone()),
            "anonymous" => config.anonymous = value(SCHEME, key, given)?,
            "create_resources" => config.create_resources = value(SCHEME, key, given)?,
            "ack_deadline_s" => config.ack_deadline_s = value(SCHEME, key, given)?,
            "streams" => config.streams = value(SCHEME, key, given)?,
            "max_outstanding_messages" => {
                config.max_outstanding_messages = value(SCHEME, key, given)?;
            }
            "max_outstanding_publishes" => {
                config.max_outstanding_publishes = value(SCHEME, key, given)?;
            }
            "batch_max_messages" => config.batch_max_messages = value(SCHEME, key, given)?,
            "batch_max_delay_ms" => config.batch_max_delay_ms = value(SCHEME, key, given)?,
            "connect_timeout_ms" => config.connect_timeout_ms = value(SCHEME, key, given)?,
            "dead_letter_topic" => config.dead_letter_topic = Some(given.clone()),
            "max_delivery_attempts" => config.max_delivery_attempts = value(SCHEME, key, given)?,
            _ => match key.strip_prefix("subscription.") {
                Some(topic) if !topic.is_empty() => {
                    config
                        .subscriptions
                        .insert(topic.to_string(), given.clone());
                }
                _ => {
                    return Err(BrokerUrlError::UnknownParameter {
                        scheme: SCHEME,
                        key: key.to_string(),
                        takes: PUBSUB_TAKES,
                    });
                }
            },
        }
    }
    Ok(BrokerConfig::Pubsub(config))
}

#[cfg(not(feature = "pubsub"))]
fn pubsub_from(_: &str, _: &[(String, String)]) -> Result<BrokerConfig, BrokerUrlError> {
    Err(BrokerUrlError::NotBuilt {
        scheme: "pubsub://",
        feature: "pubsub",
    })
}

/// A URL being written: a location, then `?key=value&…`, each escaped.
struct Url {
    text: String,
    parameters: usize,
}

impl Url {
    fn new(location: &str) -> Self {
        Self {
            text: location.to_string(),
            parameters: 0,
        }
    }

    fn push(&mut self, key: &str, value: &str) {
        self.text.push(if self.parameters == 0 { '?' } else { '&' });
        self.parameters += 1;
        self.text.extend(utf8_percent_encode(key, PARAMETER));
        self.text.push('=');
        self.text.extend(utf8_percent_encode(value, PARAMETER));
    }

    /// Pushes `key` when `value` is not the default's.
    fn push_changed<T: PartialEq + ToString>(&mut self, key: &str, value: &T, default: &T) {
        if value != default {
            self.push(key, &value.to_string());
        }
    }

    fn finish(self) -> String {
        self.text
    }
}

#[cfg(feature = "kafka")]
fn kafka_url(kafka: &KafkaConfig, redact: bool) -> String {
    let defaults = KafkaConfig::new("");
    let mut url = Url::new(&format!("kafka://{}", kafka.bootstrap_servers));
    url.push_changed(
        "connect_timeout_ms",
        &kafka.connect_timeout_ms,
        &defaults.connect_timeout_ms,
    );
    url.push_changed(
        "create_topics",
        &kafka.create_topics,
        &defaults.create_topics,
    );
    url.push_changed(
        "replication_factor",
        &kafka.replication_factor,
        &defaults.replication_factor,
    );
    for (key, value) in &kafka.properties {
        let secret = SECRET_WORDS.iter().any(|word| key.contains(word));
        url.push(key, if redact && secret { "***" } else { value });
    }
    url.finish()
}

#[cfg(feature = "pubsub")]
fn pubsub_url(pubsub: &PubSubConfig) -> String {
    let defaults = PubSubConfig::new("");
    let mut url = Url::new(&format!("pubsub://{}", pubsub.project));
    if let Some(endpoint) = &pubsub.endpoint {
        url.push("endpoint", endpoint);
    }
    url.push_changed("anonymous", &pubsub.anonymous, &defaults.anonymous);
    url.push_changed(
        "create_resources",
        &pubsub.create_resources,
        &defaults.create_resources,
    );
    url.push_changed(
        "ack_deadline_s",
        &pubsub.ack_deadline_s,
        &defaults.ack_deadline_s,
    );
    url.push_changed("streams", &pubsub.streams, &defaults.streams);
    url.push_changed(
        "max_outstanding_messages",
        &pubsub.max_outstanding_messages,
        &defaults.max_outstanding_messages,
    );
    url.push_changed(
        "max_outstanding_publishes",
        &pubsub.max_outstanding_publishes,
        &defaults.max_outstanding_publishes,
    );
    url.push_changed(
        "batch_max_messages",
        &pubsub.batch_max_messages,
        &defaults.batch_max_messages,
    );
    url.push_changed(
        "batch_max_delay_ms",
        &pubsub.batch_max_delay_ms,
        &defaults.batch_max_delay_ms,
    );
    url.push_changed(
        "connect_timeout_ms",
        &pubsub.connect_timeout_ms,
        &defaults.connect_timeout_ms,
    );
    if let Some(topic) = &pubsub.dead_letter_topic {
        url.push("dead_letter_topic", topic);
    }
    url.push_changed(
        "max_delivery_attempts",
        &pubsub.max_delivery_attempts,
        &defaults.max_delivery_attempts,
    );
    for (topic, subscription) in &pubsub.subscriptions {
        url.push(&format!("subscription.{topic}"), subscription);
    }
    url.finish()
}

#[cfg(all(test, feature = "kafka", feature = "pubsub"))]
mod tests {
    use super::*;

    #[test]
    fn urls_name_each_backend() {
        assert_eq!(
            BrokerConfig::from_url("embedded").unwrap(),
            BrokerConfig::default()
        );
        assert_eq!(
            BrokerConfig::from_url("kafka://h:1,g:2").unwrap(),
            BrokerConfig::Kafka(KafkaConfig::new("h:1,g:2"))
        );
        let BrokerConfig::Kafka(with_properties) =
            BrokerConfig::from_url("kafka://h:1?session.timeout.ms=3000&acks=all").unwrap()
        else {
            panic!("not kafka")
        };
        assert_eq!(with_properties.bootstrap_servers, "h:1");
        assert_eq!(with_properties.properties["session.timeout.ms"], "3000");
        assert_eq!(with_properties.properties["acks"], "all");
        let BrokerConfig::Pubsub(pubsub) =
            BrokerConfig::from_url("pubsub://p?endpoint=http://127.0.0.1:8085&anonymous=true")
                .unwrap()
        else {
            panic!("not pubsub")
        };
        assert_eq!(pubsub.endpoint.as_deref(), Some("http://127.0.0.1:8085"));
        assert!(pubsub.anonymous);
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let error = |url: &str| BrokerConfig::from_url(url).unwrap_err();
        assert!(matches!(error("kafka://"), BrokerUrlError::Missing { .. }));
        assert!(matches!(error("pubsub://"), BrokerUrlError::Missing { .. }));
        assert!(
            error("kafka://h:1?acks")
                .to_string()
                .contains("needs a value")
        );
        assert!(error("amqp://x").to_string().contains("kafka://"));
        assert!(matches!(
            error("kafka://h:1?create_topics=yes"),
            BrokerUrlError::BadValue { .. }
        ));
        let unknown = error("pubsub://p?colour=blue").to_string();
        assert!(
            unknown.contains("colour") && unknown.contains("ack_deadline_s"),
            "{unknown}"
        );
        assert!(matches!(
            error("embedded?port=1"),
            BrokerUrlError::UnknownParameter { .. }
        ));
    }

    #[test]
    fn to_url_is_the_inverse_of_from_url() {
        let mut kafka = KafkaConfig::for_embedded("127.0.0.1:9092,127.0.0.1:9093");
        kafka.connect_timeout_ms = 2_500;
        kafka.create_topics = false;
        kafka.replication_factor = 3;
        kafka
            .properties
            .insert("sasl.password".into(), "a&b=c d+e%f#g?h".into());
        let mut pubsub = PubSubConfig::new("my-project");
        pubsub.endpoint = Some("http://127.0.0.1:8085".into());
        pubsub.anonymous = true;
        pubsub.create_resources = false;
        pubsub.ack_deadline_s = 30;
        pubsub.streams = 2;
        pubsub.max_outstanding_messages = 50;
        pubsub.max_outstanding_publishes = 60;
        pubsub.batch_max_messages = 7;
        pubsub.batch_max_delay_ms = 9;
        pubsub.connect_timeout_ms = 1_000;
        pubsub.dead_letter_topic = Some("failed".into());
        pubsub.max_delivery_attempts = 10;
        pubsub
            .subscriptions
            .insert("requests".into(), "mine".into());
        let listening = BrokerConfig::Embedded(EmbeddedConfig {
            listen: Some("127.0.0.1:9092".parse().unwrap()),
        });
        for config in [
            BrokerConfig::default(),
            listening,
            BrokerConfig::Kafka(KafkaConfig::new("h:1")),
            BrokerConfig::Kafka(kafka),
            BrokerConfig::Pubsub(PubSubConfig::new("p")),
            BrokerConfig::Pubsub(pubsub),
        ] {
            let url = config.to_url();
            assert_eq!(BrokerConfig::from_url(&url).unwrap(), config, "{url}");
        }
        assert_eq!(BrokerConfig::default().to_url(), "embedded");
        assert_eq!(
            BrokerConfig::Pubsub(PubSubConfig::new("p")).to_url(),
            "pubsub://p"
        );
    }

    #[test]
    fn display_hides_secrets() {
        let mut kafka = KafkaConfig::new("h:1");
        kafka
            .properties
            .insert("sasl.password".into(), "hunter2".into());
        kafka.properties.insert("sasl.username".into(), "me".into());
        let shown = BrokerConfig::Kafka(kafka).to_string();
        assert_eq!(shown, "kafka://h:1?sasl.password=***&sasl.username=me");
    }
}
