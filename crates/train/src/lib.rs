//! One training loop for gradcam's models. A model says what is its own through [`Trainable`]
//! (its parameters, the loss of a batch, its validation, what its checkpoint holds beyond the
//! shared fields); [`fit`] runs the epochs: seeded shuffling, the cosine learning-rate schedule,
//! AdamW steps, the guard against a loss that is not finite, validation, the weights and
//! `checkpoint.json` written after every epoch, resuming from them, and the progress [`Event`]s.
//!
//! The settings every run has ([`Settings`]) are checked here; an error names the setting (the
//! field's name), its value and what it must be, and leaves it to a command-line tool to name
//! its flag.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod checkpoint;
#[cfg(feature = "cli")]
pub mod cli;
mod error;
mod fit;
mod settings;

pub use checkpoint::{Accuracy, Checkpoint, EpochLog, ExactMatch};
pub use error::{Error, Result};
pub use fit::{fit, Event, Group, Trainable};
pub use settings::{at_least_one, learning_rate, not_negative, Settings};
