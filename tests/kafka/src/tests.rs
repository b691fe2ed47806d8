use super::*;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Does anything accept connections on this port of 127.0.0.1?
fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Just enough of the Kafka protocol to show that a broker is a Kafka broker whose
/// topics persist: CreateTopics v2 and Metadata v1, the last versions before the
/// "flexible" encoding. This crate depends on no Kafka client; the tests of onex's
/// Kafka bus use a real one.
mod wire {
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream;
    use std::time::Duration;

    const CREATE_TOPICS: i16 = 19;
    const METADATA: i16 = 3;
    /// The error code of CreateTopics for a topic that exists.
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;

    /// One request and its response, on a connection of its own.
    fn call(bootstrap: &str, api_key: i16, version: i16, body: &[u8]) -> Vec<u8> {
        const CORRELATION_ID: i32 = 7;
        let mut request = Vec::new();
        request.extend_from_slice(&api_key.to_be_bytes());
        request.extend_from_slice(&version.to_be_bytes());
        request.extend_from_slice(&CORRELATION_ID.to_be_bytes());
        put_string(&mut request, "onex-test-kafka");
        request.extend_from_slice(body);
        let size = i32::try_from(request.len()).expect("a small request");

        let mut stream = TcpStream::connect(bootstrap)
            .unwrap_or_else(|error| panic!("connect to {bootstrap}: {error}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set a read timeout");
        stream.write_all(&size.to_be_bytes()).expect("send");
        stream.write_all(&request).expect("send");
        let mut size = [0; 4];
        stream.read_exact(&mut size).expect("a response");
        let mut response = vec![0; usize::try_from(i32::from_be_bytes(size)).expect("a size")];
        stream.read_exact(&mut response).expect("a whole response");
        let mut reader = Reader(&response);
        assert_eq!(
            reader.i32(),
            CORRELATION_ID,
            "the response's correlation id"
        );
        reader.0.to_vec()
    }

    fn put_string(buffer: &mut Vec<u8>, text: &str) {
        let length = i16::try_from(text.len()).expect("a short string");
        buffer.extend_from_slice(&length.to_be_bytes());
        buffer.extend_from_slice(text.as_bytes());
    }

    struct Reader<'a>(&'a [u8]);

    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> [u8; N] {
            let (head, rest) = self.0.split_first_chunk().expect("a longer response");
            self.0 = rest;
            *head
        }
        fn i16(&mut self) -> i16 {
            i16::from_be_bytes(self.take())
        }
        fn i32(&mut self) -> i32 {
            i32::from_be_bytes(self.take())
        }
        /// A (nullable) string; null is None.
        fn string(&mut self) -> Option<String> {
            let length = usize::try_from(self.i16()).ok()?;
            let (text, rest) = self.0.split_at(length);
            self.0 = rest;
            Some(String::from_utf8(text.to_vec()).expect("UTF-8"))
        }
        fn count(&mut self) -> usize {
            usize::try_from(self.i32()).expect("an array, not null")
        }
    }

    /// Creates a topic with this many partitions: the error code (0 when created).
    pub fn create_topic(bootstrap: &str, name: &str, partitions: i32) -> i16 {
        let mut body = 1i32.to_be_bytes().to_vec(); // one topic
        put_string(&mut body, name);
        body.extend_from_slice(&partitions.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes()); // replication factor
        body.extend_from_slice(&0i32.to_be_bytes()); // no replica assignments
        body.extend_from_slice(&0i32.to_be_bytes()); // no configs
        body.extend_from_slice(&10_000i32.to_be_bytes()); // timeout (ms)
        body.push(0); // validate only: false
        let response = call(bootstrap, CREATE_TOPICS, 2, &body);
        let mut reader = Reader(&response);
        reader.i32(); // throttle time
        assert_eq!(reader.count(), 1, "one topic in the response");
        assert_eq!(reader.string().as_deref(), Some(name));
        reader.i16()
    }

    /// What Metadata says of the cluster.
    #[derive(Debug)]
    pub struct Metadata {
        /// Where clients are told to connect: `host:port` of each broker.
        pub brokers: Vec<String>,
        /// Each topic's name and number of partitions.
        pub topics: Vec<(String, usize)>,
    }

    impl Metadata {
        /// The number of partitions of this topic, if it exists.
        pub fn partitions(&self, topic: &str) -> Option<usize> {
            self.topics
                .iter()
                .find(|(name, _)| name == topic)
                .map(|(_, partitions)| *partitions)
        }
    }

    /// The brokers and all topics (which creates none).
    pub fn metadata(bootstrap: &str) -> Metadata {
        let all_topics = (-1i32).to_be_bytes();
        let response = call(bootstrap, METADATA, 1, &all_topics);
        let mut reader = Reader(&response);
        let brokers = (0..reader.count())
            .map(|_| {
                reader.i32(); // node id
                let host = reader.string().expect("a host");
                let port = reader.i32();
                reader.string(); // rack
                format!("{host}:{port}")
            })
            .collect();
        reader.i32(); // controller id
        let topics = (0..reader.count())
            .map(|_| {
                let error = reader.i16();
                let name = reader.string().expect("a topic name");
                assert_eq!(error, 0, "topic {name}: error code {error}");
                reader.take::<1>(); // is internal
                let partitions = reader.count();
                for _ in 0..partitions {
                    reader.i16(); // error code
                    reader.i32(); // index
                    reader.i32(); // leader
                    for _ in 0..2 {
                        // replicas, in-sync replicas
                        for _ in 0..reader.count() {
                            reader.i32();
                        }
                    }
                }
                (name, partitions)
            })
            .collect();
        Metadata { brokers, topics }
    }
}

#[test]
fn the_shared_broker_is_a_kafka_broker_that_creates_topics() {
    let broker = shared_broker();
    assert!(
        std::ptr::eq(broker, shared_broker()),
        "one broker per process"
    );
    if std::env::var_os(BROKER_VARIABLE).is_none() {
        let port = broker
            .bootstrap()
            .strip_prefix("127.0.0.1:")
            .and_then(|port| port.parse::<u16>().ok())
            .expect("127.0.0.1:PORT");
        assert!(listening(port));
        // Clients connect where the broker says it is, so that must be where it is.
        assert_eq!(
            wire::metadata(broker.bootstrap()).brokers,
            [broker.bootstrap()]
        );
    }

    let topic = format!("{}events", unique_prefix());
    assert_eq!(wire::metadata(broker.bootstrap()).partitions(&topic), None);
    assert_eq!(wire::create_topic(broker.bootstrap(), &topic, 3), 0);
    assert_eq!(
        wire::metadata(broker.bootstrap()).partitions(&topic),
        Some(3)
    );
    assert_eq!(
        wire::create_topic(broker.bootstrap(), &topic, 3),
        wire::TOPIC_ALREADY_EXISTS
    );
}

#[test]
fn unique_prefixes_differ_and_are_valid_topic_names() {
    let prefixes: Vec<String> = (0..1000).map(|_| unique_prefix()).collect();
    for prefix in &prefixes {
        assert_eq!(prefix.len(), 14, "{prefix}");
        assert!(prefix.starts_with('t') && prefix.ends_with('.'), "{prefix}");
        assert!(
            prefix[1..13].chars().all(|c| c.is_ascii_hexdigit()),
            "{prefix}"
        );
    }
    let distinct: std::collections::HashSet<_> = prefixes.iter().collect();
    assert_eq!(distinct.len(), prefixes.len());
}

#[test]
fn a_private_broker_keeps_its_port_and_topics_across_a_stop_and_a_kill() {
    let broker = private_broker();
    let bootstrap = broker.bootstrap();
    assert_eq!(bootstrap, format!("127.0.0.1:{}", broker.port()));
    assert_eq!(wire::create_topic(&bootstrap, "kept", 2), 0);

    broker.stop();
    assert!(
        !listening(broker.port()),
        "a stopped broker refuses connections"
    );
    broker.stop(); // stopping a stopped broker is no error
    broker.start();
    assert_eq!(broker.bootstrap(), bootstrap);
    assert_eq!(wire::metadata(&bootstrap).partitions("kept"), Some(2));

    broker.kill();
    assert!(
        !listening(broker.port()),
        "a killed broker refuses connections"
    );
    broker.kill(); // nor is killing a stopped broker
    broker.start();
    assert_eq!(wire::metadata(&bootstrap).partitions("kept"), Some(2));
    assert_eq!(wire::create_topic(&bootstrap, "after", 1), 0);
    broker.start(); // nor is starting a running one
    assert_eq!(wire::metadata(&bootstrap).partitions("after"), Some(1));
}

#[test]
fn a_private_broker_whose_port_was_taken_does_not_start_and_says_why() {
    let broker = private_broker();
    assert_eq!(wire::create_topic(&broker.bootstrap(), "kept", 1), 0);
    broker.kill();
    // The killed broker's socket may take a moment to be released.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let squatter = loop {
        match TcpListener::bind(("127.0.0.1", broker.port())) {
            Ok(listener) => break listener,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(error) => panic!("take the port: {error}"),
        }
    };

    // It does not move to another port behind its clients' backs, nor take the
    // squatter's connections for its own.
    let error = broker
        .process
        .script("restart")
        .expect_err("the port is taken");
    assert!(error.contains("did not start again"), "{error}");
    assert!(
        error.contains("AddrInUse"),
        "the log tail says why: {error}"
    );

    drop(squatter);
    broker.start();
    assert_eq!(
        wire::metadata(&broker.bootstrap()).partitions("kept"),
        Some(1)
    );
}

#[test]
fn a_dropped_private_broker_is_stopped_and_removed() {
    let broker = private_broker();
    let (dir, port) = (broker.process.dir().to_owned(), broker.port());
    assert!(dir.join("tansu.db").is_file(), "its data is in SQLite");
    assert!(listening(port));
    drop(broker);
    assert!(!dir.exists(), "{} is removed", dir.display());
    assert!(!listening(port));
}

#[test]
fn a_user_broker_must_be_host_port_and_accept_connections() {
    for bootstrap in ["localhost", ":9092", "localhost:kafka", "a:1,b"] {
        let error = user_broker(bootstrap).expect_err(bootstrap);
        assert!(error.contains("is not host:port"), "{error}");
        assert!(error.starts_with("ONEX_TEST_KAFKA="), "{error}");
    }

    let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
    let open = listener.local_addr().expect("its address").port();
    let closed = {
        let other = TcpListener::bind("127.0.0.1:0").expect("another port");
        other.local_addr().expect("its address").port()
    };
    let bootstrap = format!("127.0.0.1:{closed}, localhost:{open}");
    assert_eq!(user_broker(&bootstrap).as_deref(), Ok(bootstrap.as_str()));
    let error = user_broker(&format!("127.0.0.1:{closed}")).expect_err("nothing listens");
    assert!(
        error.contains("no broker accepts connections there"),
        "{error}"
    );
}

/// Set in the child process of the watchdog test.
const WATCHDOG_CHILD: &str = "ONEX_TEST_KAFKA_WATCHDOG_CHILD";

/// Two parts in one test: the child it runs (the same test, with `WATCHDOG_CHILD` set)
/// starts the shared broker and a private one, says where they are and waits; this
/// test kills it with SIGKILL and watches both brokers go.
#[test]
fn brokers_of_a_killed_test_process_are_removed() {
    if std::env::var_os(WATCHDOG_CHILD).is_some() {
        let private = private_broker();
        let shared = shared_broker();
        let shared = shared
            ._process
            .as_ref()
            .expect("the shared broker was started");
        let mut stdout = std::io::stdout().lock();
        for process in [&private.process, shared] {
            writeln!(
                stdout,
                "broker {} {}",
                process.port(),
                process.dir().display()
            )
            .expect("tell the parent");
        }
        stdout.flush().expect("tell the parent");
        // Killed long before this; if the parent is gone, end anyway.
        std::thread::sleep(Duration::from_secs(60));
        return;
    }

    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "tests::brokers_of_a_killed_test_process_are_removed",
            "--nocapture",
        ])
        .env(WATCHDOG_CHILD, "1")
        .env_remove(BROKER_VARIABLE)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the test binary again");
    let mut brokers = Vec::new();
    let lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    for line in lines.map_while(Result::ok) {
        if let Some((port, dir)) = line.strip_prefix("broker ").and_then(|s| s.split_once(' ')) {
            brokers.push((port.parse::<u16>().expect("a port"), PathBuf::from(dir)));
            if brokers.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(brokers.len(), 2, "the child started two brokers");
    for (port, dir) in &brokers {
        assert!(listening(*port) && dir.is_dir());
    }

    // SIGKILL: no unwinding, no destructors, no exit handlers.
    child.kill().expect("kill the child");
    child.wait().expect("the child ends");

    let deadline = Instant::now() + Duration::from_secs(10);
    for (port, dir) in &brokers {
        while dir.exists() || listening(*port) {
            assert!(
                Instant::now() < deadline,
                "the broker on port {port} in {} is still there 10 s after its test process was killed",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
