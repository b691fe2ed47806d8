use super::*;
use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `sql` prints on the database at `url`; panics with psql's error.
fn query(url: &str, sql: &str) -> String {
    psql(url, sql).unwrap_or_else(|error| panic!("{sql}: {error}"))
}

/// Does anything accept connections on this port of 127.0.0.1?
fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn a_fresh_database_is_empty_and_usable() {
    let database = fresh_database();
    assert!(
        database
            .name()
            .starts_with(&format!("onex_test_{}_", std::process::id()))
    );
    assert_eq!(
        database.url(),
        with_database(database.admin_url, database.name())
    );
    let url = database.url();
    assert_eq!(query(url, "SELECT current_database()"), database.name());
    assert_eq!(
        query(
            url,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
    query(url, "CREATE TABLE t (id int PRIMARY KEY, name text)");
    query(url, "INSERT INTO t VALUES (1, 'één')");
    assert_eq!(query(url, "SELECT id, name FROM t"), "1|één");
}

#[test]
fn two_fresh_databases_are_distinct() {
    let (a, b) = (fresh_database(), fresh_database());
    assert_ne!(a.name(), b.name());
    query(a.url(), "CREATE TABLE only_in_a (id int)");
    assert_eq!(
        query(b.url(), "SELECT to_regclass('only_in_a') IS NULL"),
        "t"
    );
}

#[test]
fn a_dropped_database_is_gone() {
    let database = fresh_database();
    let name = database.name().to_owned();
    // An open connection does not keep it alive (DROP ... WITH (FORCE)).
    let mut session = Command::new(psql_program())
        .args(["-X", "-q", "-d", database.url()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run psql");
    let admin_url = database.admin_url;
    let connected = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'");
    let deadline = Instant::now() + Duration::from_secs(10);
    while query(admin_url, &connected) == "0" {
        assert!(Instant::now() < deadline, "psql connects to {name}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let gone = format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'");
    assert_eq!(query(admin_url, &gone), "1");
    drop(database);
    assert_eq!(query(admin_url, &gone), "0");
    drop(session.stdin.take());
    let _ = session.wait();
}

#[test]
fn databases_can_be_made_by_many_tests_at_once() {
    let threads: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(|| query(fresh_database().url(), "SELECT 1")))
        .collect();
    for thread in threads {
        assert_eq!(thread.join().expect("a thread made its database"), "1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_inside_an_async_test() {
    let database = fresh_database();
    assert_eq!(query(database.url(), "SELECT 1"), "1");
}

#[test]
fn a_private_server_can_be_killed_and_started_again_with_its_data() {
    let server = private_server();
    let url = server.create_database("fault");
    assert_eq!(url, server.url("fault"));
    query(&url, "CREATE TABLE kept (id int)");
    query(&url, "INSERT INTO kept VALUES (42)");

    server.kill();
    assert!(
        !listening(server.server.port()),
        "a killed server refuses connections"
    );
    assert!(psql(&url, "SELECT 1").is_err());
    server.kill(); // killing a stopped server is no error

    server.start();
    assert_eq!(query(&url, "SELECT id FROM kept"), "42");
    server.start(); // nor is starting a running one
}

#[test]
fn a_dropped_private_server_is_stopped_and_removed() {
    let server = private_server();
    let (dir, port) = (server.server.dir().to_owned(), server.server.port());
    assert!(dir.join("data").is_dir());
    assert!(listening(port));
    drop(server);
    assert!(!dir.exists(), "{} is removed", dir.display());
    assert!(!listening(port));
}

#[test]
fn a_server_that_cannot_start_says_why_and_leaves_nothing() {
    let error = start_server(&["no_such_setting=1"]).expect_err("the server refuses the setting");
    assert!(
        error.contains("unrecognized configuration parameter \"no_such_setting\""),
        "{error}"
    );
    let dir = error
        .split_whitespace()
        .find(|word| word.contains("onex-postgres-"))
        .expect("the error names the directory");
    assert!(!Path::new(dir).exists(), "{dir} is removed");
}

#[test]
fn a_database_url_keeps_all_but_the_database() {
    for (url, expected) in [
        (
            "postgres://u:p@db:5432/postgres",
            "postgres://u:p@db:5432/x",
        ),
        (
            "postgres://u:p%2F%40@db/postgres?sslmode=require",
            "postgres://u:p%2F%40@db/x?sslmode=require",
        ),
        ("postgresql://db:5432", "postgresql://db:5432/x"),
        (
            "postgresql://db?sslmode=disable",
            "postgresql://db/x?sslmode=disable",
        ),
        ("postgres://[::1]:5432/a/b", "postgres://[::1]:5432/x"),
    ] {
        assert_eq!(with_database(url, "x"), expected, "{url}");
    }
}

/// Set in the child process of the watchdog test.
const WATCHDOG_CHILD: &str = "ONEX_TEST_POSTGRES_WATCHDOG_CHILD";

/// The child process of `servers_of_a_killed_test_process_are_removed`: starts the
/// shared server and a private one, says where they are, and waits to be killed.
/// Does nothing in an ordinary run.
#[test]
fn watchdog_child() {
    if std::env::var_os(WATCHDOG_CHILD).is_none() {
        return;
    }
    let private = private_server();
    let _database = fresh_database();
    let shared = match SHARED.get() {
        Some(Ok(Shared {
            _server: Some(server),
            ..
        })) => server,
        _ => panic!("the shared server was started"),
    };
    for server in [&private.server, shared] {
        println!("server {} {}", server.port(), server.dir().display());
    }
    // Killed long before this; if the parent is gone, end anyway.
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn servers_of_a_killed_test_process_are_removed() {
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "tests::watchdog_child", "--nocapture"])
        .env(WATCHDOG_CHILD, "1")
        .env_remove(URL_VARIABLE)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the test binary again");
    let mut servers = Vec::new();
    let lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    for line in lines.map_while(Result::ok) {
        if let Some((port, dir)) = line.strip_prefix("server ").and_then(|s| s.split_once(' ')) {
            servers.push((port.parse::<u16>().expect("a port"), PathBuf::from(dir)));
            if servers.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(servers.len(), 2, "the child started two servers");
    for (port, dir) in &servers {
        assert!(listening(*port) && dir.is_dir());
    }

    // SIGKILL: no unwinding, no destructors, no exit handlers.
    child.kill().expect("kill the child");
    child.wait().expect("the child ends");

    let deadline = Instant::now() + Duration::from_secs(10);
    for (port, dir) in &servers {
        while dir.exists() || listening(*port) {
            assert!(
                Instant::now() < deadline,
                "the server on port {port} in {} is still there 10 s after its test process was killed",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
