//! Proves the results store: the real consumer component, run by the host on the embedded broker,
//! writes one row per prediction through `switchyard:host/results` into SQLite and into the local
//! PostgreSQL (127.0.0.1:5432, database `test`, or `SWITCHYARD_TEST_POSTGRES`), and a prediction
//! delivered twice is still one row. Read back, whole or a page at a time (no row skipped or
//! repeated at a page's edge), every row holds what the prediction held. A consumer without the
//! grant stores nothing and still handles its messages; a manifest granting a table the host does
//! not keep is refused (before anything is compiled) with the tables it keeps; a row that does not
//! fit its table writes nothing of its call; a database written by a newer switchyard, and a
//! PostgreSQL that is not there, are refused with the fix; a table an older switchyard made gets
//! the nullable columns added since, on both databases.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use pipeline_core::wire::{Prediction, Timings};
use switchyard_broker::BrokerConfig;
use switchyard_broker::OutgoingMessage;
use switchyard_pipeline::predictions::{PREDICTIONS, PredictionRecord};
use switchyard_runtime::RuntimeOptions;
use switchyard_runtime::SENT_BY_HEADER;
use switchyard_runtime::app::App;
use switchyard_runtime::manifest::{ComponentConfig, Manifest, TopicConfig};
use switchyard_runtime::results::{
    Column, ColumnType, Results, ResultsConfig, ResultsError, TableSchema, Tables, Value,
};

/// The local PostgreSQL the tests write into.
fn postgres_url() -> String {
    std::env::var("SWITCHYARD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn prediction(request_id: &str, class: usize, label: usize, sent_at_ms: f64) -> Prediction {
    let mut logits = [0.0f32; 10];
    logits[class] = 8.0;
    let mut prediction = Prediction::from_logits(
        request_id.into(),
        &logits,
        Some(label),
        Some(sent_at_ms),
        "lenet5-test".into(),
        Timings {
            decode_us: 7,
            inference_us: 120,
            batch: 3,
        },
    );
    prediction.engine = "wasi-nn".into();
    prediction
}

/// A host running the consumer alone on the embedded broker, storing into `results` when
/// `granted`.
async fn consumer_host(results: ResultsConfig, granted: bool) -> App {
    let consumer = ComponentConfig {
        subscribe: vec!["predictions".into()],
        group: Some(support::unique("consumer")),
        results: if granted {
            vec!["predictions".into()]
        } else {
            Vec::new()
        },
        args: vec!["--quiet".into()],
        ..ComponentConfig::new(support::component("consumer"))
    };
    let manifest = Manifest {
        broker: BrokerConfig::default(),
        topics: vec![TopicConfig {
            name: "predictions".into(),
            partitions: 2,
        }],
        components: BTreeMap::from([("consumer".to_string(), consumer)]),
        results: Some(results),
        metrics: None,
    };
    let options = RuntimeOptions {
        tables: switchyard_pipeline::predictions::tables(),
        ..RuntimeOptions::default()
    };
    App::start(&manifest, options)
        .await
        .expect("the consumer starts")
}

/// Sends `predictions` to the host's consumer, as the classifier build `sent_by`, and waits
/// until it settled all of them.
async fn deliver(app: &App, predictions: &[Prediction], sent_by: &str) {
    let consumer = app.handler("consumer").expect("the consumer runs");
    let mut settled = consumer.stats().settled();
    let before = *settled.borrow_and_update();
    for prediction in predictions {
        let receipt = app
            .runtime
            .publisher()
            .publish(OutgoingMessage {
                topic: "predictions".into(),
                key: Some(prediction.request_id.clone().into_bytes()),
                payload: serde_json::to_vec(prediction).unwrap(),
                headers: vec![(SENT_BY_HEADER.into(), sent_by.into())],
                content_type: Some("application/json".into()),
            })
            .await
            .expect("publishing a prediction");
        receipt.wait().await.expect("the broker stores it");
    }
    let wanted = before + predictions.len() as u64;
    tokio::time::timeout(support::hosts::WAIT, settled.wait_for(|n| *n >= wanted))
        .await
        .expect("the consumer settles every prediction in time")
        .expect("the consumer runs");
}

/// Runs the consumer on `store`, delivers a run's predictions with one of them twice, and
/// checks the rows read back from a second connection.
async fn predictions_are_stored_once_each(store: ResultsConfig) {
    let run = support::unique("run").replace('-', "_");
    let now = 1.7e12;
    let predictions: Vec<Prediction> = (0..20)
        .map(|i| {
            prediction(
                &format!("{run}-{i}"),
                i % 10,
                (i + i / 10) % 10,
                now + i as f64,
            )
        })
        .collect();
    let app = consumer_host(store.clone(), true).await;
    deliver(&app, &predictions, "classifier@sha256:0123456789ab").await;
    // The same prediction again, as a redelivery brings it.
    deliver(&app, &predictions[3..4], "classifier@sha256:0123456789ab").await;
    let counts = app.runtime.results().expect("a store").counts();
    assert_eq!(
        (counts.written, counts.already_there),
        (20, 1),
        "{counts:?}"
    );
    app.stop().await.expect("stopping");

    let results = Results::open(&store, &switchyard_pipeline::predictions::tables())
        .await
        .expect("opening the store again");
    let rows = switchyard_pipeline::predictions::read(&results, &run)
        .await
        .expect("reading the run");
    assert_eq!(rows.len(), 20, "one row per request: {rows:#?}");
    // In pages of 3, the same rows in the same order, each once: paging by key neither skips
    // nor repeats a row at a page's edge.
    let mut pages = switchyard_pipeline::predictions::pages(&results, &run).page_rows(3);
    let mut paged = Vec::new();
    let mut sizes = Vec::new();
    while let Some(page) = pages.next().await.expect("reading a page") {
        sizes.push(page.len());
        paged.extend(page);
    }
    assert_eq!(sizes, [3, 3, 3, 3, 3, 3, 2]);
    assert_eq!(paged, rows);
    assert!(
        rows.windows(2)
            .all(|pair| pair[0].prediction.request_id < pair[1].prediction.request_id),
        "in key order"
    );
    assert_eq!(
        switchyard_pipeline::predictions::count(&results, &run)
            .await
            .unwrap(),
        20
    );
    let by_request: BTreeMap<&str, &PredictionRecord> = rows
        .iter()
        .map(|row| (row.prediction.request_id.as_str(), row))
        .collect();
    for sent in &predictions {
        let row = by_request[sent.request_id.as_str()];
        assert_eq!(row.run_id, run);
        assert_eq!(
            &row.prediction, sent,
            "the row holds what the prediction held"
        );
        assert_eq!(
            row.component.as_deref(),
            Some("classifier@sha256:0123456789ab")
        );
        assert!(row.received_at_ms > now, "{row:?}");
    }
    let runs = switchyard_pipeline::predictions::runs(&results)
        .await
        .expect("listing runs");
    let listed = runs
        .iter()
        .find(|r| r.run_id == run)
        .expect("the run is listed");
    assert_eq!(listed.predictions, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_stores_each_prediction_once_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    predictions_are_stored_once_each(ResultsConfig::Sqlite {
        path: dir.path().join("results.sqlite3"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_stores_each_prediction_once_in_postgres() {
    predictions_are_stored_once_each(ResultsConfig::Postgres {
        url: postgres_url(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_without_the_grant_stores_nothing_and_handles_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let store = ResultsConfig::Sqlite {
        path: dir.path().join("results.sqlite3"),
    };
    let app = consumer_host(store.clone(), false).await;
    deliver(
        &app,
        &[prediction("ungranted-1", 2, 2, 1.0)],
        "classifier@x",
    )
    .await;
    let consumer = app.handler("consumer").unwrap();
    assert_eq!(consumer.stats().snapshot().handled, 1);
    app.stop().await.unwrap();
    let results = Results::open(&store, &switchyard_pipeline::predictions::tables())
        .await
        .unwrap();
    assert_eq!(
        switchyard_pipeline::predictions::count(&results, "ungranted")
            .await
            .unwrap(),
        0
    );
}

#[test]
fn a_manifest_granting_a_table_the_host_does_not_keep_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.wasm"), b"\0asm").unwrap();
    let text = r#"
        [results.postgres]
        url = "postgres://app:${RESULTS_TEST_PASSWORD:-pw}@db/results"

        [components.c]
        wasm = "c.wasm"
        subscribe = ["in"]
        results = ["predictions", "scores"]
    "#;
    // The store keeps the tables the embedding program declares: the `switchyard` binary
    // declares the demo's, and a host that declares none keeps none.
    let manifest = Manifest::parse(text, Path::new("m.toml"), dir.path()).unwrap();
    let check = |tables: &switchyard_runtime::results::Tables| {
        switchyard_runtime::check_before_compiling("c", &manifest.components["c"], tables)
            .unwrap_err()
            .to_string()
    };
    let error = check(&switchyard_pipeline::predictions::tables());
    assert!(error.contains("\"scores\""), "{error}");
    assert!(error.contains("it keeps \"predictions\""), "{error}");
    let error = check(&switchyard_runtime::results::Tables::default());
    assert!(error.contains("\"predictions\""), "{error}");
    assert!(error.contains("it keeps none"), "{error}");

    let granted = text.replace(", \"scores\"", "");
    let manifest = Manifest::parse(&granted, Path::new("m.toml"), dir.path()).unwrap();
    assert_eq!(
        manifest.results,
        Some(ResultsConfig::Postgres {
            url: "postgres://app:pw@db/results".into()
        })
    );
    assert_eq!(
        manifest.results.unwrap().describe(),
        "postgres://app:***@db/results"
    );
}

#[tokio::test]
async fn a_row_that_does_not_fit_writes_nothing_of_its_call() {
    let dir = tempfile::tempdir().unwrap();
    let results = Results::open(
        &ResultsConfig::Sqlite {
            path: dir.path().join("r.sqlite3"),
        },
        &switchyard_pipeline::predictions::tables(),
    )
    .await
    .unwrap();
    let good = PredictionRecord::row(&prediction("fit-1", 1, 1, 1.0), None, 2.0);
    let mut bad = PredictionRecord::row(&prediction("fit-2", 1, 1, 1.0), None, 2.0);
    bad.retain(|(name, _)| name != "model");
    let error = results
        .insert(&PREDICTIONS, vec![good.clone(), bad])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ResultsError::InvalidRow { problem, .. } if problem.contains("\"model\" needs a value")),
        "{error}"
    );
    assert_eq!(
        switchyard_pipeline::predictions::count(&results, "fit")
            .await
            .unwrap(),
        0
    );
    assert_eq!(results.insert(&PREDICTIONS, vec![good]).await.unwrap(), 1);
}

#[tokio::test]
async fn a_database_of_a_newer_switchyard_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.sqlite3");
    let config = ResultsConfig::Sqlite { path: path.clone() };
    drop(
        Results::open(&config, &switchyard_pipeline::predictions::tables())
            .await
            .unwrap(),
    );
    // Opening again migrates nothing and keeps what is there.
    drop(
        Results::open(&config, &switchyard_pipeline::predictions::tables())
            .await
            .unwrap(),
    );
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection
        .execute("UPDATE switchyard_schema SET version = 99", [])
        .unwrap();
    drop(connection);
    let error = Results::open(&config, &switchyard_pipeline::predictions::tables())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("schema version 99") && error.contains("upgrade switchyard"),
        "{error}"
    );
}

/// A store whose `predictions` table an older switchyard made, without the per-hop columns
/// (`handled_at_ms`, `predicted_at_ms`), opens with them added: its old rows read NULL there,
/// new rows fill them. A column a newer program declares NOT NULL cannot be added to rows that
/// have none, so that store is refused, naming the column. The table has a name of its own, so
/// runs against the shared PostgreSQL never meet an earlier run's.
async fn an_older_table_gets_the_newer_nullable_columns(store: ResultsConfig) {
    let name: &'static str = Box::leak(
        support::unique("predictions_v1")
            .replace('-', "_")
            .into_boxed_str(),
    );
    let schema = |columns: Vec<Column>| -> &'static TableSchema {
        Box::leak(Box::new(TableSchema {
            name,
            columns: Box::leak(columns.into_boxed_slice()),
            key_columns: PREDICTIONS.key_columns,
        }))
    };
    let current = schema(PREDICTIONS.columns.to_vec());
    let added = ["handled_at_ms", "predicted_at_ms"];
    let older = schema(
        current
            .columns
            .iter()
            .filter(|column| !added.contains(&column.name))
            .copied()
            .collect(),
    );
    let mut row = PredictionRecord::row(&prediction("older-1", 1, 1, 1.0), None, 2.0);
    row.retain(|(column, _)| !added.contains(&column.as_str()));
    let results = Results::open(&store, &Tables::new([older])).await.unwrap();
    assert_eq!(results.insert(older, vec![row]).await.unwrap(), 1);
    drop(results);

    let results = Results::open(&store, &Tables::new([current]))
        .await
        .unwrap();
    let newer = Prediction {
        handled_at_ms: Some(1.5),
        predicted_at_ms: Some(1.75),
        ..prediction("older-2", 1, 1, 1.0)
    };
    let row = PredictionRecord::row(&newer, None, 2.0);
    assert_eq!(results.insert(current, vec![row]).await.unwrap(), 1);
    let rows = results.select(current, "older").all().await.unwrap();
    let column = |name: &str| current.columns.iter().position(|c| c.name == name).unwrap();
    let hops: Vec<_> = rows
        .iter()
        .map(|row| {
            (
                row[column("handled_at_ms")].clone(),
                row[column("predicted_at_ms")].clone(),
            )
        })
        .collect();
    assert_eq!(
        hops,
        [
            (Value::Null, Value::Null),
            (Value::Real(1.5), Value::Real(1.75))
        ]
    );
    drop(results);

    let mut stricter = current.columns.to_vec();
    stricter.push(Column::new("required_later", ColumnType::Integer, false));
    let Err(error) = Results::open(&store, &Tables::new([schema(stricter)])).await else {
        panic!("a NOT NULL column cannot be added to old rows");
    };
    assert!(
        matches!(
            &error,
            ResultsError::MissingColumn {
                column: "required_later",
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("use another database"),
        "{error}"
    );
}

#[tokio::test]
async fn an_older_sqlite_table_gets_the_newer_nullable_columns() {
    let dir = tempfile::tempdir().unwrap();
    an_older_table_gets_the_newer_nullable_columns(ResultsConfig::Sqlite {
        path: dir.path().join("older.sqlite3"),
    })
    .await;
}

#[tokio::test]
async fn an_older_postgres_table_gets_the_newer_nullable_columns() {
    an_older_table_gets_the_newer_nullable_columns(ResultsConfig::Postgres {
        url: postgres_url(),
    })
    .await;
}

#[tokio::test]
async fn a_postgres_that_is_not_there_is_named_with_the_fix() {
    // Port 1 is below the range the system hands out, so nothing any test starts listens
    // there: the connection is refused.
    let config = ResultsConfig::Postgres {
        url: "postgres://postgres:secret@127.0.0.1:1/test".to_string(),
    };
    let error = tokio::time::timeout(
        Duration::from_secs(30),
        Results::open(&config, &switchyard_pipeline::predictions::tables()),
    )
    .await
    .expect("a refused connection fails at once")
    .unwrap_err();
    let text = format!("{:#}", anyhow::Error::from(error));
    assert!(text.contains("is PostgreSQL running"), "{text}");
    assert_eq!(
        text.matches("Connection refused").count(),
        1,
        "the cause, once: {text}"
    );
    assert!(!text.contains("secret"), "the password stays out: {text}");
}
