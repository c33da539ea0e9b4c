//! The manifest: which broker, which components, and what each component may do.
//!
//! A TOML file, read with serde and `deny_unknown_fields` so a misspelt key is an error that
//! names the key and the line rather than a setting silently ignored. Paths are relative to
//! the manifest's directory and may use `${VAR}` / `${VAR:-default}`. The README documents
//! every key; `components/pipeline.toml` is a complete manifest.
//!
//! ```toml
//! [broker.kafka]                     # or [broker.pubsub], [broker.embedded] (the default)
//! bootstrap_servers = "127.0.0.1:9092"
//! properties = { "compression.type" = "zstd" }
//!
//! [[topics]]
//! name = "requests"
//! partitions = 8
//!
//! [components.classifier]
//! wasm = "${SWITCHYARD_COMPONENTS:-../target/components/wasm32-wasip2/component}/classifier.wasm"
//! subscribe = ["requests"]           # a handler; without `subscribe`, a command run once
//! publish = ["predictions"]
//! workers = 2
//! batch = 32                         # requests already waiting go to one call
//! args = ["--model", "/models/lenet.onnx", "--predictions-topic", "predictions"]
//! nn = "auto"                        # run the model on the host through wasi:nn
//! preopens = [{ host = "../models", guest = "/models" }]
//! limits = { max_memory_mb = 256, max_call_ms = 10000, max_sends_per_call = 10 }
//! ```

mod component;
mod env;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::results::ResultsConfig;
pub use component::{
    ComponentConfig, DEAD_LETTER_SUFFIX, DeadLetter, DeliveryGuarantee, Limits, MAX_BATCH,
    MAX_BATCH_WAIT_MS, Preopen, RetryPolicy,
};
pub use env::{ExpandError, expand_env};
use switchyard_broker::{BrokerConfig, check_topic_name};

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the manifest {path}: {error}")]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// What the OS said (in the message, so not also a `source`, which `{:#}` would
        /// print twice).
        error: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or mistyped key.
    #[error("manifest {path}: {message}")]
    Parse {
        /// The manifest path.
        path: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// The manifest parses but asks for something impossible.
    #[error("manifest {path}: component {component:?}: {message}")]
    Invalid {
        /// The manifest path.
        path: PathBuf,
        /// The component concerned (or `-` for the manifest as a whole).
        component: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// A parsed, validated manifest with every path resolved.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The broker; the embedded one when absent.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Topics to create at start-up (where the broker allows it).
    #[serde(default)]
    pub topics: Vec<TopicConfig>,
    /// The components, by name.
    #[serde(default)]
    pub components: BTreeMap<String, ComponentConfig>,
    /// Where components' results go: `[results.sqlite] path = "..."` or
    /// `[results.postgres] url = "..."`. Absent: the default SQLite file
    /// ([`ResultsConfig::default_store`]) when a component is granted `results`.
    #[serde(default)]
    pub results: Option<ResultsConfig>,
    /// Where to serve Prometheus metrics: `[metrics] listen = "127.0.0.1:9464"`. Absent: no
    /// endpoint (`--metrics ADDR` opens one).
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]`: the host's Prometheus endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `IP:PORT` to serve `GET /metrics` on; port 0 takes a free one (the log says which).
    pub listen: std::net::SocketAddr,
}

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Topic name.
    pub name: String,
    /// Partitions (default 8: the embedded broker keeps only ~5 MiB per partition).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
}

fn default_partitions() -> i32 {
    8
}

impl Manifest {
    /// Reads, parses and validates a manifest file; relative paths become relative to it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Parses and validates manifest text; `name` is used in errors, `base` resolves paths.
    pub fn parse(text: &str, name: &Path, base: &Path) -> Result<Self, ConfigError> {
        let mut manifest: Manifest = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        for (component_name, component) in &mut manifest.components {
            let resolve = |path: &Path| {
                expand_env(&path.to_string_lossy())
                    .map(|p| base.join(p))
                    .map_err(|error| ConfigError::Invalid {
                        path: name.to_path_buf(),
                        component: component_name.clone(),
                        message: error.to_string(),
                    })
            };
            component.wasm = resolve(&component.wasm)?;
            for preopen in &mut component.preopens {
                preopen.host = resolve(&preopen.host)?;
            }
        }
        manifest.results = match manifest.results.take() {
            Some(ResultsConfig::Postgres { url }) => Some(ResultsConfig::Postgres {
                url: expand_env(&url).map_err(|error| ConfigError::Invalid {
                    path: name.to_path_buf(),
                    component: "-".into(),
                    message: format!("[results.postgres] url: {error}"),
                })?,
            }),
            Some(ResultsConfig::Sqlite { path }) => Some(
                ResultsConfig::Sqlite {
                    path: expand_env(&path.to_string_lossy())
                        .map(PathBuf::from)
                        .map_err(|error| ConfigError::Invalid {
                            path: name.to_path_buf(),
                            component: "-".into(),
                            message: format!("[results.sqlite] path: {error}"),
                        })?,
                }
                .resolved(base),
            ),
            None => None,
        };
        // Credentials stay out of the file: `"sasl.password" = "${KAFKA_PASSWORD}"`.
        if let BrokerConfig::Kafka(kafka) = &mut manifest.broker {
            for (key, value) in &mut kafka.properties {
                *value = expand_env(value).map_err(|error| ConfigError::Invalid {
                    path: name.to_path_buf(),
                    component: "-".into(),
                    message: format!("[broker.kafka] property {key:?}: {error}"),
                })?;
            }
        }
        manifest.validate(name)?;
        Ok(manifest)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |component: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            component: component.to_string(),
            message,
        };
        if self.components.is_empty() {
            return Err(invalid(
                "-",
                "no components: add a [components.NAME] section with at least `wasm = \"...\"`"
                    .into(),
            ));
        }
        for topic in &self.topics {
            check_topic_name(&topic.name).map_err(|e| invalid("-", e.to_string()))?;
            if topic.partitions < 1 {
                return Err(invalid(
                    "-",
                    format!("topic {:?} needs at least 1 partition", topic.name),
                ));
            }
        }
        for (name, component) in &self.components {
            if !component.wasm.is_file() {
                return Err(invalid(
                    name,
                    format!(
                        "no file at {}: build the component (`switchyard build`, or `just components`) or fix `wasm`",
                        component.wasm.display()
                    ),
                ));
            }
            for topic in component.subscribe.iter().chain(&component.publish) {
                check_topic_name(topic).map_err(|e| invalid(name, e.to_string()))?;
            }
            for topic in component.dead_letter_topics() {
                check_topic_name(&topic).map_err(|m| {
                    invalid(
                        name,
                        format!("dead-letter topic: {m}; name one with `dead_letter = \"...\"`"),
                    )
                })?;
                if component.subscribe.contains(&topic) {
                    return Err(invalid(
                        name,
                        format!(
                            "`dead_letter` is {topic:?}, a topic it subscribes to: its failed \
                             messages would come back to it forever; name another topic"
                        ),
                    ));
                }
            }
            if component.workers == 0 {
                return Err(invalid(name, "`workers` must be at least 1".into()));
            }
            if !(1..=MAX_BATCH).contains(&component.batch) {
                return Err(invalid(
                    name,
                    format!("`batch` must be between 1 and {MAX_BATCH} (1: one message per call)"),
                ));
            }
            if component.batch_max_wait_ms > MAX_BATCH_WAIT_MS {
                return Err(invalid(
                    name,
                    format!(
                        "`batch_max_wait_ms` is {}, past the most a batch may wait to fill \
                         ({MAX_BATCH_WAIT_MS}); 0 never waits",
                        component.batch_max_wait_ms
                    ),
                ));
            }
            if component.delivery == DeliveryGuarantee::ExactlyOnce && !component.is_handler() {
                return Err(invalid(
                    name,
                    "`delivery = \"exactly-once\"` is for handlers (it commits what a call sent \
                     with the message it handled); a command has no message: remove it"
                        .into(),
                ));
            }
            if component.retry.max_attempts == 0 {
                return Err(invalid(
                    name,
                    "`retry.max_attempts` must be at least 1".into(),
                ));
            }
            if component.limits.max_memory_mb == 0 || component.limits.max_memory_mb > 4096 {
                return Err(invalid(
                    name,
                    "`limits.max_memory_mb` must be between 1 and 4096 (32-bit Wasm)".into(),
                ));
            }
            let limits = &component.limits;
            for (key, value) in [
                ("max_message_bytes", limits.max_message_bytes),
                ("max_held_mb", limits.max_held_mb),
                ("max_sends_per_call", u64::from(limits.max_sends_per_call)),
                ("max_resources", u64::from(limits.max_resources)),
            ] {
                if value == 0 {
                    return Err(invalid(name, format!("`limits.{key}` must be at least 1")));
                }
            }
            if limits.max_held_mb > 16 << 10 {
                return Err(invalid(
                    name,
                    "`limits.max_held_mb` must be at most 16384 (16 GiB)".into(),
                ));
            }
            for preopen in &component.preopens {
                if !preopen.host.is_dir() {
                    return Err(invalid(
                        name,
                        format!(
                            "preopen {} is not a directory: create it or fix `host`",
                            preopen.host.display()
                        ),
                    ));
                }
                if !preopen.guest.starts_with('/') {
                    return Err(invalid(
                        name,
                        format!(
                            "preopen guest path {:?} must be absolute, like \"/data\"",
                            preopen.guest
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_broker::StartPosition;

    fn parse(text: &str) -> Result<Manifest, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.wasm"), b"\0asm").unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        Manifest::parse(text, Path::new("test.toml"), dir.path())
    }

    const MINIMAL: &str = "[components.c]\nwasm = \"c.wasm\"\n";

    #[test]
    fn minimal_manifest_uses_defaults() {
        let m = parse(MINIMAL).unwrap();
        assert_eq!(m.broker, BrokerConfig::default());
        let c = &m.components["c"];
        assert!(!c.is_handler());
        assert_eq!(c.workers, 1);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.start, StartPosition::Earliest);
    }

    #[test]
    fn full_manifest_parses() {
        let m = parse(
            r#"
            [broker.kafka]
            bootstrap_servers = "k1:9092,k2:9092"
            properties = { "compression.type" = "lz4" }

            [[topics]]
            name = "requests"
            partitions = 4

            [components.c]
            wasm = "c.wasm"
            subscribe = ["requests"]
            group = "g"
            start = "latest"
            publish = ["predictions"]
            workers = 3
            args = ["--quiet"]
            preopens = [{ host = "data", guest = "/data" }]
            limits = { max_memory_mb = 64, max_call_ms = 500 }
            retry = { max_attempts = 5, backoff_ms = 10 }
            "#,
        )
        .unwrap();
        let BrokerConfig::Kafka(kafka) = &m.broker else {
            panic!("not kafka")
        };
        assert_eq!(kafka.bootstrap_servers, "k1:9092,k2:9092");
        assert_eq!(kafka.properties["compression.type"], "lz4");
        let c = &m.components["c"];
        assert!(c.is_handler());
        assert_eq!(c.start, StartPosition::Latest);
        assert_eq!(c.limits.max_memory_mb, 64);
        assert_eq!(c.retry.max_attempts, 5);
        assert!(c.preopens[0].host.ends_with("data"));
    }

    #[test]
    fn dead_letters_default_beside_each_topic_and_can_be_named_or_turned_off() {
        let handler = |extra: &str| {
            format!("[components.c]\nwasm = \"c.wasm\"\nsubscribe = [\"a\", \"b\"]\n{extra}\n")
        };
        let m = parse(&handler("")).unwrap();
        assert_eq!(m.components["c"].dead_letter, DeadLetter::Beside);
        assert_eq!(m.components["c"].dead_letter_topics(), ["a.dlq", "b.dlq"]);
        let m = parse(&handler("dead_letter = true")).unwrap();
        assert_eq!(
            m.components["c"].dead_letter_topic("a").as_deref(),
            Some("a.dlq")
        );
        let m = parse(&handler("dead_letter = \"failed\"")).unwrap();
        assert_eq!(m.components["c"].dead_letter_topics(), ["failed"]);
        let m = parse(&handler("dead_letter = false")).unwrap();
        assert_eq!(m.components["c"].dead_letter_topic("a"), None);
        assert!(m.components["c"].dead_letter_topics().is_empty());

        let err = parse(&handler("dead_letter = 3")).unwrap_err().to_string();
        assert!(err.contains("true, false or a topic name"), "{err}");
        let err = parse(&handler("dead_letter = \"bad name\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dead-letter topic"), "{err}");
        let err = parse(&handler("dead_letter = \"a\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("subscribes to"), "{err}");
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let err = parse("[components.c]\nwasm = \"c.wasm\"\nworkerz = 2\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("workerz"), "{text}");
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let err = parse("[components.c\nwasm = 1\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn wrong_type_is_reported() {
        let err = parse("[components.c]\nwasm = \"c.wasm\"\nworkers = \"two\"\n").unwrap_err();
        assert!(err.to_string().contains("workers"), "{err}");
    }

    #[test]
    fn missing_wasm_says_how_to_build_it() {
        let err = parse("[components.c]\nwasm = \"nope.wasm\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("nope.wasm") && text.contains("just components"),
            "{text}"
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        for (snippet, expected) in [
            ("workers = 0", "workers"),
            ("batch = 0", "batch"),
            ("batch = 5000", "batch"),
            (
                "subscribe = [\"bad topic\"]",
                "not a valid Kafka topic name",
            ),
            ("publish = [\"\"]", "not a valid Kafka topic name"),
            (
                "preopens = [{ host = \"missing\", guest = \"/d\" }]",
                "not a directory",
            ),
            (
                "preopens = [{ host = \"data\", guest = \"d\" }]",
                "must be absolute",
            ),
            ("limits = { max_memory_mb = 0 }", "max_memory_mb"),
            ("retry = { max_attempts = 0 }", "max_attempts"),
            ("delivery = \"exactly-once\"", "for handlers"),
            ("delivery = \"exactly_once\"", "at-least-once"),
        ] {
            let text = format!("{MINIMAL}{snippet}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{snippet}: {err}");
        }
        assert!(parse("").unwrap_err().to_string().contains("no components"));
    }

    #[test]
    fn a_handler_may_ask_for_exactly_once() {
        let m = parse(&format!("{MINIMAL}subscribe = [\"in\"]\n")).unwrap();
        assert_eq!(m.components["c"].delivery, DeliveryGuarantee::AtLeastOnce);
        let m = parse(&format!(
            "{MINIMAL}subscribe = [\"in\"]\ndelivery = \"exactly-once\"\n"
        ))
        .unwrap();
        assert_eq!(m.components["c"].delivery, DeliveryGuarantee::ExactlyOnce);
    }

    #[test]
    fn paths_expand_environment_variables() {
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("SWITCHYARD_TEST_DIR", "/opt/c") };
        assert_eq!(
            expand_env("${SWITCHYARD_TEST_DIR}/x.wasm").unwrap(),
            "/opt/c/x.wasm"
        );
        assert_eq!(
            expand_env("${SWITCHYARD_UNSET_VAR:-a/b}/x").unwrap(),
            "a/b/x"
        );
        assert_eq!(expand_env("plain").unwrap(), "plain");
        assert!(matches!(
            expand_env("${SWITCHYARD_UNSET_VAR}"),
            Err(ExpandError::Unset { name, .. }) if name == "SWITCHYARD_UNSET_VAR"
        ));
        assert!(
            expand_env("${OPEN")
                .unwrap_err()
                .to_string()
                .contains("unclosed")
        );
        let err = parse("[components.c]\nwasm = \"${SWITCHYARD_UNSET_VAR}/c.wasm\"\n").unwrap_err();
        assert!(err.to_string().contains("SWITCHYARD_UNSET_VAR"), "{err}");
        assert!(parse("[components.c]\nwasm = \"${SWITCHYARD_UNSET_VAR:-.}/c.wasm\"\n").is_ok());
    }

    #[test]
    fn kafka_properties_take_secrets_from_the_environment() {
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("SWITCHYARD_TEST_PASSWORD", "hunter2") };
        let kafka = |properties: &str| {
            parse(&format!(
                "[broker.kafka]\nbootstrap_servers = \"h:9092\"\nproperties = {{ {properties} }}\n{MINIMAL}"
            ))
        };
        let manifest = kafka(
            "\"sasl.password\" = \"${SWITCHYARD_TEST_PASSWORD}\", \"sasl.username\" = \"${SWITCHYARD_UNSET_VAR:-me}\"",
        )
        .unwrap();
        let BrokerConfig::Kafka(config) = manifest.broker else {
            panic!("a Kafka broker");
        };
        assert_eq!(config.properties["sasl.password"], "hunter2");
        assert_eq!(config.properties["sasl.username"], "me");
        let err = kafka("\"sasl.password\" = \"${SWITCHYARD_UNSET_VAR}\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sasl.password") && err.contains("SWITCHYARD_UNSET_VAR"),
            "{err}"
        );
    }
}
