//! Dataset runs: the inputs of a list taken by a shard, in batches, each batch's records appended
//! to `DIR/records-I-of-N.jsonl` and flushed, `--resume` after a kill, and `merge` of the shards.
#![forbid(unsafe_code)]

mod shard;

pub use shard::{Shard, MAX_SHARDS};
