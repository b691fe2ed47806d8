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
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use onex_test_service::Watched;

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
    _process: Option<Watched>,
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
        _ => start_broker().map(|process| Broker {
            bootstrap: bootstrap_of(&process),
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
    process: Watched,
}

/// Starts a [`PrivateBroker`]. It always needs the tansu binary (`ONEX_TEST_KAFKA`
/// plays no part: a user's broker is not the tests' to stop).
///
/// # Panics
///
/// When the broker cannot be started, with the reason.
pub fn private_broker() -> PrivateBroker {
    match start_broker() {
        Ok(process) => PrivateBroker { process },
        Err(error) => panic!("{error}"),
    }
}

impl PrivateBroker {
    /// The client's `bootstrap.servers`: `127.0.0.1:PORT`, the same across restarts.
    pub fn bootstrap(&self) -> String {
        bootstrap_of(&self.process)
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.process.port()
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

/// Starts a broker with `broker watch` (tests/service): it is stopped and its directory
/// removed when the value is dropped or the test process ends, whatever way.
fn start_broker() -> Result<Watched, String> {
    Watched::start(SCRIPT, "kafka", "a Kafka broker (tansu)", &[])
}

fn bootstrap_of(broker: &Watched) -> String {
    format!("127.0.0.1:{}", broker.port())
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
