//! The settings every training run has, and the checks of their ranges.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What every model's training configuration holds (its first fields in `checkpoint.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Planned epochs: the cosine schedule reaches 0 after the last.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// AdamW's learning rate at the first epoch.
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Seeds the initial values and each epoch's shuffling.
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { epochs: 10, batch_size: 32, lr: 2e-3, weight_decay: 1e-4, seed: 0 }
    }
}

impl Settings {
    /// Refuses settings that cannot train: a learning rate that is not a number above 0 and at
    /// most 10, no epochs, empty batches, a weight decay that is negative or not finite.
    pub fn check(&self) -> Result<()> {
        learning_rate("lr", self.lr)?;
        at_least_one("epochs", self.epochs)?;
        at_least_one("batch_size", self.batch_size)?;
        not_negative("weight_decay", self.weight_decay)
    }
}

/// Implements `AsRef<Settings>` and `AsMut<Settings>`, which [`crate::fit`] needs of a training
/// configuration, for one that holds its settings in the field `settings`.
#[macro_export]
macro_rules! settings_field {
    ($config:ty) => {
        impl AsRef<$crate::Settings> for $config {
            fn as_ref(&self) -> &$crate::Settings {
                &self.settings
            }
        }

        impl AsMut<$crate::Settings> for $config {
            fn as_mut(&mut self) -> &mut $crate::Settings {
                &mut self.settings
            }
        }
    };
}

/// `lr` must be a learning rate above 0 and at most 10 (not NaN).
pub fn learning_rate(name: &'static str, lr: f64) -> Result<()> {
    if lr > 0.0 && lr <= 10.0 {
        return Ok(());
    }
    Err(Error::setting(name, lr, "a learning rate above 0 and at most 10"))
}

/// A count that must be at least 1.
pub fn at_least_one(name: &'static str, n: usize) -> Result<()> {
    if n >= 1 {
        return Ok(());
    }
    Err(Error::setting(name, n, "at least 1"))
}

/// A weight that must be finite and not negative.
pub fn not_negative(name: &'static str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        return Ok(());
    }
    Err(Error::setting(name, v, "finite and not negative"))
}
