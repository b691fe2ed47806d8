//! The node registry on PostgreSQL (`onex run --database-url`), and the registration
//! contracts' SQL in both dialects: the real `onex` on a real server (tests/postgres),
//! and the contracts' own statements run through the `db` handler on each backend.

use std::path::Path;
use std::sync::Arc;

use onex_handlers::db::{Database, DbHandler};
use onex_runtime::handler::{Call, Config, Handler};
use onex_runtime::project::Project;
use onex_test_postgres::{TestDatabase, fresh_database};
use serde_json::{Map, Value, json};

use crate::postgres::count as pg_count;
use crate::run::{count, reducer, run};
use crate::support::{onex, onex_env, path_str, repo_root};

/// A database of its own for one test.
fn database() -> TestDatabase {
    fresh_database()
}

/// Runs `future` on a runtime of its own (the tests are synchronous).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Rows of a query whose columns are text.
fn pg_rows(url: &str, sql: &str) -> Vec<Vec<String>> {
    crate::postgres::rows(url, sql)
        .iter()
        .map(|line| line.split('|').map(str::to_owned).collect())
        .collect()
}

#[test]
fn the_demo_registers_every_node_in_postgres_and_loses_none() {
    let db = database();
    // The test server trusts every connection; the password is there to be hidden.
    let url = db.url().replace("postgres@", "postgres:pa55word@");
    let dir = tempfile::tempdir().expect("tempdir");
    let (run, summary) = run(dir.path(), &["--demo", "1000", "--database-url", &url]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        summary["demo"],
        json!({"entities": 1000, "reached_outcome": 1000, "lost": 0})
    );
    let registration = reducer(&summary, "registration");
    assert_eq!(
        registration["outcomes"],
        json!({"complete": 1001, "failed": 0, "partial": 0})
    );
    assert_eq!(summary["events"]["dead_letters"], 0);
    let shown = summary["handlers"]["db"].as_str().expect("db");
    assert!(
        shown.starts_with("PostgreSQL postgres://***@127.0.0.1:"),
        "{shown}"
    );
    assert!(!run.stdout.contains("pa55word") && !run.stderr.contains("pa55word"));

    // 1,000 simulated nodes and the registry, which registers itself too.
    let url = db.url();
    assert_eq!(
        pg_count(url, "SELECT count(*) FROM node_registrations"),
        1001
    );
    assert_eq!(
        pg_count(
            url,
            "SELECT count(*) FROM node_registrations WHERE last_heartbeat IS NULL \
             OR current_state <> 'alive'"
        ),
        0
    );
    let types = pg_rows(
        url,
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_name = 'node_registrations' AND column_name IN \
         ('capabilities', 'endpoints', 'metadata', 'last_heartbeat', 'registered_at', \
          'updated_at', 'current_state') ORDER BY column_name",
    );
    let types: Vec<(String, String)> = types
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let jsonb = || "jsonb".to_owned();
    let tz = || "timestamp with time zone".to_owned();
    assert_eq!(
        types,
        [
            ("capabilities".to_owned(), jsonb()),
            ("current_state".to_owned(), "character varying".to_owned()),
            ("endpoints".to_owned(), jsonb()),
            ("last_heartbeat".to_owned(), tz()),
            ("metadata".to_owned(), jsonb()),
            ("registered_at".to_owned(), tz()),
            ("updated_at".to_owned(), tz()),
        ]
    );
    // The documents are JSON objects, not JSON strings holding one.
    assert_eq!(
        pg_count(
            url,
            "SELECT count(*) FROM node_registrations WHERE jsonb_typeof(endpoints) = 'object' \
             AND jsonb_typeof(capabilities) = 'object' AND jsonb_typeof(metadata) = 'object'"
        ),
        1001
    );
    // Each simulated node's health endpoint, queried as JSON.
    assert_eq!(
        pg_count(
            url,
            "SELECT count(*) FROM node_registrations \
             WHERE endpoints->>'health' = health_endpoint"
        ),
        1000
    );
    // The embedded database was not used; the local catalog keeps its own file.
    assert!(!dir.path().join("data.db").exists());
    assert_eq!(
        count(
            &dir.path().join("catalog.db"),
            "SELECT count(*) FROM service_catalog"
        ),
        1001
    );
}

#[test]
fn a_database_url_that_is_not_postgres_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = path_str(dir.path());
    let args = [
        "run",
        "--contract",
        "contracts/",
        "--until-idle",
        "--listen",
        "off",
        "--data-dir",
        data,
    ];
    let mut flag = args.to_vec();
    flag.extend(["--database-url", "mysql://root:hunter2@db.example/registry"]);
    let refused = onex(&flag);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("not a PostgreSQL URL")
            && refused.stderr.contains("postgres://")
            && !refused.stderr.contains("hunter2"),
        "{}",
        refused.stderr
    );
    // The conventional variable is read too, after ONEX_DATABASE_URL.
    let from_env = onex_env(&args, &[("DATABASE_URL", "sqlite://x.db")]);
    assert_eq!(from_env.code, 2, "{}", from_env.stderr);
    assert!(
        from_env.stderr.contains("sqlite://x.db"),
        "{}",
        from_env.stderr
    );
    let both = onex_env(
        &args,
        &[
            ("ONEX_DATABASE_URL", "redis://first"),
            ("DATABASE_URL", "sqlite://second"),
        ],
    );
    assert!(both.stderr.contains("redis://first"), "{}", both.stderr);
    // --help names the variable but never shows its value.
    let help = onex_env(
        &["run", "--help"],
        &[("ONEX_DATABASE_URL", "postgres://onex:topsecret@db/registry")],
    );
    assert!(help.stdout.contains("ONEX_DATABASE_URL"), "{}", help.stdout);
    assert!(!help.stdout.contains("topsecret"), "{}", help.stdout);
}

/// The project's contracts, loaded as `onex run` loads them.
fn registration_project() -> Project {
    let catalog = onex_runtime::catalog::Catalog::new(onex_handlers::DESCRIPTORS).expect("catalog");
    let loaded = onex_runtime::project::load(
        &repo_root().join("contracts/orchestrators/node_registration_orchestrator.yaml"),
        &catalog,
    );
    loaded.project.expect("the project's contracts load")
}

/// A call of the project's operation `name` with these rendered parameters.
fn call(project: &Project, name: &str, params: Value) -> Arc<Call> {
    let operation = project
        .operations
        .iter()
        .find(|o| &*o.name == name)
        .unwrap_or_else(|| panic!("no operation {name}"));
    let mut rendered = Map::new();
    rendered.insert("query_params".to_owned(), params);
    Arc::new(Call {
        operation: Arc::clone(&operation.name),
        config: Config::new(rendered, Arc::clone(&operation.written)),
        idempotency_key: Arc::from("k"),
        correlation_id: None,
        causation_id: None,
    })
}

const NODE: &str = "00000000-0000-4000-8000-000000000001";

/// The upsert's parameters: the node's own timestamp (its sign of life) and the
/// intent's time.
fn upsert_params(timestamp: &str, emitted_at: &str) -> Value {
    json!([
        NODE,
        "effect",
        "1.2.0",
        "{\"feature\":true}",
        "{\"health\":\"http://n/health\"}",
        "{}",
        "http://n/health",
        timestamp,
        emitted_at
    ])
}

/// The node's row as the handler answers: (registered_at, last_heartbeat,
/// updated_at, current_state).
async fn row(handler: &DbHandler) -> (Value, Value, Value, Value) {
    let select = Arc::new(Call {
        operation: Arc::from("select"),
        config: Config::from(
            json!({
                "query_template": "SELECT registered_at, last_heartbeat, updated_at, current_state \
                                   FROM node_registrations WHERE node_id = $1",
                "query_params": [NODE],
            })
            .as_object()
            .cloned()
            .expect("object"),
        ),
        idempotency_key: Arc::from("k"),
        correlation_id: None,
        causation_id: None,
    });
    let answer = handler.call(&select).await.expect("select");
    let row = &answer["rows"][0];
    (
        row["registered_at"].clone(),
        row["last_heartbeat"].clone(),
        row["updated_at"].clone(),
        row["current_state"].clone(),
    )
}

/// Upserting twice keeps `registered_at`; neither an upsert nor a heartbeat moves
/// `last_heartbeat` backwards, times in other zones compared as instants; expiry and
/// a heartbeat set `current_state`.
async fn the_registry_sql_behaves(handler: &DbHandler, project: &Project, dialect: &str) {
    assert_eq!(handler.dialect().as_str(), dialect);
    handler
        .prepare(project.setup_for(handler.name()))
        .await
        .expect("set-up");
    let t = |s: &str| json!(s);
    let upsert = |timestamp: &str, emitted: &str| {
        call(
            project,
            "upsert_registration",
            upsert_params(timestamp, emitted),
        )
    };
    handler
        .call(&upsert("2024-06-01T12:00:10Z", "2024-06-01T12:00:11Z"))
        .await
        .expect("first upsert");
    assert_eq!(
        row(handler).await,
        (
            t("2024-06-01T12:00:11Z"),
            t("2024-06-01T12:00:10Z"),
            t("2024-06-01T12:00:11Z"),
            t("alive")
        )
    );
    // A later upsert carrying an older timestamp: registered_at and the heartbeat
    // stay, updated_at moves.
    handler
        .call(&upsert("2024-06-01T12:00:05.5Z", "2024-06-01T12:00:20Z"))
        .await
        .expect("second upsert");
    assert_eq!(
        row(handler).await,
        (
            t("2024-06-01T12:00:11Z"),
            t("2024-06-01T12:00:10Z"),
            t("2024-06-01T12:00:20Z"),
            t("alive")
        )
    );
    let heartbeat = |at: &str| call(project, "record_heartbeat", json!([NODE, at]));
    // Older, as text too ("12:00:09.9Z" sorts after "12:00:10Z").
    handler
        .call(&heartbeat("2024-06-01T12:00:09.9Z"))
        .await
        .expect("older heartbeat");
    assert_eq!(row(handler).await.1, t("2024-06-01T12:00:10Z"));
    // Older as an instant, though later as text: 13:00 at +02:00 is 11:00 UTC.
    handler
        .call(&heartbeat("2024-06-01T13:00:00+02:00"))
        .await
        .expect("older heartbeat elsewhere");
    assert_eq!(row(handler).await.1, t("2024-06-01T12:00:10Z"));
    handler
        .call(&call(
            project,
            "mark_node_expired",
            json!([NODE, "2024-06-01T12:02:00Z"]),
        ))
        .await
        .expect("expired");
    assert_eq!(row(handler).await.3, t("expired"));
    // Newer as an instant, in another zone: it moves, and the node is alive again.
    handler
        .call(&heartbeat("2024-06-01T14:03:00+02:00"))
        .await
        .expect("newer heartbeat");
    let (registered, last, updated, state) = row(handler).await;
    assert_eq!(registered, t("2024-06-01T12:00:11Z"));
    let expected = if dialect == "postgres" {
        "2024-06-01T12:03:00Z"
    } else {
        "2024-06-01T14:03:00+02:00"
    };
    assert_eq!(last, t(expected));
    assert_eq!(updated, t("2024-06-01T12:02:00Z"));
    assert_eq!(state, t("alive"));
}

#[test]
fn the_registry_sql_keeps_registered_at_and_never_moves_heartbeats_back_on_postgres() {
    let db = database();
    let project = registration_project();
    block_on(async {
        let handler = DbHandler::postgres(db.url()).expect("handler");
        the_registry_sql_behaves(&handler, &project, "postgres").await;
    });
}

#[test]
fn the_registry_sql_keeps_registered_at_and_never_moves_heartbeats_back_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = registration_project();
    block_on(async {
        let handler = DbHandler::sqlite(Arc::new(Database::new(dir.path().join("data.db"))));
        the_registry_sql_behaves(&handler, &project, "sqlite").await;
    });
    assert!(Path::new(&dir.path().join("data.db")).exists());
}
