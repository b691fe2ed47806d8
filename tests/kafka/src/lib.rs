//! Real, throwaway Kafka-compatible brokers for tests.
//!
//! [`shared_broker`] gives tests a broker that the test process shares: the first call
//! starts it with `tests/kafka/broker`, and it is stopped and its directory removed
//! once the process is gone, however it ends (exit, panic, SIGKILL). Tests keep out of
//! each other's way by naming their topics and consumer groups with a
//! [`unique_prefix`]. With `ONEX_TEST_KAFKA` set (`host:port`, or a comma-separated
//! list) the shared broker is that one instead. [`private_broker`] gives a fault test a
//! broker of its own, to stop, kill and start again; its topics, messages and committed
//! offsets survive that.
//!
//! ```ignore
//! let broker = onex_test_kafka::shared_broker();
//! let prefix = onex_test_kafka::unique_prefix(); // "t3f9c0a17d2b4."
//! let topic = format!("{prefix}events");
//! // ClientConfig::new().set("bootstrap.servers", broker.bootstrap()) ...
//! ```
//!
//! The broker is tansu (<https://github.com/tansu-io/tansu>), a Kafka-compatible
//! broker in one process with its data in SQLite, standing in for Apache Kafka: onex
//! itself is pointed at the user's own Kafka. The script builds tansu 0.6.0 with
//! `cargo install` into a cache outside the clone when it is missing (once, about 11
//! minutes); see `tests/kafka/broker`.
//!
//! Everything here blocks (std::process), so it works in plain tests and inside
//! `#[tokio::test]` alike, with no runtime of its own, and depends on no Kafka client.
//! When a broker cannot be had it panics with the reason: a test that needs Kafka
//! fails, it never skips.

use std::hash::{BuildHasher as _, RandomState};
use std::io::Read as _;
use std::net::{TcpStream, ToSocketAddrs as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

#[cfg(test)]
mod tests;

/// The script that installs, starts, stops and removes brokers.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/broker");

/// Names a broker of the user's own, used instead of starting one.
const BROKER_VARIABLE: &str = "ONEX_TEST_KAFKA";

/// The broker that a test process's tests share.
#[derive(Debug)]
pub struct Broker {
    bootstrap: String,
    /// Kept for the life of the process: never dropped (it is in a static), it removes
    /// the broker when the process is gone. None for the user's broker.
    _process: Option<Process>,
}

impl Broker {
    /// The client's `bootstrap.servers`: `127.0.0.1:PORT`, or `ONEX_TEST_KAFKA`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }
}

/// The broker the test process's tests share: started by the first call, or the
/// user's broker named by `ONEX_TEST_KAFKA`. Other tests use it at the same time:
/// name topics and consumer groups with a [`unique_prefix`].
///
/// # Panics
///
/// When the broker cannot be started (or `ONEX_TEST_KAFKA` names none that accepts
/// connections), with the reason; every later call panics with the same reason.
pub fn shared_broker() -> &'static Broker {
    /// The broker, or why it could not be had: a failure is kept, so that every test
    /// fails at once with the same reason rather than each trying again.
    static SHARED: OnceLock<Result<Broker, String>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| match std::env::var(BROKER_VARIABLE) {
        Ok(bootstrap) if !bootstrap.trim().is_empty() => {
            user_broker(bootstrap.trim()).map(|bootstrap| Broker {
                bootstrap,
                _process: None,
            })
        }
        _ => Process::start().map(|process| Broker {
            bootstrap: process.bootstrap(),
            _process: Some(process),
        }),
    });
    match shared {
        Ok(broker) => broker,
        Err(error) => panic!("{error}"),
    }
}

/// A prefix for a test's topic and consumer group names that no other test, in this
/// process or another, uses: `t` and 12 random hexadecimal digits and a dot, such as
/// `t3f9c0a17d2b4.`. Random rather than counted, because the user's broker keeps the
/// topics of earlier runs.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // RandomState's keys are random per process; the counter and the clock tell calls
    // and processes apart on top of that.
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let hash = RandomState::new().hash_one((
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos,
    ));
    format!("t{:012x}.", hash & 0xffff_ffff_ffff)
}

/// A broker of a test's own, for fault tests that stop, kill and restart it: its own
/// directory, data and port. Its topics, messages and committed consumer-group offsets
/// survive a [`stop`](Self::stop) or [`kill`](Self::kill) and a [`start`](Self::start),
/// on the same port. Dropping it stops it and removes its directory.
#[derive(Debug)]
pub struct PrivateBroker {
    process: Process,
}

/// Starts a [`PrivateBroker`]. It always needs the tansu binary (`ONEX_TEST_KAFKA`
/// plays no part: a user's broker is not the tests' to stop).
///
/// # Panics
///
/// When the broker cannot be started, with the reason.
pub fn private_broker() -> PrivateBroker {
    match Process::start() {
        Ok(process) => PrivateBroker { process },
        Err(error) => panic!("{error}"),
    }
}

impl PrivateBroker {
    /// The client's `bootstrap.servers`: `127.0.0.1:PORT`, the same across restarts.
    pub fn bootstrap(&self) -> String {
        self.process.bootstrap()
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// Stops the broker gracefully (SIGTERM), keeping its data: connections are refused
    /// until [`start`](Self::start). tansu gives open connections 5 s to finish, so this
    /// takes 5 s while a client is connected (a fraction of a second otherwise);
    /// [`kill`](Self::kill) is immediate. Stopping a stopped broker does nothing.
    ///
    /// # Panics
    ///
    /// When the script fails, with its reason.
    pub fn stop(&self) {
        self.process
            .script("stop")
            .unwrap_or_else(|error| panic!("{error}"));
    }

    /// Stops the broker at once (SIGKILL), as if it had crashed, keeping its data:
    /// connections are refused until [`start`](Self::start). Killing a stopped broker
    /// does nothing.
    ///
    /// # Panics
    ///
    /// When the script fails, with its reason.
    pub fn kill(&self) {
        self.process
            .script("kill")
            .unwrap_or_else(|error| panic!("{error}"));
    }

    /// Starts the broker again after a [`stop`](Self::stop) or [`kill`](Self::kill),
    /// on the same port and with the same data; it accepts connections when this
    /// returns. Starting a running broker does nothing.
    ///
    /// # Panics
    ///
    /// When the broker does not start (such as when another process took its port
    /// meanwhile), with the end of its log.
    pub fn start(&self) {
        self.process
            .script("restart")
            .unwrap_or_else(|error| panic!("{error}"));
    }
}

/// A broker started by `broker watch`, which stops it and removes its directory when
/// the pipe to its standard input closes: when this value is dropped, or when the test
/// process ends, whatever way (the kernel closes the pipe; statics are never dropped).
#[derive(Debug)]
struct Process {
    dir: PathBuf,
    port: u16,
    watch: Child,
}

impl Process {
    fn start() -> Result<Process, String> {
        let dir = unused_dir();
        let mut watch = script_command("watch", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("could not run {SCRIPT}: {error}"))?;
        // The script closes its stdout and stderr once the broker is ready (or it has
        // given up): read both to the end, stderr on a thread so that a long message
        // cannot fill the pipe while stdout is read.
        let mut stderr = watch.stderr.take().expect("stderr is piped");
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let mut stdout = String::new();
        let _ = watch
            .stdout
            .take()
            .expect("stdout is piped")
            .read_to_string(&mut stdout);
        let errors = errors.join().unwrap_or_default();
        match stdout.trim().parse() {
            Ok(port) => {
                // Such as "building tansu": shown with the test's output.
                eprint!("{errors}");
                Ok(Process { dir, port, watch })
            }
            Err(_) => {
                let status = watch.wait().map(|status| status.to_string());
                Err(format!(
                    "{SCRIPT} could not start a Kafka broker (tansu) in {} ({}):\n{errors}",
                    dir.display(),
                    status.unwrap_or_else(|error| error.to_string())
                ))
            }
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs `broker COMMAND DIR`: its error is its stderr.
    fn script(&self, command: &str) -> Result<(), String> {
        let output = script_command(command, &self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("could not run {SCRIPT}: {error}"))?;
        if output.status.success() {
            // Such as a graceful stop that had to kill.
            eprint!("{}", String::from_utf8_lossy(&output.stderr));
            Ok(())
        } else {
            Err(format!(
                "{SCRIPT} {command} {} failed ({}):\n{}",
                self.dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // End of file on its standard input: the script stops the broker and removes its
        // directory, the same way as when the test process is gone. Wait for it, so that
        // the broker is gone when the drop returns.
        drop(self.watch.stdin.take());
        let _ = self.watch.wait();
    }
}

/// `bash tests/kafka/broker COMMAND DIR`, in a process group of its own: a Ctrl-C at
/// the terminal ends the tests but must not interrupt a start or a stop half-way (nor
/// the build of tansu, which would then start again from scratch).
fn script_command(command: &str, dir: &Path) -> Command {
    let mut script = Command::new("bash");
    script.arg(SCRIPT).arg(command).arg(dir).process_group(0);
    script
}

/// A directory for a new broker, in the temporary directory, that does not exist yet
/// (the script creates it).
fn unused_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let dir = std::env::temp_dir().join(format!(
            "onex-kafka-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if !dir.exists() {
            return dir;
        }
    }
}

/// Checks the user's `ONEX_TEST_KAFKA`: a comma-separated list of `host:port`, one of
/// which accepts TCP connections. A broker that is not there fails the tests at once
/// with this message, rather than each test's client retrying until it times out.
fn user_broker(bootstrap: &str) -> Result<String, String> {
    let servers: Vec<&str> = bootstrap.split(',').map(str::trim).collect();
    for server in &servers {
        let port = server
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok());
        if port.is_none() {
            return Err(format!(
                "{BROKER_VARIABLE}={bootstrap}: {server:?} is not host:port (such as localhost:9092)"
            ));
        }
    }
    let mut refused = Vec::new();
    for server in servers {
        let addresses = match server.to_socket_addrs() {
            Ok(addresses) => addresses,
            Err(error) => {
                refused.push(format!("{server}: {error}"));
                continue;
            }
        };
        for address in addresses {
            match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
                Ok(_) => return Ok(bootstrap.to_owned()),
                Err(error) => refused.push(format!("{server} ({address}): {error}")),
            }
        }
    }
    Err(format!(
        "{BROKER_VARIABLE}={bootstrap}: no broker accepts connections there: {}",
        refused.join("; ")
    ))
}
