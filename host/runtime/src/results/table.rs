//! A table of the results store, and the SQL both databases take for it: its columns and key,
//! creating it, inserting rows (idempotently, by key), reading and counting them, and checking
//! a row against the table before it reaches the database.

use super::ResultsError;

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

impl Column {
    /// A column named `name` of type `ty`, which a row may leave out when `nullable`.
    pub const fn new(name: &'static str, ty: ColumnType, nullable: bool) -> Self {
        Self { name, ty, nullable }
    }
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

impl Value {
    /// What kind of value it is, for messages (`an integer`, `text`).
    pub fn kind(&self) -> &'static str {
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

    /// The statement that adds `column` to it.
    pub(super) fn add_column_sql(&self, dialect: Dialect, column: &Column) -> String {
        format!(
            "ALTER TABLE {} ADD COLUMN {} {}",
            self.name,
            column.name,
            dialect.type_name(column.ty)
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

    /// The values of the first key column, each with its number of rows and the largest value
    /// of `newest` among them (as a float), the largest first.
    pub fn groups_sql(&self, newest: &str) -> String {
        let key = self.columns[0].name;
        format!(
            "SELECT {key}, COUNT(*), CAST(MAX({newest}) AS DOUBLE PRECISION) FROM {} \
             GROUP BY {key} ORDER BY MAX({newest}) DESC",
            self.name
        )
    }

    /// A page of the rows whose first key column is `key` (for `predictions`: one run), in key
    /// order: at most `LIMIT` of them, and with `after`, only those whose other key columns come
    /// after the given values. Paging by key rather than by `OFFSET` keeps each page's cost
    /// independent of how far into the run it starts. Its parameters: the key, then (with
    /// `after`) one value per further key column, then the limit.
    pub fn select_sql(&self, dialect: Dialect, after: bool) -> String {
        let rest = &self.key()[1..];
        let after = if after && !rest.is_empty() {
            let values: Vec<String> = (0..rest.len())
                .map(|i| dialect.placeholder(i + 2))
                .collect();
            format!(" AND ({}) > ({})", rest.join(", "), values.join(", "))
        } else {
            String::new()
        };
        let limit = 2 + if after.is_empty() { 0 } else { rest.len() };
        format!(
            "SELECT {} FROM {} WHERE {} = {}{after} ORDER BY {} LIMIT {}",
            self.column_list(),
            self.name,
            self.columns[0].name,
            dialect.placeholder(1),
            self.key().join(", "),
            dialect.placeholder(limit)
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
