//! Dead letters: what could not be processed, kept with the reason, by the state
//! store and, on Kafka, on the dead-letter topic too.

use serde::Serialize;

use crate::envelope::Envelope;

/// Where on its way something became a dead letter (docs/orchestration.md,
/// Guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// A line of an events source that is no envelope (not UTF-8, not JSON, too long).
    Decode,
    /// An envelope no route takes, or one whose instance key or context cannot be made.
    Route,
    /// A payload that does not match its route's schema.
    Validate,
    /// An event the reducer's FSM rejected.
    Reject,
    /// An effect that failed with no result mapping to take the failure.
    Effect,
    /// An instance whose follow-up transitions could not go on.
    FollowUp,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Decode,
        Stage::Route,
        Stage::Validate,
        Stage::Reject,
        Stage::Effect,
        Stage::FollowUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Route => "route",
            Stage::Validate => "validate",
            Stage::Reject => "reject",
            Stage::Effect => "effect",
            Stage::FollowUp => "follow-up",
        }
    }

    /// A stage as stored; `Err` names a stage this version does not know.
    pub fn parse(text: &str) -> Result<Stage, String> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.as_str() == text)
            .ok_or_else(|| format!("unknown dead-letter stage `{text}`"))
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that could not be processed, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    pub at: String,
    pub stage: Stage,
    pub reason: String,
    pub event_type: Option<String>,
    pub message_id: Option<String>,
    /// Where it came from: `file.jsonl:12`, `stdin:3`, `bus`, `reducer/key`.
    pub source: String,
    /// What was received (the event as it came), or the state that could not go on.
    pub raw: String,
}

impl DeadLetter {
    /// A dead letter made now, and said in the log: the one way one is made.
    /// `envelope` is the event's, when there is one.
    pub fn new(
        stage: Stage,
        reason: String,
        source: String,
        raw: String,
        envelope: Option<&Envelope>,
    ) -> DeadLetter {
        let message_id = envelope.map(|e| e.message_id.clone());
        DeadLetter::of_message(stage, reason, source, raw, message_id, envelope)
    }

    /// The same, for a letter tied to a message other than an envelope in hand (an
    /// effect's failure, by the id of the message that caused it).
    pub fn of_message(
        stage: Stage,
        reason: String,
        source: String,
        raw: String,
        message_id: Option<String>,
        envelope: Option<&Envelope>,
    ) -> DeadLetter {
        tracing::warn!(%source, %stage, %reason, message_id = message_id.as_deref(), "kept as a dead letter");
        DeadLetter {
            id: None,
            at: jiff::Timestamp::now().to_string(),
            stage,
            reason,
            event_type: envelope.map(|e| e.event_type.clone()),
            message_id,
            source,
            raw,
        }
    }
}
