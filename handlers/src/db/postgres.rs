//! The `db` handler's PostgreSQL backend (`onex run --database-url postgres://...`).
//!
//! Statements from many effect calls are grouped into transactions under load, as the
//! SQLite writer groups them: [`BATCHERS`] batchers (one per pooled connection) each
//! take what waits in their queue, up to [`GROUP`] statements, and run it as one
//! transaction; calls that arrive meanwhile wait in the queue and join the next one.
//! An idle batcher runs a lone call at once.
//!
//! A statement goes to the batcher chosen by its first parameter (a row's key, as a
//! contract usually writes it: `WHERE node_id = $1`). Statements on one key then run
//! one after the other, in the order they came, and never in two transactions at
//! once: with one shared queue, two batchers' transactions each took a row the other
//! wanted next, and PostgreSQL found the deadlock only after a second
//! (`deadlock_timeout`), then failed one of them.
//!
//! A group runs first as a plain transaction, one round trip per statement. If a
//! statement fails, the database has aborted the transaction: it is rolled back and
//! the group runs again with each statement in a savepoint, so that the failing one
//! is rolled back to it alone and answers with its own error, and the others commit. If
//! the transaction cannot commit (the COMMIT fails, or the connection is lost on the
//! way), every statement of it fails as transient, whatever it answered: nothing of it
//! is kept, and the effect runner retries each call (db operations are idempotent).
//! A statement is never reported done unless its transaction committed.
//!
//! Query text comes from the contract (`query_template`, its `postgres` text) and is
//! prepared once per connection (sqlx keeps each connection's prepared statements);
//! values are bound from `query_params` ([`param_type`]). Rows come back as JSON
//! ([`column_json`]), in the same shape as the SQLite backend's answers.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use onex_runtime::handler::{Failure, Outcome, SetupFile};
use onex_runtime::url::{Secrets, redact};
use serde_json::{Map, Value, json};
use sqlx::postgres::{PgArguments, PgPoolOptions, PgRow, PgTypeInfo};
use sqlx::types::Json;
use sqlx::{
    Arguments, AssertSqlSafe, Column, Executor, PgConnection, PgPool, Postgres, Row, SqlSafeStr,
    SqlStr, Statement, Type, TypeInfo, ValueRef,
};
use tokio::sync::{mpsc, oneshot};

use super::Params;

/// The advisory lock the set-up files run under ("onexsetu" in ASCII); the state
/// store's lock is another.
const SETUP_LOCK: i64 = 0x6f6e_6578_7365_7475;

/// Connections in the pool. With PostgreSQL on the same two cores as onex, four
/// batchers gave the lower tail at a fixed load of ~10,500 workflow outcomes/s (p99
/// 38-50 ms against 49-56 ms with eight, and less server CPU per outcome: fewer
/// backends to wake, larger groups per commit) and the same saturated rate
/// (docs/performance.md, twentieth round); a server of its own has cores to spare
/// for more. Four stay far below PostgreSQL's default `max_connections` (100).
const POOL_SIZE: u32 = 4;
/// Batchers: one per pooled connection, so that a batch never waits for another's
/// connection. (Readiness checks and set-up wait for a free one, a batch's time.)
const BATCHERS: usize = POOL_SIZE as usize;
/// Statements at most in one transaction. Every statement that writes in its own
/// savepoint gets a subtransaction id, and PostgreSQL keeps 64 of them per backend
/// in shared memory; past that, every snapshot another session takes while the
/// transaction runs overflows to `pg_subtrans` on disk, slowing all of them.
const GROUP: usize = 64;
/// How long a batch waits for a connection (a server that does not answer) before
/// its statements fail as transient and are retried.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A bound value's PostgreSQL type, chosen from the JSON value's own: strings as
/// text, integers as int8, other numbers as float8, booleans as bool, null as a text
/// NULL, arrays and objects as jsonb. Where a column wants another type the
/// statement casts: `$8::timestamptz` for a time given as a string, `$4::jsonb` for
/// a JSON document given as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamType {
    Text,
    Int8,
    Float8,
    Bool,
    Jsonb,
}

pub(crate) fn param_type(value: &Value) -> ParamType {
    match value {
        Value::Null | Value::String(_) => ParamType::Text,
        Value::Bool(_) => ParamType::Bool,
        Value::Number(n) if n.as_i64().is_some() => ParamType::Int8,
        Value::Number(_) => ParamType::Float8,
        Value::Array(_) | Value::Object(_) => ParamType::Jsonb,
    }
}

impl ParamType {
    fn name(self) -> &'static str {
        match self {
            ParamType::Text => "text",
            ParamType::Int8 => "int8",
            ParamType::Float8 => "float8",
            ParamType::Bool => "bool",
            ParamType::Jsonb => "jsonb",
        }
    }

    fn type_info(self) -> PgTypeInfo {
        match self {
            ParamType::Text => <String as Type<Postgres>>::type_info(),
            ParamType::Int8 => <i64 as Type<Postgres>>::type_info(),
            ParamType::Float8 => <f64 as Type<Postgres>>::type_info(),
            ParamType::Bool => <bool as Type<Postgres>>::type_info(),
            ParamType::Jsonb => <Json<Value> as Type<Postgres>>::type_info(),
        }
    }
}

/// The values bound as [`param_type`] says.
fn arguments(values: &[Value]) -> Result<PgArguments, sqlx::error::BoxDynError> {
    let mut arguments = PgArguments::default();
    arguments.reserve(values.len(), values.len() * 8);
    for value in values {
        match value {
            Value::Null => arguments.add(None::<&str>)?,
            Value::String(s) => arguments.add(s.as_str())?,
            Value::Bool(b) => arguments.add(*b)?,
            Value::Number(n) => match n.as_i64() {
                Some(i) => arguments.add(i)?,
                None => arguments.add(n.as_f64().unwrap_or(f64::NAN))?,
            },
            Value::Array(_) | Value::Object(_) => arguments.add(Json(value))?,
        }
    }
    Ok(arguments)
}

/// A statement for the queue: its SQL as prepared (see [`Texts`]), its parameters
/// and types, and where its answer goes.
#[derive(Debug)]
struct Job {
    sql: SqlStr,
    types: Vec<ParamType>,
    params: Params,
    done: oneshot::Sender<Outcome>,
}

/// A contract text as prepared, per list of parameter types. sqlx keeps one prepared
/// statement per SQL text on each connection, prepared with the types of its first
/// execution; a later call whose values have other types (a number where a string
/// was) would bind its values against the first call's types. So each further list
/// of types gets a text of its own: the contract's, followed by a comment naming the
/// types. The first list, nearly always the only one, keeps the text as written.
#[derive(Debug, Default)]
struct Texts(RwLock<foldhash::HashMap<String, Vec<Form>>>);

/// A list of parameter types and the text prepared for it.
type Form = (Vec<ParamType>, SqlStr);

impl Texts {
    fn get(&self, text: &str, types: &[ParamType]) -> SqlStr {
        if let Ok(known) = self.0.read()
            && let Some(forms) = known.get(text)
            && let Some((_, sql)) = forms.iter().find(|(t, _)| t == types)
        {
            return sql.clone();
        }
        let Ok(mut known) = self.0.write() else {
            return AssertSqlSafe(text.to_owned()).into_sql_str();
        };
        let forms = known.entry(text.to_owned()).or_default();
        if let Some((_, sql)) = forms.iter().find(|(t, _)| t == types) {
            return sql.clone();
        }
        let sql: Arc<str> = if forms.is_empty() {
            Arc::from(text)
        } else {
            let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
            Arc::from(format!(
                "{text}\n-- onex: parameter types {}",
                names.join(", ")
            ))
        };
        let sql = AssertSqlSafe(sql).into_sql_str();
        forms.push((types.to_vec(), sql.clone()));
        sql
    }
}

/// The backend: the pool, each batcher's queue, and how the URL may be shown.
#[derive(Debug)]
pub(crate) struct Pg {
    pool: PgPool,
    /// Each batcher's queue.
    queues: Vec<mpsc::UnboundedSender<Job>>,
    texts: Texts,
    secrets: Arc<Secrets>,
    /// The URL, redacted.
    shown: String,
    /// `host:port/database`, for the circuit breaker.
    target: String,
}

impl Pg {
    /// Parses the URL and starts the batchers; connections open when first needed,
    /// so that an unreachable server is an error of the calls (transient), as a
    /// locked SQLite file is. Must be called inside a Tokio runtime.
    pub(crate) fn connect(url: &str) -> Result<Pg, String> {
        let shown = redact(url).into_owned();
        let secrets = Arc::new(Secrets::of(url));
        let options = onex_runtime::store::postgres::connect_options(url)?;
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or(options.get_username())
        );
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the PostgreSQL backend needs a Tokio runtime".to_owned())?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .min_connections(0)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let queues = (0..BATCHERS)
            .map(|_| {
                let (jobs, queue) = mpsc::unbounded_channel();
                runtime.spawn(batcher(pool.clone(), queue, Arc::clone(&secrets)));
                jobs
            })
            .collect();
        Ok(Pg {
            pool,
            queues,
            texts: Texts::default(),
            secrets,
            shown,
            target,
        })
    }

    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// A failure's message, without the password.
    fn failure(&self, error: &sqlx::Error) -> Failure {
        failure(error, &self.secrets)
    }

    /// Runs one statement through a batcher.
    pub(crate) async fn run(&self, sql: &str, params: Params) -> Outcome {
        let values = params.values();
        let types: Vec<ParamType> = values.iter().map(param_type).collect();
        let queue = &self.queues[batcher_of(values.first(), self.queues.len())];
        let (done, answer) = oneshot::channel();
        let job = Job {
            sql: self.texts.get(sql, &types),
            types,
            params,
            done,
        };
        if queue.send(job).is_err() {
            return Err(Failure::Transient("the PostgreSQL batchers stopped".into()));
        }
        answer.await.map_err(|_| {
            Failure::Transient("the PostgreSQL batcher stopped before answering".into())
        })?
    }

    /// Runs set-up SQL files, in order, each as one script, holding an advisory lock:
    /// runtimes started together (a consumer group's) would otherwise race on
    /// `CREATE ... IF NOT EXISTS`, which PostgreSQL does not make safe against a
    /// concurrent twin (a unique violation in its catalog), and one would fail to start.
    pub(crate) async fn prepare(
        &self,
        files: impl Iterator<Item = &SetupFile>,
    ) -> Result<(), String> {
        let failed = |e: &sqlx::Error| self.failure(e).message().to_owned();
        // One connection, closed rather than pooled when done: the lock is its
        // session's and goes with it, however the set-up ends (an error, a panic, a
        // cancelled future).
        let mut connection = self.pool.acquire().await.map_err(|e| failed(&e))?;
        connection.close_on_drop();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(SETUP_LOCK)
            .execute(&mut *connection)
            .await
            .map_err(|e| failed(&e))?;
        for file in files {
            sqlx::raw_sql(AssertSqlSafe(file.text.clone()))
                .execute(&mut *connection)
                .await
                .map_err(|e| format!("set-up file {}: {}", file.path.display(), failed(&e)))?;
        }
        Ok(())
    }

    pub(crate) async fn ready(&self) -> Result<(), String> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(|e| self.failure(&e).message().to_owned())
    }
}

fn failure(error: &sqlx::Error, secrets: &Secrets) -> Failure {
    let message = match error {
        // The server's message and its code; not its detail, which quotes the
        // statement's values.
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        other => other.to_string(),
    };
    let message = secrets.strip(&message);
    if super::is_transient(error) {
        Failure::Transient(message)
    } else {
        Failure::Permanent(message)
    }
}

/// The batcher of a statement whose first parameter is `key`: the same for the same
/// value (a statement without parameters: the first).
fn batcher_of(key: Option<&Value>, batchers: usize) -> usize {
    use std::hash::BuildHasher as _;
    let hasher = foldhash::fast::FixedState::default();
    let hash = match key {
        None | Some(Value::Null) => 0,
        Some(Value::String(s)) => hasher.hash_one(s.as_str()),
        Some(other) => hasher.hash_one(other.to_string()),
    };
    usize::try_from(hash % batchers.max(1) as u64).unwrap_or(0)
}

/// Takes what waits in its queue, up to a group, and runs it as one transaction;
/// ends when the backend is dropped.
async fn batcher(pool: PgPool, mut queue: mpsc::UnboundedReceiver<Job>, secrets: Arc<Secrets>) {
    let mut group: Vec<Job> = Vec::with_capacity(GROUP);
    let mut results: Vec<Outcome> = Vec::with_capacity(GROUP);
    while let Some(first) = queue.recv().await {
        group.push(first);
        while group.len() < GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        run_group(&pool, &mut group, &mut results, &secrets).await;
    }
}

/// Runs a group and answers each of its statements; leaves the buffers empty.
async fn run_group(
    pool: &PgPool,
    group: &mut Vec<Job>,
    results: &mut Vec<Outcome>,
    secrets: &Secrets,
) {
    results.clear();
    let committed = match pool.acquire().await {
        Ok(mut connection) => {
            let outcome = transaction(&mut connection, group, results, secrets).await;
            if outcome.is_err() {
                // Whatever state it is in, it goes: the pool opens a new one.
                connection.close_on_drop();
            }
            outcome.map_err(|e| {
                format!(
                    "the transaction did not commit, nothing of it was kept: {}",
                    failure(&e, secrets).message()
                )
            })
        }
        Err(e) => Err(format!(
            "no connection to the database: {}",
            failure(&e, secrets).message()
        )),
    };
    if let Err(reason) = committed {
        results.clear();
        results.resize_with(group.len(), || Err(Failure::Transient(reason.clone())));
    }
    for (job, result) in group.drain(..).zip(results.drain(..)) {
        let Job { params, done, .. } = job;
        // Let go of a shared call before answering, so that its last reference is
        // the caller's and it is freed on the thread that made it.
        drop(params);
        let _ = done.send(result);
    }
}

/// The group in one transaction; each statement's outcome goes into `results`.
/// `Err`: the transaction did not commit (the connection failed, or the COMMIT).
///
/// First without savepoints, which cost a round trip per statement: nearly every
/// group has no failing statement. When one fails, the database has aborted the
/// transaction, so it is rolled back and the whole group runs again with a savepoint
/// around each statement, where a failing statement fails alone.
async fn transaction(
    connection: &mut PgConnection,
    group: &[Job],
    results: &mut Vec<Outcome>,
    secrets: &Secrets,
) -> Result<(), sqlx::Error> {
    connection
        .execute(sqlx::raw_sql(const_sql("BEGIN")))
        .await?;
    for job in group {
        match statement(connection, job).await {
            Ok(answer) => results.push(Ok(answer)),
            // Nothing ran, or it ran and only its answer cannot be given: the
            // transaction goes on.
            Err(StatementError::Answer(failure)) => results.push(Err(failure)),
            Err(StatementError::Sql(error)) if is_statement_error(&error) => {
                connection
                    .execute(sqlx::raw_sql(const_sql("ROLLBACK")))
                    .await?;
                results.clear();
                return with_savepoints(connection, group, results, secrets).await;
            }
            Err(StatementError::Sql(error)) => return Err(error),
        }
    }
    connection
        .execute(sqlx::raw_sql(const_sql("COMMIT")))
        .await?;
    Ok(())
}

/// Whether the database refused the statement itself (a constraint, a type, a
/// syntax error), which aborts the transaction but leaves the connection usable.
fn is_statement_error(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(_)) && !super::is_transient(error)
}

/// The group in one transaction, each statement in a savepoint.
async fn with_savepoints(
    connection: &mut PgConnection,
    group: &[Job],
    results: &mut Vec<Outcome>,
    secrets: &Secrets,
) -> Result<(), sqlx::Error> {
    connection
        .execute(sqlx::raw_sql(const_sql("BEGIN; SAVEPOINT onex_statement")))
        .await?;
    for job in group {
        // A savepoint that its statement left alone is released, and a new one taken;
        // after a rollback to it, it is still there.
        if results.last().is_some_and(Result::is_ok) {
            connection
                .execute(sqlx::raw_sql(const_sql(
                    "RELEASE SAVEPOINT onex_statement; SAVEPOINT onex_statement",
                )))
                .await?;
        }
        match statement(connection, job).await {
            Ok(answer) => results.push(Ok(answer)),
            Err(error) => {
                let rolled_back = connection
                    .execute(sqlx::raw_sql(const_sql(
                        "ROLLBACK TO SAVEPOINT onex_statement",
                    )))
                    .await;
                match (error, rolled_back) {
                    // The connection is gone: the statement's own error says why.
                    (StatementError::Sql(e), Err(_)) => return Err(e),
                    (StatementError::Answer(_), Err(e)) => return Err(e),
                    (StatementError::Sql(e), Ok(_)) => results.push(Err(failure(&e, secrets))),
                    (StatementError::Answer(failure), Ok(_)) => results.push(Err(failure)),
                }
            }
        }
    }
    connection
        .execute(sqlx::raw_sql(const_sql("COMMIT")))
        .await?;
    Ok(())
}

fn const_sql(sql: &'static str) -> SqlStr {
    SqlStr::from_static(sql)
}

/// Why one statement failed: the database said so, or its answer cannot be given.
enum StatementError {
    Sql(sqlx::Error),
    Answer(Failure),
}

impl From<sqlx::Error> for StatementError {
    fn from(error: sqlx::Error) -> StatementError {
        StatementError::Sql(error)
    }
}

async fn statement(connection: &mut PgConnection, job: &Job) -> Result<Value, StatementError> {
    let values = job.params.values();
    let types: Vec<PgTypeInfo> = job.types.iter().map(|t| t.type_info()).collect();
    let prepared = connection.prepare_with(job.sql.clone(), &types).await?;
    let expected = match prepared.parameters() {
        Some(sqlx::Either::Left(declared)) => declared.len(),
        Some(sqlx::Either::Right(count)) => count,
        None => values.len(),
    };
    if expected != values.len() {
        return Err(StatementError::Answer(Failure::Permanent(format!(
            "the statement takes {expected} parameter(s), query_params gives {}",
            values.len()
        ))));
    }
    let arguments = arguments(values).map_err(sqlx::Error::Encode)?;
    if prepared.columns().is_empty() {
        let done = prepared
            .query_with(arguments)
            .execute(&mut *connection)
            .await?;
        return Ok(json!({"rows_affected": done.rows_affected()}));
    }
    let rows = prepared
        .query_with(arguments)
        .fetch_all(&mut *connection)
        .await?;
    let rows = rows
        .iter()
        .map(row_json)
        .collect::<Result<Vec<Value>, String>>()
        .map_err(|e| StatementError::Answer(Failure::Permanent(e)))?;
    Ok(json!({"rows": rows}))
}

fn row_json(row: &PgRow) -> Result<Value, String> {
    let mut map = Map::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let value = row.try_get_raw(i).map_err(|e| e.to_string())?;
        let json = if value.is_null() {
            Value::Null
        } else {
            let type_name = value.type_info().name().to_owned();
            let bytes = value.as_bytes().map_err(|e| e.to_string())?;
            column_json(&type_name, bytes)
                .map_err(|e| format!("column `{}` ({type_name}): {e}", column.name()))?
        };
        map.insert(column.name().to_owned(), json);
    }
    Ok(Value::Object(map))
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A column value as JSON, from PostgreSQL's binary format of its type (prepared
/// statements answer in binary): text types as strings, integers and floats as
/// numbers, numeric as a number (text if it has no finite JSON number, such as
/// NaN), bool, json and jsonb as the JSON they hold, timestamptz as RFC 3339 text in
/// UTC, timestamp and date as ISO 8601 text, uuid as text. Another type is an error
/// that names it: cast the column (`::text`) in the query.
pub(crate) fn column_json(type_name: &str, bytes: &[u8]) -> Result<Value, String> {
    let fixed = |n: usize| -> Result<&[u8], String> {
        if bytes.len() == n {
            Ok(bytes)
        } else {
            Err(format!("expected {n} bytes, got {}", bytes.len()))
        }
    };
    // Lengths checked by `fixed`.
    let be2 = |b: &[u8]| -> [u8; 2] { b.try_into().unwrap_or([0; 2]) };
    let be4 = |b: &[u8]| -> [u8; 4] { b.try_into().unwrap_or([0; 4]) };
    let be8 = |b: &[u8]| -> [u8; 8] { b.try_into().unwrap_or([0; 8]) };
    Ok(match type_name {
        "TEXT" | "VARCHAR" | "CHAR" | "NAME" | "\"CHAR\"" | "UNKNOWN" | "CITEXT" => {
            Value::String(text(bytes)?.to_owned())
        }
        "INT2" => Value::from(i16::from_be_bytes(be2(fixed(2)?))),
        "INT4" => Value::from(i32::from_be_bytes(be4(fixed(4)?))),
        "INT8" => Value::from(i64::from_be_bytes(be8(fixed(8)?))),
        "OID" => Value::from(u32::from_be_bytes(be4(fixed(4)?))),
        "FLOAT4" => float(f64::from(f32::from_be_bytes(be4(fixed(4)?)))),
        "FLOAT8" => float(f64::from_be_bytes(be8(fixed(8)?))),
        "BOOL" => Value::Bool(fixed(1)?[0] != 0),
        "NUMERIC" => numeric(bytes)?,
        "JSON" => serde_json::from_str(text(bytes)?).map_err(|e| e.to_string())?,
        "JSONB" => match bytes.split_first() {
            Some((1, json)) => serde_json::from_str(text(json)?).map_err(|e| e.to_string())?,
            _ => return Err("unknown jsonb format version".into()),
        },
        "TIMESTAMPTZ" | "TIMESTAMP" => {
            let micros = i64::from_be_bytes(be8(fixed(8)?));
            match micros {
                i64::MAX => Value::from("infinity"),
                i64::MIN => Value::from("-infinity"),
                _ => {
                    let at = micros
                        .checked_add(POSTGRES_EPOCH_MICROS)
                        .ok_or("timestamp out of range")
                        .and_then(|m| {
                            jiff::Timestamp::from_microsecond(m)
                                .map_err(|_| "timestamp out of range")
                        })?;
                    if type_name == "TIMESTAMPTZ" {
                        Value::String(at.to_string())
                    } else {
                        Value::String(jiff::tz::Offset::UTC.to_datetime(at).to_string())
                    }
                }
            }
        }
        "DATE" => {
            let days = i32::from_be_bytes(be4(fixed(4)?));
            match days {
                i32::MAX => Value::from("infinity"),
                i32::MIN => Value::from("-infinity"),
                _ => {
                    let micros = i64::from(days) * 86_400_000_000 + POSTGRES_EPOCH_MICROS;
                    let at = jiff::Timestamp::from_microsecond(micros)
                        .map_err(|_| "date out of range")?;
                    Value::String(jiff::tz::Offset::UTC.to_datetime(at).date().to_string())
                }
            }
        }
        "UUID" => {
            let b = fixed(16)?;
            let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
            Value::String(format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            ))
        }
        other => {
            return Err(format!(
                "the db handler does not return values of type {other}; cast it in the query \
                 (`::text`)"
            ));
        }
    })
}

fn text(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| e.to_string())
}

/// A float as a JSON number; NaN and the infinities, which JSON has no number for,
/// as text.
fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

/// A numeric from its binary format (base-10000 digits with a weight, a sign and a
/// display scale) as a JSON number: an integer when it has no fraction and fits, else
/// a float; NaN and the infinities as text.
fn numeric(bytes: &[u8]) -> Result<Value, String> {
    let word = |i: usize| -> Result<u16, String> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated numeric".to_owned())
    };
    let count = usize::from(word(0)?);
    let weight = i64::from(word(1)?.cast_signed());
    let sign = word(2)?;
    let scale = usize::from(word(3)?);
    match sign {
        0xC000 => return Ok(Value::from("NaN")),
        0xD000 => return Ok(Value::from("Infinity")),
        0xF000 => return Ok(Value::from("-Infinity")),
        _ => {}
    }
    let digit = |i: i64| -> Result<u16, String> {
        if i < 0 || i >= i64::try_from(count).unwrap_or(i64::MAX) {
            Ok(0)
        } else {
            word(4 + usize::try_from(i).unwrap_or(0))
        }
    };
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            let d = digit(i)?;
            if i == 0 {
                out.push_str(&d.to_string());
            } else {
                out.push_str(&format!("{d:04}"));
            }
        }
    }
    if scale > 0 {
        let mut fraction = String::new();
        let mut i = weight + 1;
        while fraction.len() < scale {
            fraction.push_str(&format!("{:04}", digit(i)?));
            i += 1;
        }
        fraction.truncate(scale);
        out.push('.');
        out.push_str(&fraction);
    }
    if scale == 0
        && let Ok(i) = out.parse::<i64>()
    {
        return Ok(Value::from(i));
    }
    Ok(out
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::String(out), Value::Number))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error as the server sends one: a message and a SQLSTATE.
    #[derive(Debug)]
    pub(crate) struct ServerError {
        pub code: &'static str,
        pub message: String,
    }

    impl std::fmt::Display for ServerError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.message)
        }
    }

    impl std::error::Error for ServerError {}

    impl sqlx::error::DatabaseError for ServerError {
        fn message(&self) -> &str {
            &self.message
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.code))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    pub(crate) fn server_error(code: &'static str, message: &str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(ServerError {
            code,
            message: message.to_owned(),
        }))
    }

    #[test]
    fn json_values_bind_as_their_own_types() {
        let types: Vec<ParamType> = [
            json!("a"),
            json!(7),
            json!(-7),
            json!(u64::MAX),
            json!(1.5),
            json!(true),
            Value::Null,
            json!([1]),
            json!({"k": 1}),
        ]
        .iter()
        .map(param_type)
        .collect();
        use ParamType::*;
        assert_eq!(
            types,
            [Text, Int8, Int8, Float8, Float8, Bool, Text, Jsonb, Jsonb]
        );
        let names: Vec<String> = types
            .iter()
            .map(|t| t.type_info().name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "TEXT", "INT8", "INT8", "FLOAT8", "FLOAT8", "BOOL", "TEXT", "JSONB", "JSONB"
            ]
        );
        let bound =
            arguments(&[json!("a"), json!(7), Value::Null, json!({"k": 1})]).expect("binds");
        assert_eq!(bound.len(), 4);
    }

    /// The first list of parameter types keeps the contract's text; another gets a
    /// text of its own, so that no connection binds it against the first's types.
    #[test]
    fn each_list_of_parameter_types_gets_its_own_statement_text() {
        use ParamType::*;
        let texts = Texts::default();
        let sql = "UPDATE t SET n = $2 WHERE id = $1";
        let first = texts.get(sql, &[Text, Int8]);
        assert_eq!(first.as_str(), sql);
        assert_eq!(texts.get(sql, &[Text, Int8]).as_str(), sql);
        let other = texts.get(sql, &[Text, Text]);
        assert_eq!(
            other.as_str(),
            format!("{sql}\n-- onex: parameter types text, text")
        );
        assert_eq!(texts.get(sql, &[Text, Text]).as_str(), other.as_str());
    }

    #[test]
    fn statements_on_one_key_go_to_one_batcher() {
        let of = |key: Value| batcher_of(Some(&key), 8);
        assert_eq!(of(json!("node-1")), of(json!("node-1")));
        assert_eq!(of(json!(42)), of(json!(42)));
        let spread: std::collections::HashSet<usize> =
            (0..64).map(|n| of(json!(format!("node-{n}")))).collect();
        assert!(
            spread.len() > 4,
            "keys spread over the batchers: {spread:?}"
        );
        assert_eq!(batcher_of(None, 8), 0);
        assert_eq!(batcher_of(Some(&json!("x")), 1), 0);
    }

    /// Binary column values (as prepared statements answer) as JSON.
    #[test]
    fn columns_map_to_json() {
        let ok = |name: &str, bytes: &[u8]| column_json(name, bytes).expect(name);
        assert_eq!(ok("TEXT", b"a b"), json!("a b"));
        assert_eq!(ok("VARCHAR", b"v"), json!("v"));
        assert_eq!(ok("INT2", &(-2i16).to_be_bytes()), json!(-2));
        assert_eq!(ok("INT4", &7i32.to_be_bytes()), json!(7));
        assert_eq!(ok("INT8", &(1i64 << 40).to_be_bytes()), json!(1i64 << 40));
        assert_eq!(ok("FLOAT4", &1.5f32.to_be_bytes()), json!(1.5));
        assert_eq!(ok("FLOAT8", &0.25f64.to_be_bytes()), json!(0.25));
        assert_eq!(ok("FLOAT8", &f64::NAN.to_be_bytes()), json!("NaN"));
        assert_eq!(ok("BOOL", &[1]), json!(true));
        assert_eq!(ok("JSON", br#"{"a": [1]}"#), json!({"a": [1]}));
        assert_eq!(ok("JSONB", b"\x01{\"a\": 2}"), json!({"a": 2}));
        // 2024-06-01T12:00:00.5Z, in microseconds from 2000-01-01.
        let micros = 1_717_243_200_500_000i64 - POSTGRES_EPOCH_MICROS;
        assert_eq!(
            ok("TIMESTAMPTZ", &micros.to_be_bytes()),
            json!("2024-06-01T12:00:00.5Z")
        );
        assert_eq!(
            ok("TIMESTAMP", &micros.to_be_bytes()),
            json!("2024-06-01T12:00:00.5")
        );
        assert_eq!(
            ok("TIMESTAMPTZ", &i64::MAX.to_be_bytes()),
            json!("infinity")
        );
        assert_eq!(ok("DATE", &(-1i32).to_be_bytes()), json!("1999-12-31"));
        assert_eq!(
            ok("UUID", &[0x12; 16]),
            json!("12121212-1212-1212-1212-121212121212")
        );
        let refused = column_json("BYTEA", b"\x00").expect_err("bytea");
        assert!(
            refused.contains("BYTEA") && refused.contains("::text"),
            "{refused}"
        );
        assert!(column_json("INT4", &[0, 1]).is_err(), "a short value");
    }

    /// numeric's binary format: digit count, weight, sign, scale, base-10000 digits.
    #[test]
    fn numerics_map_to_json_numbers() {
        let numeric = |weight: i16, sign: u16, scale: u16, digits: &[u16]| {
            let mut bytes = Vec::new();
            for word in [
                u16::try_from(digits.len()).expect("count"),
                weight.cast_unsigned(),
                sign,
                scale,
            ]
            .iter()
            .chain(digits)
            {
                bytes.extend_from_slice(&word.to_be_bytes());
            }
            column_json("NUMERIC", &bytes).expect("numeric")
        };
        assert_eq!(numeric(1, 0, 0, &[12, 3456]), json!(123_456));
        assert_eq!(numeric(0, 0x4000, 0, &[42]), json!(-42));
        assert_eq!(numeric(0, 0, 2, &[3, 2500]), json!(3.25));
        assert_eq!(numeric(-1, 0, 4, &[5]), json!(0.0005));
        assert_eq!(numeric(-2, 0, 8, &[12]), json!(0.000_000_12));
        assert_eq!(numeric(0, 0, 0, &[]), json!(0));
        assert_eq!(numeric(0, 0xC000, 0, &[]), json!("NaN"));
    }

    #[test]
    fn failures_keep_the_server_message_and_code_and_say_if_worth_retrying() {
        let secrets = Secrets::default();
        assert_eq!(
            failure(
                &server_error(
                    "23505",
                    "duplicate key value violates unique constraint \"t_pkey\""
                ),
                &secrets
            ),
            Failure::Permanent(
                "duplicate key value violates unique constraint \"t_pkey\" (SQLSTATE 23505)".into()
            )
        );
        assert!(matches!(
            failure(&server_error("40P01", "deadlock detected"), &secrets),
            Failure::Transient(_)
        ));
        assert!(matches!(
            failure(&sqlx::Error::PoolTimedOut, &secrets),
            Failure::Transient(_)
        ));
    }

    #[test]
    fn urls_of_other_databases_are_refused() {
        let refused = Pg::connect("mysql://root:hunter2@db/reg").expect_err("mysql");
        assert!(refused.contains("postgres://"), "{refused}");
        assert!(!refused.contains("hunter2"), "{refused}");
        let refused = Pg::connect("db.example:5432").expect_err("no scheme");
        assert!(refused.contains("not a PostgreSQL URL"), "{refused}");
    }
}
