//! Proves the Kafka backend is built for production connections: librdkafka here has TLS and
//! SASL (PLAIN, SCRAM, OAUTHBEARER), so `security.protocol=SSL` and `SASL_SSL` with SCRAM, as
//! managed Kafka services require, are accepted as settings (a build without them refuses
//! them as invalid configuration before connecting). Against a plain listener (the embedded
//! broker on TCP) the TLS handshake then fails, and `connect` says so with the reason
//! librdkafka gave and the fix, instead of a bare "transport failure".

use switchyard_broker::ErrorKind;
use switchyard_broker::kafka::{EmbeddedKafka, Kafka, KafkaConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_sasl_settings_are_accepted_and_a_tls_handshake_with_a_plain_listener_fails_clearly()
 {
    let plain = EmbeddedKafka::start(Some("127.0.0.1:0".parse().unwrap()))
        .await
        .expect("embedded broker");
    let scram = [
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", "switchyard"),
        ("sasl.password", "secret"),
    ];
    for (protocol, extra) in [("SSL", &[][..]), ("SASL_SSL", &scram[..])] {
        let mut config = KafkaConfig::new(plain.bootstrap_servers());
        config.connect_timeout_ms = 5_000;
        config
            .properties
            .insert("security.protocol".into(), protocol.into());
        for (key, value) in extra {
            config.properties.insert(key.to_string(), value.to_string());
        }
        let error = Kafka::connect(config)
            .await
            .expect_err("a TLS client cannot talk to a plain listener");
        let message = format!("{error:#}");
        eprintln!("{protocol}: {message}");
        // Accepted as settings (a build without TLS refuses them before connecting, without a
        // broker's code), then refused by the handshake: wrong settings for this listener,
        // which trying again will not mend.
        assert_eq!(error.kind(), ErrorKind::Config, "{protocol}: {message}");
        assert!(error.code().is_some(), "{protocol}: {error:?}");
        assert!(
            message.contains("The TLS connection failed")
                && message.contains("security.protocol=SSL or SASL_SSL needs a TLS listener"),
            "{protocol}: {message}"
        );
        assert!(
            !message.contains("secret"),
            "{protocol}: the error never shows the password: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sasl_mechanism_this_build_lacks_is_refused_as_a_setting() {
    // GSSAPI (Kerberos) needs Cyrus SASL, which this build leaves out.
    let mut config = KafkaConfig::new("127.0.0.1:9");
    config
        .properties
        .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
    config
        .properties
        .insert("sasl.mechanisms".into(), "GSSAPI".into());
    let error = Kafka::connect(config).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config, "{error:#}");
    assert!(format!("{error:#}").contains("GSSAPI"), "{error:#}");
    assert!(
        error.to_string().contains("CONFIGURATION.md"),
        "the fix: {error}"
    );
}
