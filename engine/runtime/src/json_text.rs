//! JSON text written by sonic-rs into a buffer sized from the last text of its kind.
//!
//! sonic-rs reserves six times a string's length (its worst case for escapes) before
//! writing the string, so a buffer started small is grown, and copied, several times
//! per text: for snapshots and event log lines that growth was a tenth of the
//! workers' time. Texts of one kind (one reducer's snapshots, the event log's lines)
//! have much the same length from one to the next, so the last length, with a
//! margin, sizes the next buffer.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use serde::ser::Error as _;

/// Room beyond the last length: what sonic-rs reserves for a string of ~35
/// characters (an id or a timestamp) at the end of the text.
const SLACK: usize = 256;

/// The length of the last text of one kind.
#[derive(Debug, Default)]
pub struct SizeHint(AtomicUsize);

impl SizeHint {
    /// `value` as JSON text, in a buffer of the last text's length plus a quarter
    /// (a text longer than that still grows its buffer, and sets the next size).
    pub fn write<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, sonic_rs::Error> {
        // Relaxed: the length is a guess that needs no ordering with anything.
        let last = self.0.load(Ordering::Relaxed);
        let mut text = Vec::with_capacity(last + last / 4 + SLACK);
        sonic_rs::to_writer(&mut text, value)?;
        self.0.store(text.len(), Ordering::Relaxed);
        Ok(text)
    }

    /// The same as a `String`.
    pub fn write_string<T: Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<String, sonic_rs::Error> {
        let text = self.write(value)?;
        // sonic-rs writes UTF-8; checked rather than assumed, at a few ns per KB.
        String::from_utf8(text).map_err(sonic_rs::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_next_buffer_has_room_for_a_text_like_the_last() {
        let hint = SizeHint::default();
        let value = json!({"id": "a".repeat(300), "escaped": "a \"quoted\"\nline"});
        let first = hint.write(&value).expect("text");
        assert_eq!(first, serde_json::to_vec(&value).expect("serde_json"));
        let second = hint.write(&value).expect("text");
        assert_eq!(second, first);
        assert!(second.capacity() >= first.len() + first.len() / 4 + SLACK);
        assert_eq!(
            hint.write_string(&value).expect("string").as_bytes(),
            &first[..]
        );
    }
}
