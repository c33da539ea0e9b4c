//! The SQLite results backend: one file, no server, the default.
//!
//! The connection is synchronous, so every statement runs on tokio's blocking pool, never on
//! an async worker. The file is in WAL mode with `synchronous = NORMAL`: a committed insert
//! survives the process (not the machine's power), and `switchyard report` can read while a
//! host writes. Another process holding the write lock is waited on for up to
//! [`BUSY_TIMEOUT`].

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, TransactionBehavior, params_from_iter};

use super::{
    Dialect, Group, ROWS_PER_STATEMENT, ResultsBackend, ResultsError, SCHEMA_TABLE_SQL,
    SCHEMA_VERSION_SQL, TableSchema, Tables, Value, added_columns, migration_plan,
};

/// How long a write waits for another process's lock before it fails.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A SQLite results file.
pub struct Sqlite {
    name: String,
    connection: Arc<Mutex<Connection>>,
}

impl Sqlite {
    /// Opens (creating it and its directory when missing) and migrates the file at `path`,
    /// creating the `tables` it lacks.
    pub async fn open(path: &Path, tables: &Tables) -> Result<Self, ResultsError> {
        let path = path.to_path_buf();
        let name = path.display().to_string();
        let error = {
            let name = name.clone();
            move |doing, source| ResultsError::Sqlite {
                store: name.clone(),
                doing,
                error: source,
            }
        };
        let connection = run_blocking(move || {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| ResultsError::Io {
                    store: path.display().to_string(),
                    doing: "creating its directory",
                    error: source,
                })?;
            }
            let connection = Connection::open(&path).map_err(|e| error("opening the file", e))?;
            connection
                .busy_timeout(BUSY_TIMEOUT)
                .and_then(|()| connection.pragma_update(None, "journal_mode", "WAL"))
                .and_then(|()| connection.pragma_update(None, "synchronous", "NORMAL"))
                .map_err(|e| error("setting it up", e))?;
            Ok(connection)
        })
        .await?;
        Self::migrated(name, connection, tables.clone()).await
    }

    /// A database in memory with `tables`, gone when it is dropped (`switchyard test`).
    pub fn in_memory(tables: &Tables) -> Result<Self, ResultsError> {
        let name = ":memory:".to_string();
        let connection = Connection::open_in_memory().map_err(|source| ResultsError::Sqlite {
            store: name.clone(),
            doing: "opening it",
            error: source,
        })?;
        let store = Self {
            name,
            connection: Arc::new(Mutex::new(connection)),
        };
        migrate(&store.name, &mut lock(&store.connection), tables)?;
        Ok(store)
    }

    async fn migrated(
        name: String,
        connection: Connection,
        tables: Tables,
    ) -> Result<Self, ResultsError> {
        let store = Self {
            name,
            connection: Arc::new(Mutex::new(connection)),
        };
        let (name, connection) = (store.name.clone(), store.connection.clone());
        run_blocking(move || migrate(&name, &mut lock(&connection), &tables)).await?;
        Ok(store)
    }

    fn error(&self, doing: &'static str) -> impl Fn(rusqlite::Error) -> ResultsError + use<> {
        let store = self.name.clone();
        move |source| ResultsError::Sqlite {
            store: store.clone(),
            doing,
            error: source,
        }
    }
}

/// The connection, even if a thread panicked holding it: SQLite rolls back what that thread
/// had not committed, so the connection itself is sound.
fn lock(connection: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    connection
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ResultsError> + Send + 'static,
) -> Result<T, ResultsError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

fn migrate(name: &str, connection: &mut Connection, tables: &Tables) -> Result<(), ResultsError> {
    let error = |doing| {
        move |source| ResultsError::Sqlite {
            store: name.to_string(),
            doing,
            error: source,
        }
    };
    // IMMEDIATE takes the write lock first, so two hosts opening one new file migrate it once.
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(error("locking it to migrate the schema"))?;
    transaction
        .execute_batch(SCHEMA_TABLE_SQL)
        .map_err(error("creating the schema table"))?;
    let found: i64 = transaction
        .query_row(SCHEMA_VERSION_SQL, [], |row| row.get(0))
        .map_err(error("reading the schema version"))?;
    for statement in migration_plan(name, Dialect::Sqlite, found, tables)? {
        transaction
            .execute_batch(&statement)
            .map_err(error("migrating the schema"))?;
    }
    for table in tables.iter() {
        let existing = transaction
            .prepare("SELECT name FROM pragma_table_info(?1)")
            .and_then(|mut columns| {
                columns
                    .query_map([table.name], |row| row.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(error("reading a table's columns"))?;
        for statement in added_columns(name, Dialect::Sqlite, table, &existing)? {
            transaction
                .execute_batch(&statement)
                .map_err(error("adding a column"))?;
        }
    }
    transaction
        .commit()
        .map_err(error("committing the schema migration"))
}

fn to_sql(value: Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Integer(v) => SqlValue::Integer(v),
        Value::Real(v) => SqlValue::Real(v),
        Value::Text(v) => SqlValue::Text(v),
    }
}

fn from_sql(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(v) => Value::Integer(v),
        ValueRef::Real(v) => Value::Real(v),
        ValueRef::Text(v) | ValueRef::Blob(v) => Value::Text(String::from_utf8_lossy(v).into()),
    }
}

#[async_trait]
impl ResultsBackend for Sqlite {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn insert(
        &self,
        table: &'static TableSchema,
        rows: Vec<Vec<Value>>,
    ) -> Result<u64, ResultsError> {
        let connection = self.connection.clone();
        let error = self.error("writing rows");
        run_blocking(move || {
            let mut connection = lock(&connection);
            let transaction = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&error)?;
            let mut new = 0;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let sql = table.insert_sql(Dialect::Sqlite, chunk.len());
                let mut statement = transaction.prepare_cached(&sql).map_err(&error)?;
                let values = chunk.iter().flatten().cloned().map(to_sql);
                new += statement
                    .execute(params_from_iter(values))
                    .map_err(&error)? as u64;
            }
            transaction.commit().map_err(&error)?;
            Ok(new)
        })
        .await
    }

    async fn select(
        &self,
        table: &'static TableSchema,
        key: &str,
        after: Option<Vec<Value>>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>, ResultsError> {
        let connection = self.connection.clone();
        let error = self.error("reading rows");
        let sql = table.select_sql(Dialect::Sqlite, after.is_some());
        let params: Vec<SqlValue> = std::iter::once(SqlValue::Text(key.to_string()))
            .chain(after.into_iter().flatten().map(to_sql))
            .chain([SqlValue::Integer(i64::try_from(limit).unwrap_or(i64::MAX))])
            .collect();
        run_blocking(move || {
            let connection = lock(&connection);
            let mut statement = connection.prepare_cached(&sql).map_err(&error)?;
            let width = table.columns.len();
            let rows = statement
                .query_map(params_from_iter(params), |row| {
                    (0..width)
                        .map(|i| row.get_ref(i).map(from_sql))
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(&error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(&error)
        })
        .await
    }

    async fn count(&self, table: &'static TableSchema, key: &str) -> Result<u64, ResultsError> {
        let connection = self.connection.clone();
        let error = self.error("counting rows");
        let key = key.to_string();
        run_blocking(move || {
            let connection = lock(&connection);
            let mut statement = connection
                .prepare_cached(&table.count_sql(Dialect::Sqlite))
                .map_err(&error)?;
            let count: i64 = statement
                .query_row([key], |row| row.get(0))
                .map_err(&error)?;
            Ok(count.max(0) as u64)
        })
        .await
    }

    async fn groups(
        &self,
        table: &'static TableSchema,
        newest: &'static str,
    ) -> Result<Vec<Group>, ResultsError> {
        let connection = self.connection.clone();
        let error = self.error("reading the groups of rows");
        run_blocking(move || {
            let connection = lock(&connection);
            let mut statement = connection
                .prepare_cached(&table.groups_sql(newest))
                .map_err(&error)?;
            let groups = statement
                .query_map([], |row| {
                    Ok(Group {
                        key: row.get(0)?,
                        rows: row.get::<_, i64>(1)?.max(0) as u64,
                        newest: row.get::<_, Option<f64>>(2)?.unwrap_or(f64::NAN),
                    })
                })
                .map_err(&error)?;
            groups.collect::<Result<Vec<_>, _>>().map_err(&error)
        })
        .await
    }
}
