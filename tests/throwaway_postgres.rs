//! Throwaway PostgreSQL servers for tests: a stand-in with the API of the
//! `onex-test-postgres` crate (tests/postgres/) until that crate is merged, after
//! which the tests use it instead and this file goes. Included by `#[path]` from the
//! test binaries that need PostgreSQL (handlers/tests/postgres.rs, tests/testsuite).
//!
//! [`fresh_database`] creates a database of its own on a server started once per test
//! process (in a temporary directory, on a free loopback port, `fsync=off`), and drops
//! it when the returned value is dropped; the server stops when the process ends.
//! [`private_server`] starts a server of its own, for tests that stop and restart it.
//! The server binaries are PostgreSQL's (`/usr/lib/postgresql/*/bin`, or the
//! directory in `ONEX_TEST_PG_BIN`). `initdb` and `postgres` refuse to run as root:
//! as root, they run as the `postgres` user. A test that needs PostgreSQL fails
//! when it cannot start one; it is never skipped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A database on the shared server, dropped with this value.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    port: u16,
}

impl TestDatabase {
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = psql(
            self.port,
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A new, empty database on the shared server (started on first use).
pub fn fresh_database() -> TestDatabase {
    static SHARED: OnceLock<Server> = OnceLock::new();
    let server = SHARED.get_or_init(|| {
        let server = Server::start();
        server.stop_when_this_process_ends();
        server
    });
    server.database()
}

/// A server of its own, stopped and removed when dropped.
pub fn private_server() -> PrivateServer {
    let server = Server::start();
    let database = server.database();
    PrivateServer { server, database }
}

#[derive(Debug)]
pub struct PrivateServer {
    server: Server,
    database: TestDatabase,
}

impl PrivateServer {
    /// A database on it.
    pub fn url(&self) -> &str {
        self.database.url()
    }

    /// Stops it at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop(&self) {
        self.server.pg_ctl(&["stop", "-m", "immediate"]);
    }

    /// Starts it again, on the same port, and waits until it takes connections.
    pub fn start(&self) {
        self.server
            .pg_ctl(&["start", "-w", "-o", &self.server.options()]);
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        // It may be stopped already (a test that failed while it was).
        let _ = self.server.try_pg_ctl(&["stop", "-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.server.dir);
    }
}

#[derive(Debug)]
struct Server {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

static DATABASES: AtomicUsize = AtomicUsize::new(0);

impl Server {
    fn start() -> Server {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("onex-test-pg-")
            .tempdir()
            .expect("a temporary directory for PostgreSQL")
            .keep();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server = Server { dir, port, bin };
        if is_root() {
            let owned = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&server.dir)
                .status()
                .expect("chown runs");
            assert!(
                owned.success(),
                "cannot give {} to postgres",
                server.dir.display()
            );
        }
        let data = server.data();
        server.run(
            &server.bin.join("initdb"),
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        server.pg_ctl(&["start", "-w", "-o", &server.options()]);
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.display()
        )
    }

    fn pg_ctl(&self, args: &[&str]) {
        if let Err(e) = self.try_pg_ctl(args) {
            panic!("{e}");
        }
    }

    fn try_pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let data = self.data();
        let log = self.dir.join("log");
        let mut all = vec!["-D", path(&data), "-l", path(&log)];
        all.extend_from_slice(args);
        self.try_run(&self.bin.join("pg_ctl"), &all)
    }

    fn run(&self, program: &Path, args: &[&str]) {
        if let Err(e) = self.try_run(program, args) {
            panic!("{e}");
        }
    }

    /// Runs a server binary (as `postgres` when this process is root).
    fn try_run(&self, program: &Path, args: &[&str]) -> Result<(), String> {
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{} cannot run: {e}", program.display()))?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "{} {args:?} failed: {}{}\n{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        ))
    }

    fn database(&self) -> TestDatabase {
        let name = format!(
            "onex_test_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        psql(self.port, "postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("cannot create a test database: {e}"));
        TestDatabase {
            url: format!("postgres://postgres@127.0.0.1:{}/{name}", self.port),
            name,
            port: self.port,
        }
    }

    /// A watcher that stops the server and removes its directory once this process
    /// is gone (a shared server lives in a static, which is never dropped).
    fn stop_when_this_process_ends(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = format!(
            "{}{} -D {} -m immediate stop",
            if is_root() {
                "runuser -u postgres -- "
            } else {
                ""
            },
            pg_ctl.display(),
            self.data().display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        let mut watcher = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the server's watcher starts");
        // It outlives this process; a thread waits on it meanwhile.
        std::thread::spawn(move || watcher.wait());
    }
}

/// Runs one SQL command with psql as the `postgres` user, over TCP.
fn psql(port: u16, database: &str, sql: &str) -> Result<(), String> {
    let output = Command::new(bin_dir().join("psql"))
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &port.to_string(), "-d", database, "-c", sql])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ONEX_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop().expect(
        "PostgreSQL's server binaries (initdb, pg_ctl) are needed: install postgresql, or set \
         ONEX_TEST_PG_BIN to their directory",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
