//! What `--kafka` and its companion options say, and the librdkafka configuration
//! made of them. Option values that are secrets are never shown: not by `Debug`, not
//! in `describe`, not in the errors librdkafka gives back.

use rdkafka::ClientConfig;

#[derive(Clone)]
pub struct KafkaSettings {
    /// `host:port,...`, librdkafka's `bootstrap.servers`.
    pub brokers: String,
    /// Put before every topic name: `dev.`, `prod.`, ... (empty: none).
    pub topic_prefix: String,
    /// Partitions of the topics onex creates. Several runtimes share the work up to
    /// this many.
    pub partitions: u32,
    pub replication_factor: i32,
    /// The consumer group of this orchestrator's runtimes.
    pub group: String,
    /// Where dead letters go besides the store (without the prefix).
    pub dead_letter_topic: String,
    /// librdkafka properties as given (`security.protocol`, `sasl.*`, `ssl.*`,
    /// tuning), applied last so that they win.
    pub options: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: Vec<String> = self
            .options
            .iter()
            .map(|(key, value)| format!("{key}={}", shown(key, value)))
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &crate::url::redact_text(&self.brokers))
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("group", &self.group)
            .field("options", &options)
            .finish_non_exhaustive()
    }
}

/// Whether a librdkafka property holds a secret (passwords, keys, tokens, JAAS and
/// OAuth configurations).
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "oauthbearer.config",
        "key.pem",
        "token",
    ]
    .iter()
    .any(|word| key.contains(word))
}

fn shown<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret(key) { "***" } else { value }
}

impl KafkaSettings {
    /// A client's settings: the brokers and onex's defaults, those of the client's
    /// role (`role`), then the user's options, which win over both.
    pub fn client_config(&self, role: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "onex")
            // librdkafka backs off up to 10 s between reconnects by default; a broker
            // back from an outage is then found up to 10 s late.
            .set("reconnect.backoff.max.ms", "1000")
            .set("retry.backoff.max.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "10000");
        role(&mut config);
        for (key, value) in &self.options {
            config.set(key, value);
        }
        config
    }

    /// `text` (an error of librdkafka's) with every secret option value hidden.
    pub fn redact(&self, text: &str) -> String {
        let mut text = crate::url::redact_text(text).into_owned();
        for (key, value) in &self.options {
            if is_secret(key) && !value.is_empty() {
                text = text.replace(value.as_str(), "***");
            }
        }
        text
    }

    /// A topic's name on the brokers: the prefix, then the contracts' name.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix)
    }

    /// The contracts' name of a topic on the brokers.
    pub fn unprefixed<'a>(&self, topic: &'a str) -> &'a str {
        topic.strip_prefix(&self.topic_prefix).unwrap_or(topic)
    }

    /// Kafka allows letters, digits, `.`, `_` and `-`, up to 249 characters.
    pub fn check_topic(name: &str) -> Result<(), String> {
        let valid = !name.is_empty()
            && name.len() <= 249
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(())
        } else {
            Err(format!(
                "`{}` is not a valid Kafka topic name (letters, digits, `.`, `_` and `-`, at most 249)",
                onex_diag::shorten(name)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(options: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "dev.".into(),
            partitions: 6,
            replication_factor: 1,
            group: "g".into(),
            dead_letter_topic: "onex.dlq.test.v1".into(),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn secret_option_values_are_never_shown() {
        let settings = settings(&[
            ("sasl.username", "alice"),
            ("sasl.password", "hunter2"),
            ("ssl.key.password", "k3y"),
        ]);
        let debug = format!("{settings:?}");
        assert!(debug.contains("sasl.username=alice"), "{debug}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("k3y"),
            "{debug}"
        );
        let error = settings.redact("Invalid value \"hunter2\" for sasl.password");
        assert_eq!(error, "Invalid value \"***\" for sasl.password");
    }

    #[test]
    fn topic_names_are_checked_and_prefixed() {
        let settings = settings(&[]);
        assert_eq!(settings.topic("onex.evt.a.v1"), "dev.onex.evt.a.v1");
        assert_eq!(settings.unprefixed("dev.onex.evt.a.v1"), "onex.evt.a.v1");
        assert!(KafkaSettings::check_topic("dev.onex.evt.node-a_b.v1").is_ok());
        for bad in ["", "..", "a/b", "a b", "a\u{1b}[31m"] {
            assert!(KafkaSettings::check_topic(bad).is_err(), "{bad:?}");
        }
    }
}
