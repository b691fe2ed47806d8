//! The Kafka bus against librdkafka's mock cluster: the real protocol on a loopback
//! port (produce, consumer groups, rebalances, offset commits), inside `cargo test`.
//! The end-to-end tests run the same bus against a real broker process.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{KafkaBus, KafkaSettings};
use crate::bus::partitions::partition_of;
use crate::bus::{Bus, Incoming, Subscriber, Subscription};
use crate::driver::work::Work;
use crate::envelope::Envelope;

const TOPIC: &str = "onex.evt.test.thing.v1";
const PARTITIONS: u32 = 4;
const WAIT: Duration = Duration::from_secs(30);

fn cluster() -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for topic in [format!("dev.{TOPIC}"), "dev.onex.dlq.test.v1".to_owned()] {
        cluster
            .create_topic(&topic, PARTITIONS as i32, 1)
            .expect("topic");
    }
    cluster
}

fn settings(cluster: &MockCluster<'static, DefaultProducerContext>, group: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: cluster.bootstrap_servers(),
        topic_prefix: "dev.".into(),
        partitions: PARTITIONS,
        replication_factor: 1,
        group: group.into(),
        dead_letter_topic: "onex.dlq.test.v1".into(),
        options: Vec::new(),
    }
}

async fn connect(settings: KafkaSettings) -> Arc<KafkaBus> {
    let topics: HashMap<String, String> = [("Thing".to_owned(), TOPIC.to_owned())].into();
    let consumed: HashSet<String> = ["Thing".to_owned()].into();
    KafkaBus::connect(settings, topics, &consumed, Work::new())
        .await
        .expect("connected")
}

fn thing(id: &str, entity: &str) -> Envelope {
    serde_json::from_value(serde_json::json!({
        "message_id": id,
        "event_type": "Thing",
        "correlation_id": format!("c-{id}"),
        "entity_id": entity,
        "payload": {"n": id},
    }))
    .expect("envelope")
}

async fn next(subscription: &mut Subscription) -> Incoming {
    tokio::time::timeout(WAIT, subscription.recv())
        .await
        .expect("something within the wait")
        .expect("the subscription is open")
}

/// The next delivery, skipping assignment notices.
async fn delivery(subscription: &mut Subscription) -> crate::bus::Delivery {
    loop {
        match next(subscription).await {
            Incoming::Delivery(delivery) => return delivery,
            Incoming::Assigned(_) => {}
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
}

/// A plain client of the cluster, for reading what the bus wrote as another client.
fn reader(cluster: &MockCluster<'static, DefaultProducerContext>, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", group)
        .create()
        .expect("reader")
}

fn committed(cluster: &MockCluster<'static, DefaultProducerContext>, group: &str) -> Vec<i64> {
    let reader = reader(cluster, group);
    let mut list = TopicPartitionList::new();
    for partition in 0..PARTITIONS as i32 {
        list.add_partition(&format!("dev.{TOPIC}"), partition);
    }
    let offsets = reader
        .committed_offsets(list, Duration::from_secs(5))
        .expect("committed offsets");
    offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_published_before_the_group_first_joined_is_delivered_with_onex_headers() {
    let cluster = cluster();
    let bus = connect(settings(&cluster, "first-join")).await;
    // Published before the processor exists: a group that started at the end
    // (auto.offset.reset=latest) would never see it.
    bus.publish(thing("m-1", "node-7"))
        .expect("taken")
        .await
        .expect("acknowledged by the broker");
    let mut processor = bus.subscribe(None, Subscriber::Processor);
    let first = delivery(&mut processor).await;
    assert_eq!(first.envelope.message_id, "m-1");
    assert_eq!(
        first.envelope.topic.as_deref(),
        Some(TOPIC),
        "without the prefix"
    );
    assert_eq!(first.envelope.entity_id.as_deref(), Some("node-7"));
    let place = super::codec::Origin::parse(&first.source).expect("a Kafka origin");
    assert_eq!(place.topic, format!("dev.{TOPIC}"));
    assert_eq!(
        place.partition as u32,
        partition_of("node-7", PARTITIONS),
        "the key's partition is the one onex computes for its instance"
    );
    drop(first);
    bus.close().await;
    // As another client reads it: ONEX's headers, and the entity as the key.
    let reader = reader(&cluster, "reader");
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(&format!("dev.{TOPIC}"), place.partition, Offset::Beginning)
        .expect("partition");
    reader.assign(&list).expect("assigned");
    let message = loop {
        if let Some(message) = reader.poll(Duration::from_secs(1)) {
            break message.expect("a message");
        }
    };
    use rdkafka::message::{Headers, Message};
    assert_eq!(message.key(), Some(&b"node-7"[..]));
    let headers: HashMap<&str, &str> = message
        .headers()
        .expect("headers")
        .iter()
        .map(|h| {
            (
                h.key,
                std::str::from_utf8(h.value.unwrap_or_default()).unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        headers,
        HashMap::from([
            ("content_type", "application/json"),
            ("message_id", "m-1"),
            ("event_type", "Thing"),
            ("schema_version", "1.0.0"),
            ("correlation_id", "c-m-1"),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_is_committed_only_once_every_message_before_it_is_acknowledged() {
    let cluster = cluster();
    let group = "commits";
    let bus = connect(settings(&cluster, group)).await;
    // One key: one partition, in order.
    for id in ["a", "b", "c"] {
        bus.publish(thing(id, "same-node"))
            .expect("taken")
            .await
            .expect("acknowledged");
    }
    let partition = partition_of("same-node", PARTITIONS) as usize;
    let mut processor = bus.subscribe(None, Subscriber::Processor);
    let a = delivery(&mut processor).await;
    let b = delivery(&mut processor).await;
    let c = delivery(&mut processor).await;
    assert_eq!(
        [&a, &b, &c].map(|d| d.envelope.message_id.clone()),
        ["a", "b", "c"]
    );
    c.ack.ack();
    b.ack.ack();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        committed(&cluster, group)[partition] < 1,
        "nothing passes `a`, which is not acknowledged"
    );
    a.ack.ack();
    let deadline = std::time::Instant::now() + WAIT;
    while committed(&cluster, group)[partition] != 3 {
        assert!(std::time::Instant::now() < deadline, "never committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_an_envelope_becomes_a_dead_letter_with_its_place() {
    let cluster = cluster();
    let bus = connect(settings(&cluster, "rejects")).await;
    let topic = format!("dev.{TOPIC}");
    bus.send(
        &topic,
        Some("k"),
        b"{not json",
        rdkafka::message::OwnedHeaders::new(),
    )
    .expect("taken")
    .await
    .expect("acknowledged");
    let mut processor = bus.subscribe(None, Subscriber::Processor);
    loop {
        match next(&mut processor).await {
            Incoming::Assigned(_) => continue,
            Incoming::Rejected(letter, _ack) => {
                assert_eq!(letter.stage, crate::dead_letter::Stage::Decode);
                assert_eq!(letter.raw, "{not json");
                assert!(
                    letter.source.starts_with(&format!("kafka:{topic}/")),
                    "{}",
                    letter.source
                );
                break;
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_sees_every_message_published_after_it_subscribed() {
    let cluster = cluster();
    let bus = connect(settings(&cluster, "sources")).await;
    bus.publish(thing("before", "n1"))
        .expect("taken")
        .await
        .expect("acknowledged");
    let mut source = bus.subscribe(None, Subscriber::Source);
    // Right after subscribing, to every partition: none of it may be missed.
    let mut published = HashSet::new();
    for n in 0..8 {
        let id = format!("after-{n}");
        bus.publish(thing(&id, &format!("node-{n}")))
            .expect("taken")
            .await
            .expect("acknowledged");
        published.insert(id);
    }
    let mut seen = HashSet::new();
    while seen.len() < published.len() {
        let delivery = delivery(&mut source).await;
        assert_ne!(delivery.envelope.message_id, "before");
        seen.insert(delivery.envelope.message_id.clone());
    }
    assert_eq!(seen, published);
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_takes_partitions_only_after_the_first_handed_them_back() {
    let cluster = cluster();
    let group = "rebalance";
    let first = connect(settings(&cluster, group)).await;
    let mut one = first.subscribe(None, Subscriber::Processor);
    let Incoming::Assigned(all) = next(&mut one).await else {
        panic!("the first member is assigned everything");
    };
    assert_eq!(all.numbers.len(), PARTITIONS as usize);
    let second = connect(settings(&cluster, group)).await;
    let mut two = second.subscribe(None, Subscriber::Processor);
    let Incoming::Revoked(revoked, done) = next(&mut one).await else {
        panic!("the first member is asked for its partitions back");
    };
    assert_eq!(revoked, all);
    // Until the first answers, the second is assigned nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), two.recv())
            .await
            .is_err(),
        "the second member was assigned partitions before they were handed back"
    );
    done.send(()).expect("answered");
    // The group settles (a slow join can take one more round, each answered): each
    // member then holds a share, and together all partitions, none twice.
    let mut mine = crate::bus::Partitions::default();
    let mut theirs = crate::bus::Partitions::default();
    let deadline = std::time::Instant::now() + WAIT;
    while mine.numbers.len() + theirs.numbers.len() != PARTITIONS as usize
        || !mine.numbers.is_disjoint(&theirs.numbers)
        || theirs.numbers.is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the group never settled"
        );
        tokio::select! {
            Some(incoming) = one.recv() => match incoming {
                Incoming::Assigned(p) => mine = p,
                Incoming::Revoked(_, done) => {
                    mine = crate::bus::Partitions::default();
                    let _ = done.send(());
                }
                other => panic!("{other:?}"),
            },
            Some(incoming) = two.recv() => match incoming {
                Incoming::Assigned(p) => theirs = p,
                Incoming::Revoked(_, done) => {
                    theirs = crate::bus::Partitions::default();
                    let _ = done.send(());
                }
                other => panic!("{other:?}"),
            },
        }
    }
    first.close().await;
    second.close().await;
}

/// A member whose session expires (the coordinator unreachable for longer than the
/// session timeout) is told its partitions are lost, not asked for them back: the
/// group may have given them to another member already, so their instances are not
/// the runtime's to save any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_session_expires_is_told_its_partitions_are_lost() {
    let cluster = cluster();
    let mut settings = settings(&cluster, "lost");
    settings
        .options
        .push(("session.timeout.ms".into(), "6000".into()));
    let bus = connect(settings).await;
    let mut processor = bus.subscribe(None, Subscriber::Processor);
    let Incoming::Assigned(all) = next(&mut processor).await else {
        panic!("assigned everything");
    };
    cluster.broker_down(1).expect("down");
    match next(&mut processor).await {
        Incoming::Lost(lost) => assert_eq!(lost, all),
        other => panic!("expected the partitions lost, got {other:?}"),
    }
    cluster.broker_up(1).expect("up");
    loop {
        match next(&mut processor).await {
            Incoming::Assigned(again) if again == all => break,
            Incoming::Assigned(_) => {}
            other => panic!("expected the partitions again, got {other:?}"),
        }
    }
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_says_when_no_broker_is_reachable_and_when_it_is_back() {
    let cluster = cluster();
    let bus = connect(settings(&cluster, "outage")).await;
    let mut health = bus.health();
    let _processor = bus.subscribe(None, Subscriber::Processor);
    assert!(health.borrow().is_ok());
    cluster.broker_down(1).expect("down");
    // Something to send makes the producer notice at once.
    let published = bus
        .publish(thing("during", "n"))
        .expect("queued while down");
    tokio::time::timeout(WAIT, health.wait_for(Result::is_err))
        .await
        .expect("noticed")
        .expect("open");
    cluster.broker_up(1).expect("up");
    tokio::time::timeout(WAIT, health.wait_for(Result::is_ok))
        .await
        .expect("recovered")
        .expect("open");
    tokio::time::timeout(WAIT, published)
        .await
        .expect("sent once back")
        .expect("acknowledged");
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_reaches_the_dead_letter_topic_in_onex_dlq_envelope() {
    use rdkafka::message::Message;

    let cluster = cluster();
    let bus = connect(settings(&cluster, "dead-letters")).await;
    let original = serde_json::json!({
        "message_id": "m-9", "event_type": "Thing", "correlation_id": "c-9", "payload": {}
    });
    let letter = crate::dead_letter::DeadLetter::new(
        crate::dead_letter::Stage::Validate,
        "the payload does not match".into(),
        format!("kafka:dev.{TOPIC}/2@41"),
        original.to_string(),
        None,
    );
    let reader = reader(&cluster, "dlq-reader");
    let mut list = TopicPartitionList::new();
    for partition in 0..PARTITIONS as i32 {
        list.add_partition_offset("dev.onex.dlq.test.v1", partition, Offset::Beginning)
            .expect("partition");
    }
    reader.assign(&list).expect("assigned");
    bus.dead_letter(&letter);
    let deadline = std::time::Instant::now() + WAIT;
    let message = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter on the topic"
        );
        if let Some(message) = reader.poll(Duration::from_millis(200)) {
            break message.expect("a message");
        }
    };
    let envelope: serde_json::Value =
        serde_json::from_slice(message.payload().expect("a value")).expect("JSON");
    assert_eq!(envelope["event_type"], "DeadLetter");
    assert_eq!(envelope["correlation_id"], "c-9");
    let payload = &envelope["payload"];
    assert_eq!(payload["original_topic"], TOPIC, "without the prefix");
    assert_eq!(payload["original_partition"], 2);
    assert_eq!(payload["original_offset"], 41);
    assert_eq!(payload["failure_reason"], "the payload does not match");
    assert_eq!(payload["error_type"], "validate");
    assert_eq!(payload["retry_count"], 0);
    assert_eq!(payload["correlation_id"], "c-9");
    assert_eq!(payload["original_message"], original);
    bus.close().await;
}
