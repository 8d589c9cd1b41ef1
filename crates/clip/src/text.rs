//! Texts for the trained model's word vocabulary: normalised (punctuation apart, lower case),
//! `<start>` words `<end>`, cut to the context length with the end token kept.

use gradcam_scenes::vocab::{normalize, Vocab};

use crate::{Error, Result};

/// A text as the text tower takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The normalised text.
    pub text: String,
    /// Token ids, start and end tokens included.
    pub ids: Vec<u32>,
    /// Words the vocabulary lacks (read as `<unk>`).
    pub unknown: Vec<String>,
    /// Whether the text was cut to the context length.
    pub truncated: bool,
}

/// Encodes `text` for a model of `context_length` tokens; a text without words is an error.
pub fn encode(vocab: &Vocab, text: &str, context_length: usize) -> Result<Encoded> {
    let norm = normalize(text);
    let words: Vec<&str> = norm.split_whitespace().collect();
    if words.is_empty() {
        return Err(Error::EmptyText { index: 0 });
    }
    let tokens = vocab.encode(&norm)?;
    let unknown = tokens.iter().zip(&words).filter(|(&t, _)| t == vocab.unk).map(|(_, w)| w.to_string()).collect();
    let room = context_length.saturating_sub(2).max(1);
    let truncated = tokens.len() > room;
    let mut ids = Vec::with_capacity(tokens.len().min(room) + 2);
    ids.push(vocab.start);
    ids.extend(tokens.into_iter().take(room));
    ids.push(vocab.end);
    Ok(Encoded { text: norm, ids, unknown, truncated })
}
