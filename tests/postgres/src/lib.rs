//! Real, throwaway PostgreSQL for tests.
//!
//! [`fresh_database`] gives a test an empty database of its own, on a server that the
//! test process shares: the first call starts it with `tests/postgres/server` (which
//! installs Debian's PostgreSQL 15 packages when the binaries are missing), and the
//! server is stopped and its directory removed once the process is gone, however it
//! ends (exit, panic, SIGKILL). With `ONEX_TEST_DATABASE_URL` set
//! (`postgres://user:password@host:5432/postgres`) the databases are made on that
//! server instead. [`private_server`] gives a fault test a server of its own, to kill
//! and start again.
//!
//! ```ignore
//! let database = onex_test_postgres::fresh_database();
//! let pool = sqlx::PgPool::connect(database.url()).await?;
//! ```
//!
//! Everything here blocks (std::process and `psql`), so it works in plain tests and
//! inside `#[tokio::test]` alike, with no runtime of its own. When PostgreSQL cannot be
//! had it panics with the reason: a test that needs a database fails, it never skips.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use onex_test_service::Watched;

#[cfg(test)]
mod tests;

/// The script that initialises, starts, stops and removes servers.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/server");

/// Names a server of the user's own, used instead of starting one.
const URL_VARIABLE: &str = "ONEX_TEST_DATABASE_URL";

/// An empty database of one test's own; dropping it drops the database.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    /// The server's maintenance database, from which this one is dropped.
    admin_url: &'static str,
}

impl TestDatabase {
    /// `postgres://postgres@127.0.0.1:PORT/NAME` (or the user's server's URL with this
    /// database in it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `onex_test_<pid>_<n>`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // FORCE: connections a test left open (a pool not yet closed) must not keep the
        // database alive. Errors are ignored: a drop must not panic during a panic, and
        // a database left on a throwaway server goes with it.
        let _ = psql(
            self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A new, empty database on the test process's shared server, started by the first
/// call (or on the server of `ONEX_TEST_DATABASE_URL`).
///
/// # Panics
///
/// When the server cannot be started or the database cannot be created.
pub fn fresh_database() -> TestDatabase {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let admin_url = shared_server_url();
    loop {
        let name = format!(
            "onex_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        match psql(admin_url, &format!("CREATE DATABASE {name}")) {
            Ok(_) => {
                return TestDatabase {
                    url: with_database(admin_url, &name),
                    name,
                    admin_url,
                };
            }
            // Left on a user's server by an earlier process that had the same pid and
            // was killed: take the next name.
            Err(error) if error.contains("already exists") => {}
            Err(error) => panic!("could not create the test database {name}: {error}"),
        }
    }
}

/// A PostgreSQL server of a test's own, for fault tests that stop and restart it:
/// its own directory and port. Dropping it stops it and removes its directory.
///
/// Unlike the shared server it commits synchronously: with `synchronous_commit=off`,
/// transactions committed in the last fraction of a second before a [`kill`](Self::kill)
/// could be lost, and fault tests count on what was committed.
#[derive(Debug)]
pub struct PrivateServer {
    server: Watched,
}

/// Starts a [`PrivateServer`].
///
/// # Panics
///
/// When the server cannot be started, with the reason.
pub fn private_server() -> PrivateServer {
    private_server_with(&[])
}

/// A [`PrivateServer`] with these server settings (`NAME=VALUE`) added, such as
/// `ssl=on` and its certificate files for a test of TLS.
///
/// # Panics
///
/// When the server cannot be started, with the reason.
pub fn private_server_with(settings: &[&str]) -> PrivateServer {
    let mut all = vec!["synchronous_commit=on"];
    all.extend_from_slice(settings);
    match start_server(&all) {
        Ok(server) => PrivateServer { server },
        Err(error) => panic!("{error}"),
    }
}

impl PrivateServer {
    /// `postgres://postgres@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        server_url(&self.server, database)
    }

    /// Creates an empty database and returns its URL.
    ///
    /// # Panics
    ///
    /// When `name` is not lowercase letters, digits and `_` (so that it needs no quoting
    /// in SQL or in the URL), or when the server refuses.
    pub fn create_database(&self, name: &str) -> String {
        let plain = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        assert!(
            plain,
            "database name {name:?}: use lowercase letters, digits and _"
        );
        let url = self.url("postgres");
        if let Err(error) = psql(&url, &format!("CREATE DATABASE {name}")) {
            panic!("could not create database {name}: {error}");
        }
        self.url(name)
    }

    /// Stops the server at once, as if it had crashed (`pg_ctl -m immediate`), keeping
    /// its data: connections are then refused until [`start`](Self::start).
    pub fn kill(&self) {
        self.server
            .script("kill")
            .unwrap_or_else(|error| panic!("{error}"));
    }

    /// Starts the server again, on the same port, after a [`kill`](Self::kill); it
    /// accepts connections when this returns.
    pub fn start(&self) {
        self.server
            .script("restart")
            .unwrap_or_else(|error| panic!("{error}"));
    }
}

/// Starts a server with `server watch` (tests/service) with these settings added: it is
/// stopped and its directory removed when the value is dropped or the test process
/// ends, whatever way.
fn start_server(settings: &[&str]) -> Result<Watched, String> {
    Watched::start(SCRIPT, "postgres", "PostgreSQL", settings)
}

fn server_url(server: &Watched, database: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{database}", server.port())
}

/// The shared server's maintenance database; started on the first call.
struct Shared {
    admin_url: String,
    /// Kept for the life of the process: never dropped, it stops the server when the
    /// process is gone.
    _server: Option<Watched>,
}

/// The shared server, or why it could not be had: a failure is kept, so that every
/// test fails at once with the same reason rather than each trying again.
static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

fn shared_server_url() -> &'static str {
    let shared = SHARED.get_or_init(|| match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.is_empty() => {
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Ok(Shared {
                    admin_url: url,
                    _server: None,
                })
            } else {
                Err(format!(
                    "{URL_VARIABLE} must be a URL, postgres://user:password@host:port/postgres"
                ))
            }
        }
        _ => start_server(&[]).map(|server| Shared {
            admin_url: server_url(&server, "postgres"),
            _server: Some(server),
        }),
    });
    match shared {
        Ok(shared) => &shared.admin_url,
        Err(error) => panic!("{error}"),
    }
}

/// Runs one SQL statement with `psql` and returns what it printed: one row a line,
/// columns separated by `|`.
/// Runs `sql` with psql on the database at `url`: its rows, one per line, columns
/// separated by `|` (psql's unaligned, tuples-only output), or psql's error.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let output = Command::new(psql_program())
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-d", url, "-c", sql])
        // A server that does not answer fails the test rather than hanging it.
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|error| {
            format!("could not run psql ({error}); it is in Debian's postgresql-client package")
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr)
            .trim_end()
            .to_owned())
    }
}

/// PostgreSQL 15's own psql when it is there: Debian's `psql` on PATH is a Perl
/// wrapper that chooses a version, which doubles the time of a short statement.
fn psql_program() -> &'static str {
    const DEBIAN_PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
    if std::path::Path::new(DEBIAN_PSQL).exists() {
        DEBIAN_PSQL
    } else {
        "psql"
    }
}

/// `url` with its database replaced by `name` (or added): user, password, host, port
/// and parameters stay. The authority ends at the first `/`, `?` or `#` (characters a
/// password has to percent-encode in a URL).
fn with_database(url: &str, name: &str) -> String {
    let authority = url.find("://").map_or(0, |scheme| scheme + 3);
    let path = authority
        + url[authority..]
            .find(['/', '?', '#'])
            .unwrap_or(url.len() - authority);
    let rest = path + url[path..].find(['?', '#']).unwrap_or(url.len() - path);
    format!("{}/{name}{}", &url[..path], &url[rest..])
}
