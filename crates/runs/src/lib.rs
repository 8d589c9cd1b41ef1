//! Dataset runs: the inputs of a list ([`Inputs`]) that a shard takes ([`Shard`]), explained in
//! batches by any command ([`run`]), each batch's records appended to `DIR/records-I-of-N.jsonl`
//! and flushed ([`Records`]), continued after a kill (`--resume`), and the shards merged into one
//! file in input order ([`merge`]).
#![forbid(unsafe_code)]

#[cfg(feature = "cli")]
pub mod cli;
mod inputs;
pub mod maps;
mod merge;
mod records;
mod run;
mod shard;

use std::path::PathBuf;

pub use inputs::{is_image, Input, Inputs, Kind, Question, IMAGE_EXTENSIONS};
pub use merge::{merge, LineReader, ShardSummary, Summary, OPEN_FILES};
pub use records::{error_line, line, Records, ShardState};
pub use run::{run, Outcome, Plan, MAX_BATCH};
pub use shard::{Shard, MAX_SHARDS};

/// Why a run or a merge cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input list cannot be read.
    #[error("--inputs {}: {message}", path.display())]
    Inputs { path: PathBuf, message: String, #[source] source: Option<std::io::Error> },
    /// A folder inside the input folder cannot be listed (the indices after it would be guesses).
    #[error("cannot list {} (inside --inputs)", path.display())]
    Walk { path: PathBuf, #[source] source: std::io::Error },
    /// A dataset file of the list (COCO, VQA).
    #[error(transparent)]
    Dataset(#[from] gradcam_scenes::Error),
    /// A shard's records exist and `--resume` was not given.
    #[error("{} already holds records: give --resume to continue that run, or another --out", file.display())]
    Exists { file: PathBuf },
    /// Another process is writing this shard's records.
    #[error("{} is being written by another process (the same shard running twice?); wait for it, or stop it first", file.display())]
    Busy { file: PathBuf },
    /// A resumed shard ran over another list or split.
    #[error("{} was written for {was}; this run is {now}: resume with the same --inputs and --shard, or give another --out", file.display())]
    Changed { file: PathBuf, was: String, now: String },
    /// A line of a records or state file that is not one.
    #[error("{} line {line}: {message}", file.display())]
    Record { file: PathBuf, line: usize, message: String },
    /// The shards cannot be merged.
    #[error("{0}")]
    Merge(String),
    /// A setting out of its range.
    #[error("{0}")]
    Setting(String),
    /// Reading or writing a file.
    #[error("{}", path.display())]
    Io { path: PathBuf, #[source] source: std::io::Error },
    /// Writing a file.
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
}

/// The runs' result type.
pub type Result<T> = std::result::Result<T, Error>;
