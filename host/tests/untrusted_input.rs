//! Property tests (proptest) of what the host parses from outside: manifests (arbitrary text,
//! and TOML shaped like a manifest with wrong types, unknown keys and odd values), broker URLs (and that a parsed URL written back reads as the same configuration),
//! and the dead-letter headers written from and read back into any message. Parsing never
//! panics: it returns a value or an error that says what is wrong. A dead letter keeps its
//! original's payload, key, headers and content type exactly (replay gives the original
//! back), and no header value it adds passes Pub/Sub's 1,024-byte limit, whatever the error
//! text's characters. proptest keeps any failure it finds in `proptest-regressions/` and tries
//! it first on every later run.

use std::path::Path;

use proptest::prelude::*;
use switchyard_broker::BrokerConfig;
use switchyard_broker::IncomingMessage;
use switchyard_broker::dead_letter::{self as dlq, Reason};
use switchyard_runtime::manifest::Manifest;

/// TOML text shaped like a manifest: known sections and keys (and some unknown ones), with
/// values of every type, in any order.
fn manifest_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("wasm"),
        Just("subscribe"),
        Just("publish"),
        Just("group"),
        Just("workers"),
        Just("batch"),
        Just("args"),
        Just("preopens"),
        Just("limits"),
        Just("retry"),
        Just("dead_letter"),
        Just("nn"),
        Just("start"),
        Just("unknown_key"),
    ];
    let value = prop_oneof![
        Just("\"c.wasm\"".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[ -~]{0,12}\"",
        Just("[\"requests\", \"\"]".to_string()),
        Just("[{ host = \".\", guest = \"/d\" }]".to_string()),
        Just("{ max_memory_mb = 0, max_call_ms = -1 }".to_string()),
        Just("{ max_attempts = 4294967296, backoff_ms = 1 }".to_string()),
        Just("{}".to_string()),
        Just("[]".to_string()),
    ];
    let section = prop_oneof![
        Just("[components.c]".to_string()),
        Just("[components.\"\"]".to_string()),
        Just("[broker.kafka]".to_string()),
        Just("[broker.pubsub]".to_string()),
        Just("[broker.embedded]".to_string()),
        Just("[[topics]]".to_string()),
        "\\[[a-z.]{1,12}\\]",
    ];
    prop::collection::vec((section, prop::collection::vec((key, value), 0..6)), 0..4).prop_map(
        |sections| {
            let mut text = String::new();
            for (header, entries) in sections {
                text.push_str(&header);
                text.push('\n');
                for (key, value) in entries {
                    text.push_str(&format!("{key} = {value}\n"));
                }
            }
            text
        },
    )
}

fn message() -> impl Strategy<Value = IncomingMessage> {
    (
        "[a-zA-Z0-9._-]{1,40}",
        any::<String>(),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(("[a-z][a-z0-9-]{0,15}", any::<String>()), 0..5),
        prop::option::of(any::<String>()),
    )
        .prop_map(
            |(topic, position, key, payload, headers, content_type)| IncomingMessage {
                topic,
                position,
                partition_offset: None,
                key,
                payload,
                headers: headers
                    .into_iter()
                    .filter(|(name, _)| !name.starts_with(dlq::HEADER_PREFIX))
                    .collect(),
                content_type,
                delivery_attempt: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_text_never_crashes_the_manifest_parser(text in any::<String>()) {
        let _ = Manifest::parse(&text, Path::new("fuzz.toml"), Path::new("."));
    }

    #[test]
    fn manifest_shaped_toml_parses_or_says_what_is_wrong(text in manifest_like()) {
        if let Err(error) = Manifest::parse(&text, Path::new("fuzz.toml"), Path::new(".")) {
            let message = error.to_string();
            prop_assert!(message.contains("fuzz.toml"), "{message}");
        }
    }

    #[test]
    fn arbitrary_broker_urls_parse_or_say_what_is_wrong(
        url in prop_oneof![
            any::<String>(),
            "(kafka|pubsub)://[ -~]{0,40}",
            "kafka://[a-z0-9.:,]{0,20}\\?([a-z.]{1,10}(=[ -~&&[^&]]{0,5})?&?){0,4}",
            "pubsub://[a-z0-9-]{0,12}\\?([a-z_]{1,16}=[ -~&&[^&]]{0,8}&?){0,3}",
        ]
    ) {
        match BrokerConfig::from_url(&url) {
            Err(error) => prop_assert!(!error.to_string().is_empty()),
            // What parses is written back as a URL that reads as the same configuration.
            Ok(config) => prop_assert_eq!(BrokerConfig::from_url(&config.to_url()), Ok(config)),
        }
    }

    #[test]
    fn a_dead_letter_keeps_its_original_and_replays_to_it(
        original in message(),
        error in any::<String>(),
        long in 0usize..3000,
        attempts in any::<u32>(),
    ) {
        let error = error.repeat(1 + long / (error.len() + 1));
        let reason = Reason {
            error: &error,
            component: "classifier",
            version: "sha256:0123456789ab",
            group: "group",
            attempts,
        };
        let letter = dlq::dead_letter(&original, "work.dlq", &reason);
        prop_assert_eq!(&letter.topic, "work.dlq");
        prop_assert_eq!(&letter.payload, &original.payload);
        prop_assert_eq!(&letter.key, &original.key);
        prop_assert_eq!(&letter.content_type, &original.content_type);
        for (name, value) in &letter.headers {
            if name.starts_with(dlq::HEADER_PREFIX) {
                prop_assert!(value.len() <= 1024, "{name}: {} bytes", value.len());
            }
        }
        let received = IncomingMessage {
            topic: letter.topic.clone(),
            position: "0@0".into(),
            partition_offset: None,
            key: letter.key.clone(),
            payload: letter.payload.clone(),
            headers: letter.headers.clone(),
            content_type: letter.content_type.clone(),
            delivery_attempt: None,
        };
        let replayed = dlq::replay(&received, None).unwrap();
        prop_assert_eq!(replayed.topic, original.topic);
        prop_assert_eq!(replayed.payload, original.payload);
        prop_assert_eq!(replayed.key, original.key);
        prop_assert_eq!(replayed.headers, original.headers);
        prop_assert_eq!(replayed.content_type, original.content_type);
    }
}
