//! Which instance keys a runtime owns on a partitioned bus. A key belongs to the
//! partition Kafka's default partitioner gives it (murmur2, as the Java client and
//! librdkafka's `murmur2_random` compute it), so that the runtime holding a partition
//! holds exactly the instances whose events arrive on it.

use std::collections::BTreeSet;

/// A set of partition numbers out of `count`, the same for every consumed topic (the
/// topics are created with one partition count and assigned by range, so a runtime
/// holds the same numbers of each).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Partitions {
    pub count: u32,
    pub numbers: BTreeSet<u32>,
}

impl Partitions {
    /// Every partition: a runtime that shares its work with no one.
    pub fn all(count: u32) -> Partitions {
        Partitions {
            count,
            numbers: (0..count).collect(),
        }
    }

    pub fn holds(&self, key: &str) -> bool {
        self.count > 0 && self.numbers.contains(&partition_of(key, self.count))
    }
}

impl std::fmt::Display for Partitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let numbers: Vec<String> = self.numbers.iter().map(u32::to_string).collect();
        write!(f, "[{}] of {}", numbers.join(","), self.count)
    }
}

/// The partition Kafka's default partitioner chooses for `key` among `count`.
pub fn partition_of(key: &str, count: u32) -> u32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) as u32 % count.max(1)
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_gives_what_kafkas_java_client_gives() {
        // The cases of Kafka's own UtilsTest.
        for (input, expected) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(input.as_bytes()), expected, "{input}");
        }
    }

    #[test]
    fn a_key_is_held_by_the_runtime_holding_its_partition() {
        let key = "foobar";
        let partition = partition_of(key, 6);
        let mine = Partitions {
            count: 6,
            numbers: [partition].into_iter().collect(),
        };
        let others = Partitions {
            count: 6,
            numbers: (0..6).filter(|p| *p != partition).collect(),
        };
        assert!(mine.holds(key));
        assert!(!others.holds(key));
        assert!(Partitions::all(6).holds(key));
        assert!(!Partitions::default().holds(key));
    }
}
