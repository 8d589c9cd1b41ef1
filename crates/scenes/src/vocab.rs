//! A word vocabulary for dataset text (captions, questions): a WordLevel `tokenizer.json`
//! (Hugging Face `tokenizers`) with lowercasing, whitespace splitting and the special tokens
//! `<pad>`, `<start>`, `<end>`, `<unk>`. [`normalize`] separates punctuation first.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use tokenizers::Tokenizer;

use crate::{Error, Result};

pub const PAD: &str = "<pad>";
pub const START: &str = "<start>";
pub const END: &str = "<end>";
pub const UNK: &str = "<unk>";

#[derive(Clone)]
pub struct Vocab {
    tokenizer: Tokenizer,
    pub pad: u32,
    pub start: u32,
    pub end: u32,
    pub unk: u32,
}

impl Vocab {
    /// A vocabulary of every word seen `min_count` times or more, specials first, then by
    /// decreasing frequency and alphabetically (deterministic).
    pub fn build<'a>(texts: impl IntoIterator<Item = &'a str>, min_count: usize) -> Result<Self> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for t in texts {
            for w in t.to_lowercase().split_whitespace() {
                *counts.entry(w.to_string()).or_default() += 1;
            }
        }
        let mut words: Vec<(String, usize)> = counts.into_iter().filter(|(_, c)| *c >= min_count).collect();
        words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut vocab = serde_json::Map::new();
        for (i, w) in [PAD, START, END, UNK].into_iter().map(str::to_string).chain(words.into_iter().map(|(w, _)| w)).enumerate() {
            vocab.insert(w, json!(i));
        }
        let added: Vec<_> = [PAD, START, END, UNK]
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
        });
        let tokenizer = Tokenizer::from_bytes(serde_json::to_vec(&doc).map_err(|e| Error::Config(format!("tokenizer: {e}")))?).map_err(|e| Error::Config(format!("tokenizer: {e}")))?;
        Self::from_tokenizer(tokenizer)
    }

    fn from_tokenizer(tokenizer: Tokenizer) -> Result<Self> {
        let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| Error::Config(format!("the vocabulary lacks the special token {t}")));
        let v = Self { pad: id(PAD)?, start: id(START)?, end: id(END)?, unk: id(UNK)?, tokenizer };
        // Decoding takes ids above <unk> for words: the specials must be the first four.
        if [v.pad, v.start, v.end, v.unk] != [0, 1, 2, 3] {
            return Err(Error::Config(format!("the special tokens {PAD} {START} {END} {UNK} must have ids 0 to 3, not {:?}", [v.pad, v.start, v.end, v.unk])));
        }
        Ok(v)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| Error::Config(format!("{}: {e}", path.display()));
        let size = std::fs::metadata(path).map_err(|e| bad(&e))?.len();
        if size > 64 << 20 {
            return Err(bad(&format!("{size} bytes; a tokenizer file here is at most 64 MiB")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
        // The tokenizers crate panics on some JSON syntax errors (inside "decoder"): check the
        // syntax first (found by fuzz/fuzz_targets/tokenizer.rs).
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
        let t: Tokenizer = text.parse().map_err(|e| bad(&e))?;
        Self::from_tokenizer(t)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.tokenizer.to_string(false).map_err(|e| Error::Config(format!("tokenizer: {e}")))?;
        crate::write_atomic(path, text.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token ids of a text; unknown words become `<unk>`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| Error::Config(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a text, or an error listing the words the model does not know.
    pub fn encode_known(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        let words: Vec<&str> = text.split_whitespace().collect();
        let unknown: Vec<String> = ids.iter().zip(&words).filter(|(&i, _)| i == self.unk).map(|(_, w)| format!("{w:?}")).collect();
        if !unknown.is_empty() {
            let mut known: Vec<String> = (4..self.len() as u32).filter_map(|i| self.word(i)).collect();
            known.sort();
            return Err(Error::UnknownWords { words: unknown.join(", "), known: known.join(" ") });
        }
        if ids.is_empty() {
            return Err(Error::Config("the text is empty".into()));
        }
        if ids.iter().any(|&i| i <= self.unk) {
            return Err(Error::Config(format!("{PAD}, {START}, {END} and {UNK} mark the text's edges and gaps; they are not words to explain")));
        }
        Ok(ids)
    }

    pub fn word(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Words of ids up to (not including) `<end>`, skipping specials.
    pub fn decode(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().take_while(|&&i| i != self.end).filter(|&&i| i > self.unk).filter_map(|&i| self.word(i)).collect()
    }
}

/// Lowercases and puts spaces around punctuation, so that "circle?" is two words.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for ch in text.chars() {
        if ch.is_ascii_punctuation() {
            out.push(' ');
            out.push(ch);
            out.push(' ');
        } else {
            out.extend(ch.to_lowercase());
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
