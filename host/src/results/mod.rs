//! The results store: tables the host keeps in SQLite or PostgreSQL, which components write
//! through `switchyard:host/results` and `switchyard report` reads.
//!
//! Why the host owns the schema instead of handing components SQL: one component then runs
//! unchanged on either database, a component can write only the tables its manifest grants and
//! never read or drop anything, and every table is keyed, so an insert of a row whose key is
//! already there changes nothing. That makes a handler's write idempotent, which at-least-once
//! delivery needs: a redelivered prediction never becomes a second row.
//!
//! What both backends share lives here, written once: the tables ([`PREDICTIONS`]), checking a
//! row against its table ([`TableSchema::row`]), the SQL both dialects take, the migrations and
//! the counts of rows written. [`sqlite`] and [`postgres`] only run statements.
//!
//! # Schema
//!
//! `switchyard_schema(version)` holds the schema version; the host migrates an older database
//! forward when it opens it and refuses a newer one. Version 1 has one table:
//!
//! `predictions`, keyed by `(run_id, request_id)`: one row per prediction. Its columns are in
//! [`PREDICTIONS`]; times are Unix milliseconds (fractional), `scores` a JSON array of the ten
//! class probabilities (`JSONB` in PostgreSQL, `TEXT` in SQLite).

pub mod postgres;
pub mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use pipeline_core::row::Cell;
use pipeline_core::wire::{Prediction, Timings};
use serde::Deserialize;

/// A column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// A 64-bit integer.
    Integer,
    /// A 64-bit float.
    Real,
    /// Text.
    Text,
    /// A JSON document, written as text (`JSONB` in PostgreSQL).
    Json,
}

/// One column of a table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub ty: ColumnType,
    /// Whether a row may leave it out.
    pub nullable: bool,
}

const fn column(name: &'static str, ty: ColumnType, nullable: bool) -> Column {
    Column { name, ty, nullable }
}

/// A table the host keeps.
#[derive(Debug)]
pub struct TableSchema {
    /// Its name, as the manifest grants it and the component opens it.
    pub name: &'static str,
    /// Its columns, key columns first.
    pub columns: &'static [Column],
    /// How many of the first columns make the key.
    pub key_columns: usize,
}

/// One row per prediction, keyed by run and request.
pub const PREDICTIONS: TableSchema = TableSchema {
    name: "predictions",
    columns: &[
        // The producer run the request belongs to (the part of its id before the last `-`).
        column("run_id", ColumnType::Text, false),
        column("request_id", ColumnType::Text, false),
        column("predicted_class", ColumnType::Integer, false),
        column("class_name", ColumnType::Text, false),
        // The request's ground truth, when it had one.
        column("label", ColumnType::Integer, true),
        // Probability of each class, by class index.
        column("scores", ColumnType::Json, false),
        // The model's name and the first bytes of its SHA-256.
        column("model", ColumnType::Text, false),
        // The component build that predicted it, `classifier@sha256:…`.
        column("component", ColumnType::Text, true),
        // `wasm` (inside the classifier) or `wasi-nn` (on the host).
        column("engine", ColumnType::Text, true),
        // How many requests shared the model run.
        column("batch", ColumnType::Integer, true),
        column("decode_us", ColumnType::Integer, true),
        column("inference_us", ColumnType::Integer, true),
        column("sent_at_ms", ColumnType::Real, true),
        column("received_at_ms", ColumnType::Real, false),
    ],
    key_columns: 2,
};

/// Every table the host keeps.
pub const TABLES: &[&TableSchema] = &[&PREDICTIONS];

/// Rows per insert statement: 500 × 14 parameters stays well inside both databases' limits
/// (SQLite's 32,766 variables, PostgreSQL's 65,535 parameters).
const ROWS_PER_STATEMENT: usize = 500;

/// The schema version this host writes; see the module docs.
pub const SCHEMA_VERSION: i64 = 1;

/// The table named `name`, if the host keeps one.
pub fn table(name: &str) -> Option<&'static TableSchema> {
    TABLES.iter().copied().find(|table| table.name == name)
}

/// The names of the tables the host keeps, for messages.
pub fn table_names() -> String {
    TABLES
        .iter()
        .map(|table| format!("{:?}", table.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A value in a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// No value.
    Null,
    /// An integer.
    Integer(i64),
    /// A float.
    Real(f64),
    /// Text (also JSON, for a JSON column).
    Text(String),
}

impl From<Cell> for Value {
    fn from(cell: Cell) -> Self {
        match cell {
            Cell::Null => Value::Null,
            Cell::Integer(v) => Value::Integer(v),
            Cell::Real(v) => Value::Real(v),
            Cell::Text(v) => Value::Text(v),
        }
    }
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "an integer",
            Value::Real(_) => "a real",
            Value::Text(_) => "text",
        }
    }

    /// The integer it holds, if any.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Integer(value) => Some(*value),
            _ => None,
        }
    }

    /// The number it holds, if any.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Real(value) => Some(*value),
            Value::Integer(value) => Some(*value as f64),
            _ => None,
        }
    }

    /// The text it holds, if any.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(value) => Some(value),
            _ => None,
        }
    }
}

/// SQL as one database takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite 3.24 or later (upserts).
    Sqlite,
    /// PostgreSQL 9.5 or later.
    Postgres,
}

impl Dialect {
    fn type_name(self, ty: ColumnType) -> &'static str {
        match (self, ty) {
            (Dialect::Sqlite, ColumnType::Integer) => "INTEGER",
            (Dialect::Postgres, ColumnType::Integer) => "BIGINT",
            (Dialect::Sqlite, ColumnType::Real) => "REAL",
            (Dialect::Postgres, ColumnType::Real) => "DOUBLE PRECISION",
            (_, ColumnType::Text) => "TEXT",
            (Dialect::Sqlite, ColumnType::Json) => "TEXT",
            (Dialect::Postgres, ColumnType::Json) => "JSONB",
        }
    }

    fn placeholder(self, index: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{index}"),
            Dialect::Postgres => format!("${index}"),
        }
    }
}

impl TableSchema {
    /// The statement that creates it.
    pub fn create_sql(&self, dialect: Dialect) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|column| {
                format!(
                    "{} {}{}",
                    column.name,
                    dialect.type_name(column.ty),
                    if column.nullable { "" } else { " NOT NULL" }
                )
            })
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))",
            self.name,
            columns.join(", "),
            self.key().join(", ")
        )
    }

    fn key(&self) -> Vec<&'static str> {
        self.columns[..self.key_columns]
            .iter()
            .map(|c| c.name)
            .collect()
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// How many rows have a given first key column.
    pub fn count_sql(&self, dialect: Dialect) -> String {
        format!(
            "SELECT COUNT(*) FROM {} WHERE {} = {}",
            self.name,
            self.columns[0].name,
            dialect.placeholder(1)
        )
    }

    /// An insert of `rows` rows that leaves a row whose key is already there as it was.
    pub fn insert_sql(&self, dialect: Dialect, rows: usize) -> String {
        let width = self.columns.len();
        let values: Vec<String> = (0..rows)
            .map(|row| {
                let cells: Vec<String> = (1..=width)
                    .map(|column| dialect.placeholder(row * width + column))
                    .collect();
                format!("({})", cells.join(", "))
            })
            .collect();
        format!(
            "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) DO NOTHING",
            self.name,
            self.column_list(),
            values.join(", "),
            self.key().join(", ")
        )
    }

    /// Every row whose first key column is `key` (for `predictions`: one run), in key order.
    pub fn select_sql(&self, dialect: Dialect) -> String {
        format!(
            "SELECT {} FROM {} WHERE {} = {} ORDER BY {}",
            self.column_list(),
            self.name,
            self.columns[0].name,
            dialect.placeholder(1),
            self.key().join(", ")
        )
    }

    /// Checks `cells` against the table and returns the row's values in column order. An
    /// integer is taken for a real column; everything else must match the column's type.
    pub fn row(&self, cells: Vec<(String, Value)>) -> Result<Vec<Value>, ResultsError> {
        let invalid = |problem: String| ResultsError::InvalidRow {
            table: self.name,
            problem,
        };
        let mut values = vec![None; self.columns.len()];
        for (name, value) in cells {
            let Some(index) = self.columns.iter().position(|c| c.name == name) else {
                return Err(invalid(format!(
                    "it has no column {name:?}; its columns are {}",
                    self.column_list()
                )));
            };
            if values[index].is_some() {
                return Err(invalid(format!("column {name:?} is given twice")));
            }
            let column = &self.columns[index];
            let value = match (column.ty, value) {
                (_, Value::Null) => Value::Null,
                (ColumnType::Integer, value @ Value::Integer(_)) => value,
                (ColumnType::Real, Value::Integer(value)) => Value::Real(value as f64),
                (ColumnType::Real, Value::Real(value)) if value.is_finite() => Value::Real(value),
                (ColumnType::Real, Value::Real(value)) => {
                    return Err(invalid(format!(
                        "column {name:?} takes finite numbers, not {value}"
                    )));
                }
                (ColumnType::Text, value @ Value::Text(_)) => value,
                (ColumnType::Json, Value::Text(text)) => {
                    serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
                        invalid(format!(
                            "column {name:?} takes JSON text, and this is not: {e}"
                        ))
                    })?;
                    Value::Text(text)
                }
                (ty, value) => {
                    return Err(invalid(format!(
                        "column {name:?} takes {}, not {}",
                        match ty {
                            ColumnType::Integer => "an integer",
                            ColumnType::Real => "a number",
                            ColumnType::Text => "text",
                            ColumnType::Json => "JSON text",
                        },
                        value.kind()
                    )));
                }
            };
            values[index] = Some(value);
        }
        self.columns
            .iter()
            .zip(values)
            .map(|(column, value)| match value.unwrap_or(Value::Null) {
                Value::Null if !column.nullable => Err(invalid(format!(
                    "column {:?} needs a value{}",
                    column.name,
                    if self.columns[..self.key_columns]
                        .iter()
                        .any(|c| c.name == column.name)
                    {
                        " (it is part of the key)"
                    } else {
                        ""
                    }
                ))),
                value => Ok(value),
            })
            .collect()
    }
}

/// The statements that bring a database from one schema version to the next: element `i`
/// takes version `i` to `i + 1`. Each backend runs the missing ones in one transaction, under
/// a lock, so two hosts opening one database migrate it once.
fn migrations(dialect: Dialect) -> Vec<Vec<String>> {
    vec![TABLES.iter().map(|t| t.create_sql(dialect)).collect()]
}

/// Creates the table that holds the schema version.
const SCHEMA_TABLE_SQL: &str =
    "CREATE TABLE IF NOT EXISTS switchyard_schema (version BIGINT NOT NULL)";
/// Reads the schema version (0: a new database).
const SCHEMA_VERSION_SQL: &str = "SELECT COALESCE(MAX(version), 0) FROM switchyard_schema";

/// The statements that take a database at schema version `found` to [`SCHEMA_VERSION`], the
/// last of them recording it; an error when `found` is newer.
fn migration_plan(store: &str, dialect: Dialect, found: i64) -> Result<Vec<String>, ResultsError> {
    if found > SCHEMA_VERSION {
        return Err(ResultsError::NewerSchema {
            store: store.to_string(),
            found,
        });
    }
    let mut statements: Vec<String> = migrations(dialect)
        .into_iter()
        .skip(usize::try_from(found).unwrap_or(0))
        .flatten()
        .collect();
    if found < SCHEMA_VERSION {
        statements.push("DELETE FROM switchyard_schema".into());
        statements.push(format!(
            "INSERT INTO switchyard_schema (version) VALUES ({SCHEMA_VERSION})"
        ));
    }
    Ok(statements)
}

/// What goes wrong with results.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// A component opened a table its manifest entry does not grant.
    #[error(
        "component {component} may not write table {table:?}: add it to the component's \
         `results` in the manifest"
    )]
    AccessDenied {
        /// The component.
        component: String,
        /// The table it asked for.
        table: String,
    },
    /// No such table.
    #[error(
        "there is no results table {table:?}; the host keeps {}",
        table_names()
    )]
    NoSuchTable {
        /// The name asked for.
        table: String,
    },
    /// A row does not fit its table.
    #[error("a row for table {table:?} does not fit: {problem}")]
    InvalidRow {
        /// The table.
        table: &'static str,
        /// What does not fit.
        problem: String,
    },
    /// A component asked for results, and the host has no store.
    #[error("this host has no results store")]
    NoStore,
    /// The database was written by a newer switchyard.
    #[error(
        "{store} has results schema version {found}, and this switchyard knows up to \
         {SCHEMA_VERSION}: upgrade switchyard or use another database"
    )]
    NewerSchema {
        /// The store.
        store: String,
        /// Its version.
        found: i64,
    },
    /// A results URL or path that names no store.
    #[error("{0}")]
    Url(String),
    // The driver errors below are in their variants' messages, with their causes, so they
    // are not also `source`s, which `{:#}` would print twice.
    /// A file or directory of the store could not be made.
    #[error("{store}: {doing}: {error}")]
    Io {
        /// The store.
        store: String,
        /// What the host was doing.
        doing: &'static str,
        /// The I/O error.
        error: std::io::Error,
    },
    /// SQLite failed.
    #[error("{store}: {doing}: {}", with_causes(error))]
    Sqlite {
        /// The store.
        store: String,
        /// What the host was doing.
        doing: &'static str,
        /// SQLite's error.
        error: rusqlite::Error,
    },
    /// PostgreSQL failed.
    #[error("{store}: {doing}: {}{hint}", with_causes(error))]
    Postgres {
        /// The store (its URL without the password).
        store: String,
        /// What the host was doing.
        doing: &'static str,
        /// The driver's error.
        error: tokio_postgres::Error,
        /// How to fix it, when the error says.
        hint: &'static str,
    },
    /// A row read back does not hold what its table says.
    #[error("{store}: table {table:?} holds a row this switchyard cannot read: {problem}")]
    Corrupt {
        /// The store.
        store: String,
        /// The table.
        table: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// An error and its causes, each once: a driver error's own message often leaves out the
/// cause (tokio-postgres: "error connecting to server"), or repeats it (rusqlite).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let next_text = next.to_string();
        if !text.contains(&next_text) {
            text = format!("{text}: {next_text}");
        }
        cause = next.source();
    }
    text
}

/// A results database: where rows go. [`Results`] wraps one with what both backends share.
#[async_trait]
pub trait ResultsBackend: Send + Sync {
    /// What it is, for messages: a path, or a URL without its password.
    fn describe(&self) -> String;
    /// Runs [`TableSchema::insert_sql`] for `rows` (checked by [`TableSchema::row`]) in one
    /// transaction; returns how many rows were new.
    async fn insert(
        &self,
        table: &'static TableSchema,
        rows: Vec<Vec<Value>>,
    ) -> Result<u64, ResultsError>;
    /// Runs [`TableSchema::select_sql`]: the rows whose first key column is `key`.
    async fn select(
        &self,
        table: &'static TableSchema,
        key: &str,
    ) -> Result<Vec<Vec<Value>>, ResultsError>;
    /// How many rows have `key` in their first key column.
    async fn count(&self, table: &'static TableSchema, key: &str) -> Result<u64, ResultsError>;
    /// The runs in `predictions`, newest first: run id, rows, last `received_at_ms`.
    async fn runs(&self) -> Result<Vec<RunInfo>, ResultsError>;
}

/// One run in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    /// Its id.
    pub run_id: String,
    /// Its predictions.
    pub predictions: u64,
    /// When its last prediction arrived (Unix ms).
    pub last_received_ms: f64,
}

const RUNS_SQL: &str = "SELECT run_id, COUNT(*), MAX(received_at_ms) FROM predictions \
                        GROUP BY run_id ORDER BY MAX(received_at_ms) DESC";

/// Where results go, as the manifest's `[results]` section or `--results` names it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ResultsConfig {
    /// A SQLite file, created when missing.
    Sqlite {
        /// Its path; relative to the manifest in a manifest.
        path: PathBuf,
    },
    /// A PostgreSQL database.
    Postgres {
        /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`; `${VAR}` is expanded.
        url: String,
    },
}

impl ResultsConfig {
    /// Reads `--results`: `postgres://…` or `postgresql://…`, `sqlite:PATH`, or a plain path
    /// (SQLite).
    pub fn from_url(url: &str) -> Result<Self, ResultsError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres { url: url.into() });
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() || path.contains("://") {
            return Err(ResultsError::Url(format!(
                "results {url:?} names no store: give a SQLite file path (or sqlite:PATH) or \
                 postgres://USER@HOST/DATABASE"
            )));
        }
        Ok(Self::Sqlite { path: path.into() })
    }

    /// The default store: `results.sqlite3` in switchyard's data directory
    /// (`$XDG_DATA_HOME/switchyard`, else `~/.local/share/switchyard`), else in the current
    /// directory.
    pub fn default_store() -> Self {
        Self::Sqlite {
            path: crate::user_data_dir("results.sqlite3")
                .unwrap_or_else(|| PathBuf::from("switchyard-results.sqlite3")),
        }
    }

    /// Resolves a relative SQLite path against `base` (the manifest's directory).
    pub fn resolved(self, base: &Path) -> Self {
        match self {
            Self::Sqlite { path } => Self::Sqlite {
                path: base.join(path),
            },
            other => other,
        }
    }

    /// What it names, for messages and the demo's summary: the path, or the URL without its
    /// password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite { path } => path.display().to_string(),
            Self::Postgres { url } => postgres::redact(url),
        }
    }
}

/// A results store: a backend, the tables each component may write, and counts.
pub struct Results {
    backend: Arc<dyn ResultsBackend>,
    written: AtomicU64,
    already_there: AtomicU64,
}

impl std::fmt::Debug for Results {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Results")
            .field("store", &self.backend.describe())
            .finish_non_exhaustive()
    }
}

/// Rows written through one [`Results`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteCounts {
    /// New rows.
    pub written: u64,
    /// Rows whose key was already there (redeliveries), left as they were.
    pub already_there: u64,
}

impl Results {
    /// Opens (creating and migrating where needed) the store `config` names.
    pub async fn open(config: &ResultsConfig) -> Result<Self, ResultsError> {
        let backend: Arc<dyn ResultsBackend> = match config {
            ResultsConfig::Sqlite { path } => Arc::new(sqlite::Sqlite::open(path).await?),
            ResultsConfig::Postgres { url } => Arc::new(postgres::Postgres::connect(url).await?),
        };
        Ok(Self::new(backend))
    }

    /// A store in memory (SQLite), for `switchyard test`.
    pub fn in_memory() -> Result<Self, ResultsError> {
        Ok(Self::new(Arc::new(sqlite::Sqlite::in_memory()?)))
    }

    /// A store on `backend` (one a test injects, say).
    pub fn new(backend: Arc<dyn ResultsBackend>) -> Self {
        Self {
            backend,
            written: AtomicU64::new(0),
            already_there: AtomicU64::new(0),
        }
    }

    /// What it is: a path, or a URL without its password.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Checks and writes `rows` into `table` in one transaction; returns how many were new.
    pub async fn insert(
        &self,
        table: &'static TableSchema,
        rows: Vec<Vec<(String, Value)>>,
    ) -> Result<u64, ResultsError> {
        let count = rows.len() as u64;
        let rows = rows
            .into_iter()
            .map(|cells| table.row(cells))
            .collect::<Result<Vec<_>, _>>()?;
        if rows.is_empty() {
            return Ok(0);
        }
        let new = self.backend.insert(table, rows).await?;
        self.written.fetch_add(new, Ordering::Relaxed);
        self.already_there
            .fetch_add(count.saturating_sub(new), Ordering::Relaxed);
        Ok(new)
    }

    /// Rows written through this store since it was opened.
    pub fn counts(&self) -> WriteCounts {
        WriteCounts {
            written: self.written.load(Ordering::Relaxed),
            already_there: self.already_there.load(Ordering::Relaxed),
        }
    }

    /// The predictions of run `run_id`, in request order.
    pub async fn predictions(&self, run_id: &str) -> Result<Vec<PredictionRecord>, ResultsError> {
        let rows = self.backend.select(&PREDICTIONS, run_id).await?;
        rows.into_iter()
            .map(|row| {
                PredictionRecord::from_row(row).map_err(|problem| ResultsError::Corrupt {
                    store: self.describe(),
                    table: PREDICTIONS.name,
                    problem,
                })
            })
            .collect()
    }

    /// How many predictions run `run_id` has.
    pub async fn count_predictions(&self, run_id: &str) -> Result<u64, ResultsError> {
        self.backend.count(&PREDICTIONS, run_id).await
    }

    /// The runs in the store, newest first.
    pub async fn runs(&self) -> Result<Vec<RunInfo>, ResultsError> {
        self.backend.runs().await
    }
}

/// A row of `predictions`, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionRecord {
    /// The run.
    pub run_id: String,
    /// The prediction as the classifier sent it (its timings' `batch`, `decode_us` and
    /// `inference_us` are 0 where the row has none).
    pub prediction: Prediction,
    /// The component build that predicted it.
    pub component: Option<String>,
    /// When it arrived (Unix ms).
    pub received_at_ms: f64,
}

impl PredictionRecord {
    /// The row for `prediction`, received at `received_at_ms`, predicted by `component`: the
    /// one the consumer writes ([`pipeline_core::row::prediction_row`]).
    pub fn row(
        prediction: &Prediction,
        component: Option<&str>,
        received_at_ms: f64,
    ) -> Vec<(String, Value)> {
        pipeline_core::row::prediction_row(prediction, component, received_at_ms)
            .into_iter()
            .map(|(name, cell)| (name.to_string(), Value::from(cell)))
            .collect()
    }

    /// Reads a row in [`PREDICTIONS`]' column order.
    fn from_row(row: Vec<Value>) -> Result<Self, String> {
        let get = |name: &str| {
            PREDICTIONS
                .columns
                .iter()
                .position(|c| c.name == name)
                .and_then(|i| row.get(i))
                .unwrap_or(&Value::Null)
        };
        let text = |name: &str| {
            get(name)
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("column {name} holds {}, not text", get(name).kind()))
        };
        let count = |name: &str| get(name).as_i64().and_then(|v| u64::try_from(v).ok());
        let class = count("predicted_class").ok_or("predicted_class is no class index")? as usize;
        let scores: Vec<f32> = serde_json::from_str(&text("scores")?)
            .map_err(|e| format!("scores are no JSON list of numbers: {e}"))?;
        Ok(Self {
            run_id: text("run_id")?,
            prediction: Prediction {
                request_id: text("request_id")?,
                class,
                class_name: text("class_name")?,
                scores,
                label: count("label").map(|l| l as usize),
                sent_at_ms: get("sent_at_ms").as_f64(),
                model: text("model")?,
                timings: Timings {
                    decode_us: count("decode_us").unwrap_or(0),
                    inference_us: count("inference_us").unwrap_or(0),
                    batch: count("batch").map_or(0, |b| b as u32),
                },
                engine: get("engine").as_str().unwrap_or_default().to_string(),
            },
            component: get("component").as_str().map(str::to_string),
            received_at_ms: get("received_at_ms")
                .as_f64()
                .ok_or("received_at_ms is no number")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(name: &str, value: Value) -> (String, Value) {
        (name.to_string(), value)
    }

    #[test]
    fn rows_are_checked_against_their_table() {
        let prediction = Prediction::from_logits(
            "run7-12".into(),
            &[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            Some(1),
            Some(10.5),
            "lenet5-x".into(),
            Timings {
                decode_us: 3,
                inference_us: 40,
                batch: 4,
            },
        );
        let values = PREDICTIONS
            .row(PredictionRecord::row(
                &prediction,
                Some("classifier@sha256:ab"),
                12.0,
            ))
            .unwrap();
        assert_eq!(values[0], Value::Text("run7".into()));
        let back = PredictionRecord::from_row(values).unwrap();
        assert_eq!(back.prediction, prediction);
        assert_eq!(back.run_id, "run7");
        assert_eq!(back.component.as_deref(), Some("classifier@sha256:ab"));

        let problem = |cells| match PREDICTIONS.row(cells) {
            Err(ResultsError::InvalidRow { problem, .. }) => problem,
            other => panic!("{other:?}"),
        };
        assert!(problem(vec![cell("run_id", Value::Text("r".into()))]).contains("request_id"));
        assert!(problem(vec![cell("colour", Value::Integer(1))]).contains("no column \"colour\""));
        assert!(
            problem(vec![cell("label", Value::Text("seven".into()))])
                .contains("takes an integer, not text")
        );
        assert!(problem(vec![cell("scores", Value::Text("[1,".into()))]).contains("JSON"));
        assert!(
            problem(vec![
                cell("label", Value::Integer(1)),
                cell("label", Value::Integer(2))
            ])
            .contains("twice")
        );
    }

    #[test]
    fn sql_is_generated_for_both_dialects() {
        let create = PREDICTIONS.create_sql(Dialect::Postgres);
        assert!(create.contains("scores JSONB NOT NULL"), "{create}");
        assert!(
            create.ends_with("PRIMARY KEY (run_id, request_id))"),
            "{create}"
        );
        let insert = PREDICTIONS.insert_sql(Dialect::Sqlite, 2);
        assert!(insert.contains("(?15, ?16,"), "{insert}");
        assert!(
            insert.ends_with("ON CONFLICT (run_id, request_id) DO NOTHING"),
            "{insert}"
        );
    }

    #[test]
    fn results_urls() {
        assert_eq!(
            ResultsConfig::from_url("postgres://u@h/test").unwrap(),
            ResultsConfig::Postgres {
                url: "postgres://u@h/test".into()
            }
        );
        assert_eq!(
            ResultsConfig::from_url("sqlite:out/r.db").unwrap(),
            ResultsConfig::Sqlite {
                path: "out/r.db".into()
            }
        );
        assert_eq!(
            ResultsConfig::from_url("r.db").unwrap(),
            ResultsConfig::Sqlite {
                path: "r.db".into()
            }
        );
        assert!(ResultsConfig::from_url("mysql://h/db").is_err());
    }
}
