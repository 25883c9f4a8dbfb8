//! Anthropic HH-RLHF transcripts: `\n\nHuman: … \n\nAssistant: …` as turns.

use crate::messages::Message;

/// Splits an HH-RLHF transcript into turns and keeps every turn before the last `Assistant:`.
pub fn hh_rlhf_prompt(transcript: &str) -> Option<Vec<Message>> {
    let mut turns: Vec<Message> = Vec::new();
    let mut rest = transcript;
    const H: &str = "\n\nHuman:";
    const A: &str = "\n\nAssistant:";
    loop {
        let next_h = rest.find(H);
        let next_a = rest.find(A);
        let (pos, role, tag) = match (next_h, next_a) {
            (Some(h), Some(a)) if h < a => (h, "user", H),
            (Some(h), None) => (h, "user", H),
            (_, Some(a)) => (a, "assistant", A),
            (None, None) => break,
        };
        if let Some(last) = turns.last_mut() {
            last.content = rest[..pos].trim().to_owned();
        } else if !rest[..pos].trim().is_empty() {
            return None;
        }
        turns.push(Message::new(role, ""));
        rest = &rest[pos + tag.len()..];
    }
    let last = turns.last_mut()?;
    last.content = rest.trim().to_owned();
    let cut = turns.iter().rposition(|m| m.role == "assistant")?;
    turns.truncate(cut);
    (!turns.is_empty() && turns.last().is_some_and(|m| m.role == "user")).then_some(turns)
}
