//! The topics a run needs: created when missing, and the partition count of the
//! consumed ones checked to be one and the same.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;

use super::{CONNECT_TIMEOUT, KafkaSettings, Watch};

/// Makes sure every topic of `wanted` exists; returns each one's partition count.
pub async fn ensure(
    settings: &KafkaSettings,
    watch: &Watch,
    wanted: &[String],
) -> Result<HashMap<String, u32>, String> {
    let admin: AdminClient<Watch> = settings
        .client_config(|_| {})
        .create_with_context(watch.clone())
        .map_err(|e| format!("Kafka admin client: {}", settings.redact(&e.to_string())))?;
    let admin = std::sync::Arc::new(admin);
    let counts = partition_counts(&admin, settings).await?;
    let missing: Vec<&String> = wanted.iter().filter(|t| !counts.contains_key(*t)).collect();
    if missing.is_empty() {
        return Ok(counts);
    }
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|name| {
            let replication = TopicReplication::Fixed(settings.replication_factor);
            NewTopic::new(name.as_str(), settings.partitions as i32, replication)
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(CONNECT_TIMEOUT));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| {
            format!(
                "Kafka: cannot create topics: {}",
                settings.redact(&e.to_string())
            )
        })?;
    for result in results {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, partitions = settings.partitions, "Kafka: created topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(format!("Kafka: cannot create topic `{name}`: {code}"));
            }
        }
    }
    // A new topic shows in the metadata a moment after it is created.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let counts = partition_counts(&admin, settings).await?;
        if wanted.iter().all(|t| counts.contains_key(t)) {
            return Ok(counts);
        }
        if Instant::now() > deadline {
            let absent: Vec<&str> = wanted
                .iter()
                .filter(|t| !counts.contains_key(*t))
                .map(String::as_str)
                .collect();
            return Err(format!(
                "Kafka: topics created but not seen in the metadata: {}",
                absent.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn partition_counts(
    admin: &std::sync::Arc<AdminClient<Watch>>,
    settings: &KafkaSettings,
) -> Result<HashMap<String, u32>, String> {
    let admin = std::sync::Arc::clone(admin);
    let metadata = tokio::task::spawn_blocking(move || {
        admin
            .inner()
            .fetch_metadata(None, CONNECT_TIMEOUT)
            .map(|m| {
                m.topics()
                    .iter()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                    .map(|t| (t.name().to_owned(), t.partitions().len() as u32))
                    .collect::<HashMap<_, _>>()
            })
    })
    .await
    .map_err(|e| e.to_string())?;
    metadata.map_err(|e| {
        format!(
            "Kafka: no answer from {} within {} s: {}",
            crate::url::redact_text(&settings.brokers),
            CONNECT_TIMEOUT.as_secs(),
            settings.redact(&e.to_string())
        )
    })
}

/// The one partition count of the consumed topics. A key's instance must find all its
/// events on one partition number, which range assignment gives the same runtime.
pub fn common_count(consumed: &[String], counts: &HashMap<String, u32>) -> Result<u32, String> {
    let mut seen: Vec<(&str, u32)> = consumed
        .iter()
        .filter_map(|t| counts.get(t).map(|c| (t.as_str(), *c)))
        .collect();
    seen.sort_by_key(|(_, c)| *c);
    match (seen.first(), seen.last()) {
        (Some((_, low)), Some((_, high))) if low != high => Err(format!(
            "the consumed topics have different partition counts ({}): an instance's events must arrive on one partition number; give them one count",
            seen.iter()
                .map(|(t, c)| format!("{t}: {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (Some((_, count)), _) => Ok(*count),
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumed_topics_must_share_one_partition_count() {
        let counts: HashMap<String, u32> = [
            ("a".to_owned(), 6),
            ("b".to_owned(), 6),
            ("c".to_owned(), 3),
        ]
        .into_iter()
        .collect();
        assert_eq!(common_count(&["a".into(), "b".into()], &counts), Ok(6));
        let error = common_count(&["a".into(), "c".into()], &counts).expect_err("6 and 3");
        assert!(error.contains("c: 3, a: 6"), "{error}");
        assert_eq!(common_count(&[], &counts), Ok(0));
    }
}
