//! The offsets a consumer may commit: per partition, the first offset delivered and
//! not yet acknowledged (or the one after the last delivered). Acknowledgements come
//! in any order (instances finish at their own pace); the commit never passes an
//! offset whose state is not durable, so a restart or a new owner of the partition
//! redelivers from there.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Offsets {
    partitions: HashMap<(Arc<str>, i32), Track>,
}

#[derive(Debug, Default)]
struct Track {
    /// One past the last offset delivered.
    next: i64,
    unacked: BTreeSet<i64>,
    /// The offset last committed (or found committed): nothing to do below it.
    committed: i64,
}

impl Track {
    fn commit_point(&self) -> i64 {
        self.unacked.first().copied().unwrap_or(self.next)
    }
}

impl Offsets {
    pub fn delivered(&mut self, topic: &Arc<str>, partition: i32, offset: i64) {
        let track = self
            .partitions
            .entry((Arc::clone(topic), partition))
            .or_insert_with(|| Track {
                next: offset,
                committed: offset,
                ..Track::default()
            });
        track.unacked.insert(offset);
        track.next = track.next.max(offset + 1);
    }

    pub fn acked(&mut self, topic: &Arc<str>, partition: i32, offset: i64) {
        if let Some(track) = self.partitions.get_mut(&(Arc::clone(topic), partition)) {
            track.unacked.remove(&offset);
        }
    }

    /// The partitions whose commit point moved since the last call, with that point
    /// (the offset of the next message to read, as Kafka commits it); taken as
    /// committed.
    pub fn due(&mut self) -> Vec<(Arc<str>, i32, i64)> {
        let mut due = Vec::new();
        for ((topic, partition), track) in &mut self.partitions {
            let point = track.commit_point();
            if point > track.committed {
                track.committed = point;
                due.push((Arc::clone(topic), *partition, point));
            }
        }
        due
    }

    /// A commit of these points failed: they are due again.
    pub fn uncommitted(&mut self, due: &[(Arc<str>, i32, i64)]) {
        for (topic, partition, point) in due {
            if let Some(track) = self.partitions.get_mut(&(Arc::clone(topic), *partition)) {
                track.committed = track.committed.min(point - 1);
            }
        }
    }

    /// Forgets the partitions given away (their messages, delivered again to the next
    /// owner, are its to acknowledge).
    pub fn forget(&mut self, partitions: &[(Arc<str>, i32)]) {
        for key in partitions {
            self.partitions.remove(key);
        }
    }

    /// Messages delivered and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.partitions.values().map(|t| t.unacked.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_never_passes_an_unacknowledged_offset() {
        let topic: Arc<str> = Arc::from("t");
        let mut offsets = Offsets::default();
        for offset in 10..15 {
            offsets.delivered(&topic, 0, offset);
        }
        assert_eq!(offsets.due(), vec![], "nothing acknowledged yet");
        offsets.acked(&topic, 0, 12);
        offsets.acked(&topic, 0, 11);
        assert_eq!(offsets.due(), vec![], "10 is not acknowledged");
        offsets.acked(&topic, 0, 10);
        assert_eq!(offsets.due(), vec![(Arc::clone(&topic), 0, 13)]);
        assert_eq!(offsets.due(), vec![], "taken as committed");
        offsets.acked(&topic, 0, 14);
        offsets.acked(&topic, 0, 13);
        let due = offsets.due();
        assert_eq!(due, vec![(Arc::clone(&topic), 0, 15)]);
        offsets.uncommitted(&due);
        assert_eq!(offsets.due(), due, "a failed commit is due again");
        assert_eq!(offsets.unacked(), 0);
    }

    #[test]
    fn partitions_given_away_are_forgotten() {
        let topic: Arc<str> = Arc::from("t");
        let mut offsets = Offsets::default();
        offsets.delivered(&topic, 1, 0);
        offsets.forget(&[(Arc::clone(&topic), 1)]);
        offsets.acked(&topic, 1, 0);
        assert_eq!(offsets.due(), vec![]);
        assert_eq!(offsets.unacked(), 0);
    }
}
