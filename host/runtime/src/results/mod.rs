//! The results store: tables the host keeps in SQLite or PostgreSQL, which components write
//! through `switchyard:host/results` and `switchyard report` reads.
//!
//! Why the host owns the schema instead of handing components SQL: one component then runs
//! unchanged on either database, a component can write only the tables its manifest grants and
//! never read or drop anything, and every table is keyed, so an insert of a row whose key is
//! already there changes nothing. That makes a handler's write idempotent, which at-least-once
//! delivery needs: a redelivered prediction never becomes a second row.
//!
//! The store is generic: the program that embeds the host declares its tables ([`Tables`],
//! such as the demo's `predictions`), and the store creates the missing ones when it opens.
//! What both backends share lives here, written once: checking a row against its table
//! ([`TableSchema::row`]), the SQL both dialects take, the migrations and the counts of rows
//! written. [`sqlite`] and [`postgres`] only run statements.
//!
//! # Schema
//!
//! `switchyard_schema(version)` holds the version of the store's own layout; the host migrates
//! an older database forward when it opens it and refuses a newer one. Version 1 is the schema
//! table alone; every declared table is created when missing, each time a store opens, and
//! a declared table that exists without some of its nullable columns (declared by a newer
//! program, such as the demo's per-hop times) gets them added, its old rows holding NULL there.
//! A missing column that may not be NULL cannot be filled for the old rows: the store refuses
//! to open, naming it.

pub mod postgres;
pub mod sqlite;
mod table;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::Deserialize;

pub use table::{Column, ColumnType, Dialect, TableSchema, Value};

/// The tables a host keeps, declared by the program that embeds it (the demo declares
/// `predictions`); components may write those their manifest entry grants.
#[derive(Debug, Clone, Default)]
pub struct Tables(Vec<&'static TableSchema>);

impl Tables {
    /// These tables.
    pub fn new(tables: impl IntoIterator<Item = &'static TableSchema>) -> Self {
        Self(tables.into_iter().collect())
    }

    /// The table named `name`, if the host keeps one.
    pub fn get(&self, name: &str) -> Option<&'static TableSchema> {
        self.0.iter().copied().find(|table| table.name == name)
    }

    /// Every table.
    pub fn iter(&self) -> impl Iterator<Item = &'static TableSchema> + '_ {
        self.0.iter().copied()
    }

    /// Their names, for messages (`"predictions"`, or `none`).
    pub fn names(&self) -> String {
        if self.0.is_empty() {
            return "none".to_string();
        }
        self.0
            .iter()
            .map(|table| format!("{:?}", table.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Rows per insert statement: 500 × 14 parameters stays well inside both databases' limits
/// (SQLite's 32,766 variables, PostgreSQL's 65,535 parameters).
const ROWS_PER_STATEMENT: usize = 500;

/// The schema version this host writes; see the module docs.
pub const SCHEMA_VERSION: i64 = 1;

/// The statements that bring a database from one schema version to the next: element `i`
/// takes version `i` to `i + 1`. Each backend runs the missing ones in one transaction, under
/// a lock, so two hosts opening one database migrate it once.
fn migrations() -> Vec<Vec<String>> {
    // Version 1: the schema table alone (which every backend creates first).
    vec![Vec::new()]
}

/// Creates the table that holds the schema version.
const SCHEMA_TABLE_SQL: &str =
    "CREATE TABLE IF NOT EXISTS switchyard_schema (version BIGINT NOT NULL)";
/// Reads the schema version (0: a new database).
const SCHEMA_VERSION_SQL: &str = "SELECT COALESCE(MAX(version), 0) FROM switchyard_schema";

/// The statements that take a database at schema version `found` to [`SCHEMA_VERSION`],
/// recording it, and then create every one of `tables` that is missing; an error when `found`
/// is newer.
fn migration_plan(
    store: &str,
    dialect: Dialect,
    found: i64,
    tables: &Tables,
) -> Result<Vec<String>, ResultsError> {
    if found > SCHEMA_VERSION {
        return Err(ResultsError::NewerSchema {
            store: store.to_string(),
            found,
        });
    }
    let mut statements: Vec<String> = migrations()
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
    statements.extend(tables.iter().map(|table| table.create_sql(dialect)));
    Ok(statements)
}

/// The statements that give `table`, which exists with the columns `existing`, the columns
/// its declaration has and it lacks; an error when one of those may not be NULL.
fn added_columns(
    store: &str,
    dialect: Dialect,
    table: &TableSchema,
    existing: &[String],
) -> Result<Vec<String>, ResultsError> {
    table
        .columns
        .iter()
        .filter(|column| {
            !existing
                .iter()
                .any(|name| name.eq_ignore_ascii_case(column.name))
        })
        .map(|column| match column.nullable {
            true => Ok(table.add_column_sql(dialect, column)),
            false => Err(ResultsError::MissingColumn {
                store: store.to_string(),
                table: table.name,
                column: column.name,
            }),
        })
        .collect()
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
    #[error("there is no results table {table:?}; this host keeps {kept}")]
    NoSuchTable {
        /// The name asked for.
        table: String,
        /// The tables the host keeps.
        kept: String,
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
    /// A table made by an older program lacks a column that may not be NULL.
    #[error(
        "{store}: table {table:?} has no column {column:?}, which this switchyard needs and \
         cannot add to the rows it holds: use another database, or move the table aside"
    )]
    MissingColumn {
        /// The store.
        store: String,
        /// The table.
        table: &'static str,
        /// The column.
        column: &'static str,
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
    /// Runs [`TableSchema::select_sql`]: at most `limit` of the rows whose first key column is
    /// `key`, in key order; with `after` (the further key columns' values of the last row
    /// read), only the rows after that one.
    async fn select(
        &self,
        table: &'static TableSchema,
        key: &str,
        after: Option<Vec<Value>>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>, ResultsError>;
    /// How many rows have `key` in their first key column.
    async fn count(&self, table: &'static TableSchema, key: &str) -> Result<u64, ResultsError>;
    /// Runs [`TableSchema::groups_sql`].
    async fn groups(
        &self,
        table: &'static TableSchema,
        newest: &'static str,
    ) -> Result<Vec<Group>, ResultsError>;
}

/// The rows of a table that share the value of its first key column, in key order, a page at a
/// time ([`Results::select`]).
pub struct RowPages<'a> {
    backend: &'a dyn ResultsBackend,
    table: &'static TableSchema,
    key: String,
    /// The further key columns' values of the last row read.
    after: Option<Vec<Value>>,
    page_rows: usize,
    done: bool,
}

impl RowPages<'_> {
    /// Rows per page unless told otherwise: a few MB of the demo's predictions (~600 B a row).
    pub const DEFAULT_PAGE_ROWS: usize = 4096;

    /// Reads `rows` rows per page (at least one).
    pub fn page_rows(mut self, rows: usize) -> Self {
        self.page_rows = rows.max(1);
        self
    }

    /// The next page; `None` after the last row.
    pub async fn next(&mut self) -> Result<Option<Vec<Vec<Value>>>, ResultsError> {
        if self.done {
            return Ok(None);
        }
        let rows = self
            .backend
            .select(self.table, &self.key, self.after.take(), self.page_rows)
            .await?;
        let key_columns = self.table.key_columns;
        // With the key in one column, a key has one row at most.
        self.done = rows.len() < self.page_rows || key_columns < 2;
        match rows.last() {
            Some(last) => self.after = last.get(1..key_columns).map(<[Value]>::to_vec),
            None => return Ok(None),
        }
        Ok(Some(rows))
    }

    /// Every remaining row, in one `Vec`: for a reader that knows the rows are few.
    pub async fn all(mut self) -> Result<Vec<Vec<Value>>, ResultsError> {
        let mut all = Vec::new();
        while let Some(page) = self.next().await? {
            all.extend(page);
        }
        Ok(all)
    }
}

/// The rows of a table that share the value of its first key column (a run's predictions).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The value of the first key column.
    pub key: String,
    /// How many rows hold it.
    pub rows: u64,
    /// The largest value of the column asked for, among them.
    pub newest: f64,
}

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

/// A results store: a backend, the tables it keeps, and counts.
pub struct Results {
    backend: Arc<dyn ResultsBackend>,
    tables: Tables,
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
    /// Opens the store `config` names, keeping `tables`: creates and migrates it where
    /// needed, and creates the tables it lacks.
    pub async fn open(config: &ResultsConfig, tables: &Tables) -> Result<Self, ResultsError> {
        let backend: Arc<dyn ResultsBackend> = match config {
            ResultsConfig::Sqlite { path } => Arc::new(sqlite::Sqlite::open(path, tables).await?),
            ResultsConfig::Postgres { url } => {
                Arc::new(postgres::Postgres::connect(url, tables).await?)
            }
        };
        Ok(Self::new(backend, tables.clone()))
    }

    /// A store in memory (SQLite) keeping `tables`, for `switchyard test`.
    pub fn in_memory(tables: &Tables) -> Result<Self, ResultsError> {
        Ok(Self::new(
            Arc::new(sqlite::Sqlite::in_memory(tables)?),
            tables.clone(),
        ))
    }

    /// A store on `backend` (one a test injects, say), whose tables exist.
    pub fn new(backend: Arc<dyn ResultsBackend>, tables: Tables) -> Self {
        Self {
            backend,
            tables,
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

    /// The tables it keeps.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The rows of `table` whose first key column is `key`, in key order, read a page at a
    /// time: a reader of a run of a million predictions holds one page, not the run.
    pub fn select(&self, table: &'static TableSchema, key: &str) -> RowPages<'_> {
        RowPages {
            backend: self.backend.as_ref(),
            table,
            key: key.to_string(),
            after: None,
            page_rows: RowPages::DEFAULT_PAGE_ROWS,
            done: false,
        }
    }

    /// How many rows of `table` have `key` in their first key column.
    pub async fn count(&self, table: &'static TableSchema, key: &str) -> Result<u64, ResultsError> {
        self.backend.count(table, key).await
    }

    /// The values of `table`'s first key column, each with its rows and the largest value of
    /// the column `newest`, the largest first (a table's runs, newest first).
    pub async fn groups(
        &self,
        table: &'static TableSchema,
        newest: &'static str,
    ) -> Result<Vec<Group>, ResultsError> {
        self.backend.groups(table, newest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(name: &str, value: Value) -> (String, Value) {
        (name.to_string(), value)
    }

    /// A table of the tests' own: the store knows no table but those it is given.
    const READINGS: TableSchema = TableSchema {
        name: "readings",
        columns: &[
            Column {
                name: "run_id",
                ty: ColumnType::Text,
                nullable: false,
            },
            Column {
                name: "sensor",
                ty: ColumnType::Text,
                nullable: false,
            },
            Column {
                name: "value",
                ty: ColumnType::Real,
                nullable: true,
            },
            Column {
                name: "count",
                ty: ColumnType::Integer,
                nullable: true,
            },
            Column {
                name: "extra",
                ty: ColumnType::Json,
                nullable: true,
            },
        ],
        key_columns: 2,
    };

    #[test]
    fn rows_are_checked_against_their_table() {
        let values = READINGS
            .row(vec![
                cell("sensor", Value::Text("t1".into())),
                cell("run_id", Value::Text("run7".into())),
                cell("value", Value::Integer(3)),
                cell("extra", Value::Text("{\"unit\": \"C\"}".into())),
            ])
            .unwrap();
        assert_eq!(
            values,
            [
                Value::Text("run7".into()),
                Value::Text("t1".into()),
                Value::Real(3.0),
                Value::Null,
                Value::Text("{\"unit\": \"C\"}".into()),
            ]
        );

        let problem = |cells| match READINGS.row(cells) {
            Err(ResultsError::InvalidRow { problem, .. }) => problem,
            other => panic!("{other:?}"),
        };
        let key_only = problem(vec![cell("run_id", Value::Text("r".into()))]);
        assert!(
            key_only.contains("sensor") && key_only.contains("key"),
            "{key_only}"
        );
        assert!(problem(vec![cell("colour", Value::Integer(1))]).contains("no column \"colour\""));
        assert!(
            problem(vec![cell("count", Value::Text("seven".into()))])
                .contains("takes an integer, not text")
        );
        assert!(problem(vec![cell("extra", Value::Text("[1,".into()))]).contains("JSON"));
        assert!(problem(vec![cell("value", Value::Real(f64::NAN))]).contains("finite"));
        assert!(
            problem(vec![
                cell("count", Value::Integer(1)),
                cell("count", Value::Integer(2))
            ])
            .contains("twice")
        );
    }

    #[test]
    fn sql_is_generated_for_both_dialects() {
        let create = READINGS.create_sql(Dialect::Postgres);
        assert!(create.contains("extra JSONB,"), "{create}");
        assert!(create.contains("run_id TEXT NOT NULL"), "{create}");
        assert!(
            create.ends_with("PRIMARY KEY (run_id, sensor))"),
            "{create}"
        );
        let insert = READINGS.insert_sql(Dialect::Sqlite, 2);
        assert!(insert.contains("(?6, ?7,"), "{insert}");
        assert!(
            insert.ends_with("ON CONFLICT (run_id, sensor) DO NOTHING"),
            "{insert}"
        );
        let page = READINGS.select_sql(Dialect::Postgres, true);
        assert!(
            page.ends_with(
                "WHERE run_id = $1 AND (sensor) > ($2) ORDER BY run_id, sensor LIMIT $3"
            ),
            "{page}"
        );
        let first = READINGS.select_sql(Dialect::Sqlite, false);
        assert!(
            first.ends_with("WHERE run_id = ?1 ORDER BY run_id, sensor LIMIT ?2"),
            "{first}"
        );
        let groups = READINGS.groups_sql("value");
        assert!(groups.contains("GROUP BY run_id"), "{groups}");
    }

    #[test]
    fn opening_creates_the_declared_tables_and_refuses_a_newer_schema() {
        let tables = Tables::new([&READINGS]);
        let plan = migration_plan("test", Dialect::Sqlite, 0, &tables).unwrap();
        assert!(
            plan.last()
                .unwrap()
                .starts_with("CREATE TABLE IF NOT EXISTS readings")
        );
        assert!(
            plan.iter()
                .any(|s| s.contains("INSERT INTO switchyard_schema"))
        );
        // A store at this version only gets the tables it lacks.
        let again = migration_plan("test", Dialect::Sqlite, SCHEMA_VERSION, &tables).unwrap();
        assert_eq!(again, [READINGS.create_sql(Dialect::Sqlite)]);
        assert!(matches!(
            migration_plan("test", Dialect::Sqlite, SCHEMA_VERSION + 1, &tables),
            Err(ResultsError::NewerSchema { .. })
        ));
        assert_eq!(tables.get("readings").map(|t| t.name), Some("readings"));
        assert!(tables.get("predictions").is_none());
        assert_eq!(tables.names(), "\"readings\"");
        assert_eq!(Tables::default().names(), "none");
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
