//! `switchyard:host/results`: what a component's `table.open` and `table.insert` calls do.
//!
//! A component may open only the tables its manifest entry grants (`results`); anything else,
//! and every database failure, comes back as a WIT `error`, never a trap, so a handler can
//! return an error and have its message retried. The store and the schema are in
//! [`crate::results`]; this file turns WIT values into its rows and its errors into WIT errors.
//! The state is a [`ResultsCtx`] per instance; the host calls work on a [`ResultsView`] of it
//! and the instance's resource table.

use std::collections::HashSet;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::switchyard::host::results::{self, Error, Value as WitValue};
use crate::results::{Results, ResultsError, TableSchema, Tables, Value};

/// A table as the guest holds it.
#[derive(Debug)]
pub struct HostTable(&'static TableSchema);

/// The results half of a component's state: its grants, the tables the host keeps, and the
/// host's store.
pub struct ResultsCtx {
    component: Arc<str>,
    grants: Grants,
    tables: Arc<Tables>,
    store: Option<Arc<Results>>,
}

/// Which tables a component may write.
#[derive(Debug, Clone)]
pub enum Grants {
    /// Those its manifest entry names.
    Tables(Arc<HashSet<String>>),
    /// Every table (test mode, whose store is in memory and thrown away).
    Every,
}

impl ResultsCtx {
    /// Results for `component`, which may write `grants` of the host's `tables` into `store`.
    pub fn new(
        component: Arc<str>,
        grants: Grants,
        tables: Arc<Tables>,
        store: Option<Arc<Results>>,
    ) -> Self {
        Self {
            component,
            grants,
            tables,
            store,
        }
    }

    fn granted(&self, table: &str) -> bool {
        match &self.grants {
            Grants::Tables(tables) => tables.contains(table),
            Grants::Every => true,
        }
    }
}

/// What the `switchyard:host/results` host calls work on: the instance's results context and
/// its resource table, borrowed from the store's state for one call.
pub struct ResultsView<'a> {
    /// The instance's results context.
    pub ctx: &'a ResultsCtx,
    /// The instance's resource table, where its open tables live.
    pub table: &'a mut ResourceTable,
}

/// `switchyard:host/results` as wasmtime's linker names it: its data is a [`ResultsView`].
struct ResultsInterface;

impl HasData for ResultsInterface {
    type Data<'a> = ResultsView<'a>;
}

/// Adds `switchyard:host/results` to a linker, reaching each instance's through `view`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> ResultsView<'_>,
) -> wasmtime::Result<()> {
    results::add_to_linker::<T, ResultsInterface>(linker, view)
}

fn wit_error(error: ResultsError) -> Error {
    match error {
        ResultsError::AccessDenied { .. } => Error::AccessDenied(error.to_string()),
        ResultsError::NoSuchTable { .. } => Error::NoSuchTable(error.to_string()),
        ResultsError::InvalidRow { .. } => Error::InvalidRow(error.to_string()),
        other => Error::Unavailable(format!("{:#}", anyhow::Error::from(other))),
    }
}

fn value(value: WitValue) -> Value {
    match value {
        WitValue::Null => Value::Null,
        WitValue::Integer(v) => Value::Integer(v),
        WitValue::Real(v) => Value::Real(v),
        WitValue::Text(v) => Value::Text(v),
    }
}

impl results::Host for ResultsView<'_> {}

impl results::HostTable for ResultsView<'_> {
    async fn open(&mut self, name: String) -> wasmtime::Result<Result<Resource<HostTable>, Error>> {
        let ctx = self.ctx;
        let Some(table) = ctx.tables.get(&name) else {
            return Ok(Err(wit_error(ResultsError::NoSuchTable {
                table: name,
                kept: ctx.tables.names(),
            })));
        };
        if !ctx.granted(&name) {
            return Ok(Err(wit_error(ResultsError::AccessDenied {
                component: ctx.component.to_string(),
                table: name,
            })));
        }
        Ok(Ok(self.table.push(HostTable(table))?))
    }

    async fn insert(
        &mut self,
        table: Resource<HostTable>,
        rows: Vec<Vec<(String, WitValue)>>,
    ) -> wasmtime::Result<Result<u32, Error>> {
        let schema = self.table.get(&table)?.0;
        let Some(store) = self.ctx.store.clone() else {
            return Ok(Err(wit_error(ResultsError::NoStore)));
        };
        let rows = rows
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|(name, cell)| (name, value(cell)))
                    .collect()
            })
            .collect();
        Ok(match store.insert(schema, rows).await {
            Ok(new) => Ok(u32::try_from(new).unwrap_or(u32::MAX)),
            Err(e) => {
                tracing::debug!("{}: results: {e}", self.ctx.component);
                Err(wit_error(e))
            }
        })
    }

    async fn drop(&mut self, table: Resource<HostTable>) -> wasmtime::Result<()> {
        self.table.delete(table)?;
        Ok(())
    }
}
