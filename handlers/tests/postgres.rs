//! The `db` handler on a real PostgreSQL server: values bound and rows returned, a
//! statement that fails in a group fails alone, and a transaction that cannot commit
//! (its connection killed, the server stopped) fails every statement of it as
//! transient, keeps nothing, and the next calls succeed once the server is back.
//!
//! Statements whose first parameter is the same go to one batcher, in order: the
//! tests give a group's statements one first parameter, hold the batcher on a lock
//! another connection has, queue the group behind it, and let go.

use std::sync::Arc;
use std::time::{Duration, Instant};

use onex_handlers::db::DbHandler;
use onex_runtime::handler::{Call, Config, Failure, Handler, Outcome};
use serde_json::{Map, Value, json};
use sqlx::{Connection, Executor, PgConnection, Row};
use tokio::task::JoinHandle;

/// A database of its own for one test.
fn database() -> onex_test_postgres::TestDatabase {
    onex_test_postgres::fresh_database()
}

/// A call as the runtime makes one: the SQL as written, the parameters rendered.
fn call(sql: Value, params: Value) -> Arc<Call> {
    let mut rendered = Map::new();
    rendered.insert("query_params".into(), params);
    let mut written = Map::new();
    written.insert("query_template".into(), sql);
    Arc::new(Call {
        operation: Arc::from("op"),
        config: Config::new(rendered, Arc::new(written)),
        idempotency_key: Arc::from("k"),
        correlation_id: None,
        causation_id: None,
    })
}

/// Runs a call on a task of its own (so that it waits in the batcher's queue while
/// the test goes on).
fn spawn(handler: &Arc<DbHandler>, sql: &str, params: Value) -> JoinHandle<Outcome> {
    let handler = Arc::clone(handler);
    let call = call(json!(sql), params);
    tokio::spawn(async move { handler.call(&call).await })
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.expect("a test connection")
}

async fn set_up(url: &str, sql: &str) {
    connect(url)
        .await
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())))
        .await
        .expect("set-up");
}

/// The ids in `t`, in order.
async fn ids(url: &str) -> Vec<String> {
    sqlx::query("SELECT id FROM t ORDER BY id")
        .fetch_all(&mut connect(url).await)
        .await
        .expect("select")
        .iter()
        .map(|row| row.get::<String, _>(0))
        .collect()
}

/// Holds a lock on table `gate` until dropped (or `open`ed): a statement that reads
/// the table waits for it.
struct Gate(PgConnection);

impl Gate {
    async fn close(url: &str, table: &str) -> Gate {
        let mut connection = connect(url).await;
        connection
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))))
            .await
            .expect("lock");
        Gate(connection)
    }

    async fn open(mut self) {
        self.0.execute("COMMIT").await.expect("unlock");
    }
}

/// Waits until a session of the handler waits for the lock of `table` (a gate); its
/// pid. The statement is matched too: another session of the handler may wait on a
/// lock for a moment, and killing that one instead would leave the test waiting.
async fn waiting_batcher(url: &str, table: &str) -> i32 {
    let mut watcher = connect(url).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = 'onex' AND wait_event_type = 'Lock' \
             AND query LIKE '%FROM ' || $1 || ' WHERE%'",
        )
        .bind(table)
        .fetch_optional(&mut watcher)
        .await
        .expect("pg_stat_activity");
        if let Some(pid) = found {
            return pid;
        }
        assert!(Instant::now() < deadline, "no batcher waits for the gate");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lets calls spawned just now reach their batcher's queue.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

const SCHEMA: &str = "CREATE TABLE t (grp text, id text PRIMARY KEY, n int4, doc jsonb, \
                      at timestamptz, tx bigint); CREATE TABLE gate (x int); \
                      CREATE TABLE gate2 (x int)";
const INSERT: &str = "INSERT INTO t (grp, id, tx) VALUES ($1, $2, txid_current())";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_bind_by_type_and_rows_come_back_as_json() {
    let db = database();
    set_up(db.url(), SCHEMA).await;
    let handler = DbHandler::postgres(db.url()).expect("handler");
    let insert = call(
        json!({
            "sqlite": "not run here",
            "postgres": "INSERT INTO t (grp, id, n, doc, at) VALUES ($1, $2, $3, $4, $5::timestamptz)",
        }),
        json!(["g", "a", 7, {"k": [1, true]}, "2024-06-01T14:00:00+02:00"]),
    );
    assert_eq!(
        handler.call(&insert).await.expect("insert"),
        json!({"rows_affected": 1})
    );
    let select = call(
        json!(
            "SELECT id, n, doc, at, grp IS NULL AS no_grp, 1.5::float8 AS f, 2.50::numeric AS m, NULL::text AS nothing FROM t WHERE id = $1"
        ),
        json!(["a"]),
    );
    assert_eq!(
        handler.call(&select).await.expect("select"),
        json!({"rows": [{
            "id": "a", "n": 7, "doc": {"k": [1, true]}, "at": "2024-06-01T12:00:00Z",
            "no_grp": false, "f": 1.5, "m": 2.5, "nothing": null,
        }]})
    );
    let none = call(json!("SELECT id FROM t WHERE id = $1"), json!(["zz"]));
    assert_eq!(
        handler.call(&none).await.expect("select"),
        json!({"rows": []}),
        "a query that returns no rows still answers with rows"
    );
    // A value of another type than the first call's gets a statement of its own.
    let as_number = call(json!("SELECT $1 IS NULL AS missing"), json!([1]));
    let as_null = call(json!("SELECT $1 IS NULL AS missing"), json!([null]));
    assert_eq!(
        handler.call(&as_number).await.expect("number"),
        json!({"rows": [{"missing": false}]})
    );
    assert_eq!(
        handler.call(&as_null).await.expect("null"),
        json!({"rows": [{"missing": true}]})
    );
    let short = call(json!(INSERT), json!(["g"]));
    assert_eq!(
        handler.call(&short).await.expect_err("one parameter short"),
        Failure::Permanent("the statement takes 2 parameter(s), query_params gives 1".into())
    );
    let unknown = call(json!("SELECT $1::bytea AS b"), json!(["x"]));
    let refused = handler.call(&unknown).await.expect_err("bytea");
    assert!(
        matches!(&refused, Failure::Permanent(m) if m.contains("BYTEA")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_statement_fails_alone_and_the_rest_of_its_group_commits() {
    let db = database();
    set_up(db.url(), SCHEMA).await;
    let handler = Arc::new(DbHandler::postgres(db.url()).expect("handler"));
    let gate = Gate::close(db.url(), "gate").await;
    let waiting = spawn(
        &handler,
        "SELECT count(*) FROM gate WHERE $1 <> ''",
        json!(["g"]),
    );
    waiting_batcher(db.url(), "gate").await;
    let group = [
        spawn(&handler, INSERT, json!(["g", "a"])),
        spawn(&handler, INSERT, json!(["g", "a"])),
        spawn(&handler, INSERT, json!(["g", "b"])),
        spawn(
            &handler,
            "INSERT INTO t (grp, id, n) VALUES ($1, 'c', 'x')",
            json!(["g"]),
        ),
        spawn(&handler, "SELEC $1", json!(["g"])),
        spawn(&handler, INSERT, json!(["g", "d"])),
    ];
    settle().await;
    gate.open().await;
    waiting.await.expect("task").expect("the gate's statement");
    let mut outcomes = Vec::new();
    for task in group {
        outcomes.push(task.await.expect("task"));
    }
    let ok = json!({"rows_affected": 1});
    assert_eq!(outcomes[0].as_ref().expect("a"), &ok);
    assert!(
        matches!(&outcomes[1], Err(Failure::Permanent(m)) if m.contains("23505")),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(outcomes[2].as_ref().expect("b"), &ok);
    assert!(
        matches!(&outcomes[3], Err(Failure::Permanent(m)) if m.contains("22P02")),
        "{:?}",
        outcomes[3]
    );
    assert!(
        matches!(&outcomes[4], Err(Failure::Permanent(m)) if m.contains("42601")),
        "{:?}",
        outcomes[4]
    );
    assert_eq!(outcomes[5].as_ref().expect("d"), &ok);
    assert_eq!(ids(db.url()).await, ["a", "b", "d"]);
    let transactions: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT tx FROM t")
        .fetch_all(&mut connect(db.url()).await)
        .await
        .expect("tx");
    assert_eq!(transactions.len(), 1, "one transaction: {transactions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_mid_transaction_fails_its_whole_group_as_transient() {
    let db = database();
    set_up(db.url(), SCHEMA).await;
    let handler = Arc::new(DbHandler::postgres(db.url()).expect("handler"));
    let gate = Gate::close(db.url(), "gate").await;
    let waiting = spawn(
        &handler,
        "SELECT count(*) FROM gate WHERE $1 <> ''",
        json!(["g"]),
    );
    waiting_batcher(db.url(), "gate").await;
    // Queued behind the gate: two inserts run, then the group waits on `gate2`.
    let gate2 = Gate::close(db.url(), "gate2").await;
    let group = [
        spawn(&handler, INSERT, json!(["g", "c"])),
        spawn(&handler, INSERT, json!(["g", "d"])),
        spawn(
            &handler,
            "SELECT count(*) FROM gate2 WHERE $1 <> ''",
            json!(["g"]),
        ),
        spawn(&handler, INSERT, json!(["g", "e"])),
    ];
    settle().await;
    gate.open().await;
    waiting.await.expect("task").expect("the gate's statement");
    let batcher = waiting_batcher(db.url(), "gate2").await;
    let mut killer = connect(db.url()).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(batcher)
        .fetch_one(&mut killer)
        .await
        .expect("terminate");
    assert!(killed);
    for task in group {
        let outcome = task.await.expect("task");
        assert!(
            matches!(&outcome, Err(Failure::Transient(m)) if m.contains("did not commit")),
            "{outcome:?}"
        );
    }
    assert!(
        ids(db.url()).await.is_empty(),
        "nothing of the group was kept"
    );
    gate2.open().await;
    // The runner's retry: the same calls succeed on a new connection.
    for id in ["c", "d", "e"] {
        let again = call(json!(INSERT), json!(["g", id]));
        handler.call(&again).await.expect("after the kill");
    }
    assert_eq!(ids(db.url()).await, ["c", "d", "e"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_fails_calls_as_transient_until_it_is_back() {
    let server = onex_test_postgres::private_server();
    let url = server.create_database("handler");
    set_up(&url, SCHEMA).await;
    let handler = Arc::new(DbHandler::postgres(&url).expect("handler"));
    handler
        .call(&call(json!(INSERT), json!(["g", "a"])))
        .await
        .expect("before the stop");
    handler.ready().await.expect("ready");
    // A group in flight when the server stops: queued behind `gate`, it inserts b,
    // then waits on `gate2`.
    let gate = Gate::close(&url, "gate").await;
    let waiting = spawn(
        &handler,
        "SELECT count(*) FROM gate WHERE $1 <> ''",
        json!(["g"]),
    );
    waiting_batcher(&url, "gate").await;
    let gate2 = Gate::close(&url, "gate2").await;
    let group = [
        spawn(&handler, INSERT, json!(["g", "b"])),
        spawn(
            &handler,
            "SELECT count(*) FROM gate2 WHERE $1 <> ''",
            json!(["g"]),
        ),
        spawn(&handler, INSERT, json!(["g", "c"])),
    ];
    settle().await;
    gate.open().await;
    waiting.await.expect("task").expect("the gate's statement");
    waiting_batcher(&url, "gate2").await;
    server.kill();
    drop(gate2);
    for task in group {
        let outcome = task.await.expect("task");
        assert!(
            matches!(&outcome, Err(Failure::Transient(m)) if m.contains("did not commit")),
            "{outcome:?}"
        );
    }
    let down = handler.call(&call(json!(INSERT), json!(["g", "b"]))).await;
    assert!(matches!(down, Err(Failure::Transient(_))), "{down:?}");
    assert!(
        handler.ready().await.is_err(),
        "not ready while the server is down"
    );
    server.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match handler.call(&call(json!(INSERT), json!(["g", "b"]))).await {
            Ok(_) => break,
            Err(Failure::Transient(m)) => {
                assert!(Instant::now() < deadline, "still failing: {m}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    handler.ready().await.expect("ready again");
    assert_eq!(ids(&url).await, ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_is_shown_redacted_and_failures_never_show_the_password() {
    let db = database();
    // The test server trusts every connection, so a password in the URL is not
    // checked; it must still never be shown.
    let with_password = db.url().replace("postgres@", "postgres:s3cr%40t@");
    let handler = DbHandler::postgres(&with_password).expect("handler");
    assert!(
        !handler.describe().contains("s3cr"),
        "{}",
        handler.describe()
    );
    assert!(
        handler
            .describe()
            .starts_with("PostgreSQL postgres://***@127.0.0.1:")
    );
    let config = Config::default();
    assert_eq!(
        handler.target(&config),
        format!("127.0.0.1:{}/{}", port_of(db.url()), db.name())
    );
    let missing = call(
        json!("SELECT id FROM no_such_table WHERE id = $1"),
        json!(["x"]),
    );
    let failed = handler.call(&missing).await.expect_err("no table");
    assert!(
        matches!(&failed, Failure::Permanent(m) if m.contains("42P01") && !m.contains("s3cr")),
        "{failed:?}"
    );
}

fn port_of(url: &str) -> String {
    let after = url.rsplit_once(':').expect("a port").1;
    after.split('/').next().expect("port").to_owned()
}

/// Runtimes started together run the same set-up files on one database at once:
/// each starts, none fails on `CREATE ... IF NOT EXISTS` racing its twin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_up_files_run_by_runtimes_starting_together_all_succeed() {
    let setup = [onex_runtime::handler::SetupFile {
        variant: None,
        path: "contracts/sql/t.sql".into(),
        text: "CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, n BIGINT);\n\
               CREATE INDEX IF NOT EXISTS t_n ON t (n);\n\
               CREATE TABLE IF NOT EXISTS u (id TEXT PRIMARY KEY);"
            .into(),
    }];
    let setup = Arc::new(setup);
    for _round in 0..5 {
        let database = database();
        let starting: Vec<JoinHandle<Result<(), String>>> = (0..4)
            .map(|_| {
                let handler = DbHandler::postgres(database.url()).expect("a handler");
                let setup = Arc::clone(&setup);
                tokio::spawn(async move { handler.prepare(&setup[..]).await })
            })
            .collect();
        for started in starting {
            started.await.expect("joined").expect("set up");
        }
    }

    // A set-up that fails lets the next one have the lock.
    let database = database();
    let broken = [onex_runtime::handler::SetupFile {
        variant: None,
        path: "contracts/sql/broken.sql".into(),
        text: "CREATE TABLE IF NOT EXIST broken (id TEXT);".into(),
    }];
    let first = DbHandler::postgres(database.url()).expect("a handler");
    let error = first.prepare(&broken).await.expect_err("a syntax error");
    assert!(
        error.starts_with("set-up file contracts/sql/broken.sql: "),
        "{error}"
    );
    let second = DbHandler::postgres(database.url()).expect("a handler");
    tokio::time::timeout(Duration::from_secs(10), second.prepare(&setup[..]))
        .await
        .expect("the lock was released")
        .expect("set up");
}
