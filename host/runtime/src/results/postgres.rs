//! The PostgreSQL results backend, on the host's tokio runtime.
//!
//! One connection per host, opened again on the next write after the server closed it (a
//! restart, an idle timeout), so a database that was away costs the writes made meanwhile an
//! error (the handler's message is retried) and nothing after. Writes take the connection in
//! turn: each is one transaction of one statement per [`ROWS_PER_STATEMENT`] rows, so they
//! are short.
//!
//! It connects without TLS (`sslmode=prefer` falls back to plain text; `require` is refused
//! with the fix): a database reached over an untrusted network needs a TLS proxy for now.

use async_trait::async_trait;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use super::{
    ColumnType, Dialect, Group, ROWS_PER_STATEMENT, ResultsBackend, ResultsError, SCHEMA_TABLE_SQL,
    SCHEMA_VERSION_SQL, TableSchema, Tables, Value, added_columns, migration_plan,
};

/// The advisory lock under which hosts migrate the schema (an arbitrary constant, "swyd").
const MIGRATION_LOCK: i64 = 0x7377_7964;

/// A PostgreSQL results database.
pub struct Postgres {
    url: String,
    name: String,
    client: Mutex<Option<Client>>,
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest
        .find(['/', '?'])
        .map_or((rest, ""), |at| rest.split_at(at));
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail: Vec<String> = tail
        .split('&')
        .map(|part| match part.split_once("password=") {
            Some((before, _)) => format!("{before}password=***"),
            None => part.to_string(),
        })
        .collect();
    format!("{scheme}://{authority}{}", tail.join("&"))
}

/// The fix for an error, when the error says what it is.
fn hint(error: &tokio_postgres::Error) -> &'static str {
    use tokio_postgres::error::SqlState;
    let io_kind = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    match (error.code(), io_kind) {
        (Some(&SqlState::INVALID_CATALOG_NAME), _) => {
            " (create the database first, e.g. `createdb NAME`)"
        }
        (Some(&SqlState::INVALID_PASSWORD | &SqlState::INVALID_AUTHORIZATION_SPECIFICATION), _) => {
            " (check the user and password in the URL; `${VAR}` in a manifest reads one from \
             the environment)"
        }
        (_, Some(std::io::ErrorKind::ConnectionRefused)) => {
            " (is PostgreSQL running and listening at that host and port?)"
        }
        _ if error.to_string().contains("TLS") => {
            " (switchyard connects to PostgreSQL without TLS: use sslmode=disable or prefer, \
             through a TLS proxy where the network is not trusted)"
        }
        _ => "",
    }
}

impl Postgres {
    /// Connects to `url`, migrates the schema and creates the `tables` it lacks.
    pub async fn connect(url: &str, tables: &Tables) -> Result<Self, ResultsError> {
        let store = Self {
            url: url.to_string(),
            name: redact(url),
            client: Mutex::new(None),
        };
        let mut client = store.client.lock().await;
        let connected = client.insert(store.open().await?);
        let error = store.error("migrating the schema");
        let transaction = connected.transaction().await.map_err(&error)?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(&error)?;
        transaction
            .batch_execute(SCHEMA_TABLE_SQL)
            .await
            .map_err(&error)?;
        let found: i64 = transaction
            .query_one(SCHEMA_VERSION_SQL, &[])
            .await
            .map_err(&error)?
            .get(0);
        for statement in migration_plan(&store.name, Dialect::Postgres, found, tables)? {
            transaction
                .batch_execute(&statement)
                .await
                .map_err(&error)?;
        }
        for table in tables.iter() {
            let existing: Vec<String> = transaction
                .query(
                    "SELECT column_name::text FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name = $1",
                    &[&table.name],
                )
                .await
                .map_err(&error)?
                .iter()
                .map(|row| row.get(0))
                .collect();
            for statement in added_columns(&store.name, Dialect::Postgres, table, &existing)? {
                transaction
                    .batch_execute(&statement)
                    .await
                    .map_err(&error)?;
            }
        }
        transaction.commit().await.map_err(&error)?;
        drop(client);
        Ok(store)
    }

    async fn open(&self) -> Result<Client, ResultsError> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .map_err(self.error("connecting"))?;
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("results store {name}: connection lost: {e}");
            }
        });
        Ok(client)
    }

    fn error(&self, doing: &'static str) -> impl Fn(tokio_postgres::Error) -> ResultsError + use<> {
        let store = self.name.clone();
        move |source| ResultsError::Postgres {
            store: store.clone(),
            doing,
            hint: hint(&source),
            error: source,
        }
    }

    /// The connection, opened again if the server closed it.
    async fn client(&self) -> Result<MappedMutexGuard<'_, Client>, ResultsError> {
        let mut slot = self.client.lock().await;
        let client = match slot.take() {
            Some(client) if !client.is_closed() => client,
            _ => self.open().await?,
        };
        Ok(MutexGuard::map(slot, |slot| slot.insert(client)))
    }
}

type Param = Box<dyn ToSql + Sync + Send>;

fn to_sql(ty: ColumnType, value: Value) -> Param {
    match (ty, value) {
        (ColumnType::Integer, Value::Null) => Box::new(None::<i64>),
        (ColumnType::Real, Value::Null) => Box::new(None::<f64>),
        (ColumnType::Text, Value::Null) => Box::new(None::<String>),
        (ColumnType::Json, Value::Null) => Box::new(None::<serde_json::Value>),
        (ColumnType::Json, Value::Text(text)) => Box::new(
            // Checked by `TableSchema::row`.
            serde_json::from_str::<serde_json::Value>(&text).unwrap_or(serde_json::Value::Null),
        ),
        (_, Value::Integer(v)) => Box::new(v),
        (_, Value::Real(v)) => Box::new(v),
        (_, Value::Text(v)) => Box::new(v),
    }
}

/// `params` as the driver takes them.
fn borrowed(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

fn from_sql(ty: ColumnType, row: &tokio_postgres::Row, index: usize) -> Result<Value, String> {
    let value = match ty {
        ColumnType::Integer => row
            .try_get::<_, Option<i64>>(index)
            .map(|v| v.map(Value::Integer)),
        ColumnType::Real => row
            .try_get::<_, Option<f64>>(index)
            .map(|v| v.map(Value::Real)),
        ColumnType::Text => row
            .try_get::<_, Option<String>>(index)
            .map(|v| v.map(Value::Text)),
        ColumnType::Json => row
            .try_get::<_, Option<serde_json::Value>>(index)
            .map(|v| v.map(|json| Value::Text(json.to_string()))),
    };
    value
        .map(|v| v.unwrap_or(Value::Null))
        .map_err(|e| format!("column {index}: {e}"))
}

#[async_trait]
impl ResultsBackend for Postgres {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn insert(
        &self,
        table: &'static TableSchema,
        rows: Vec<Vec<Value>>,
    ) -> Result<u64, ResultsError> {
        let error = self.error("writing rows");
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(&error)?;
        let mut new = 0;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let params: Vec<Param> = chunk
                .iter()
                .flat_map(|row| {
                    table
                        .columns
                        .iter()
                        .zip(row.iter().cloned())
                        .map(|(column, value)| to_sql(column.ty, value))
                })
                .collect();
            let sql = table.insert_sql(Dialect::Postgres, chunk.len());
            new += transaction
                .execute(&sql, &borrowed(&params))
                .await
                .map_err(&error)?;
        }
        transaction.commit().await.map_err(&error)?;
        Ok(new)
    }

    async fn select(
        &self,
        table: &'static TableSchema,
        key: &str,
        after: Option<Vec<Value>>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>, ResultsError> {
        let sql = table.select_sql(Dialect::Postgres, after.is_some());
        let params: Vec<Param> = std::iter::once(Box::new(key.to_string()) as Param)
            .chain(
                after
                    .into_iter()
                    .flatten()
                    .zip(&table.columns[1..])
                    .map(|(value, column)| to_sql(column.ty, value)),
            )
            .chain([Box::new(i64::try_from(limit).unwrap_or(i64::MAX)) as Param])
            .collect();
        let client = self.client().await?;
        let rows = client
            .query(&sql, &borrowed(&params))
            .await
            .map_err(self.error("reading rows"))?;
        rows.iter()
            .map(|row| {
                table
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(index, column)| from_sql(column.ty, row, index))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()
            .map_err(|problem| ResultsError::Corrupt {
                store: self.name.clone(),
                table: table.name,
                problem,
            })
    }

    async fn count(&self, table: &'static TableSchema, key: &str) -> Result<u64, ResultsError> {
        let client = self.client().await?;
        let count: i64 = client
            .query_one(&table.count_sql(Dialect::Postgres), &[&key])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(self.error("counting rows"))?;
        Ok(count.max(0) as u64)
    }

    async fn groups(
        &self,
        table: &'static TableSchema,
        newest: &'static str,
    ) -> Result<Vec<Group>, ResultsError> {
        let client = self.client().await?;
        let rows = client
            .query(&table.groups_sql(newest), &[])
            .await
            .map_err(self.error("reading the groups of rows"))?;
        rows.iter()
            .map(|row| {
                Ok(Group {
                    key: row.try_get(0)?,
                    rows: row.try_get::<_, i64>(1)?.max(0) as u64,
                    newest: row.try_get::<_, Option<f64>>(2)?.unwrap_or(f64::NAN),
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(self.error("reading the groups of rows"))
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/results"),
            "postgres://app:***@db:5432/results"
        );
        assert_eq!(
            redact("postgres://app@db/results?password=s3cret&sslmode=disable"),
            "postgres://app@db/results?password=***&sslmode=disable"
        );
        assert_eq!(
            redact("postgresql://localhost/test"),
            "postgresql://localhost/test"
        );
    }
}
