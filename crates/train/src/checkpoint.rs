//! `checkpoint.json`: how far training got (the configuration, the data, the epochs done and
//! each epoch's log), with what a model keeps beyond that, to resume from.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Settings};

/// One epoch's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog<M> {
    /// The epoch (from 0).
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f32,
    /// Mean validation loss after the epoch.
    pub val_loss: f32,
    /// The model's validation figures (their fields stand beside the others in the JSON).
    #[serde(flatten)]
    pub metrics: M,
    /// Wall-clock time of the epoch, validation included.
    pub seconds: f64,
}

/// A validation figure: a struct of one field, written as its name with spaces.
macro_rules! figure {
    ($(#[$doc:meta])* $name:ident, $(#[$field_doc:meta])* $field:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $(#[$field_doc])*
            pub $field: f64,
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "{} {:.3}", stringify!($field).replace('_', " "), self.$field)
            }
        }
    };
}

figure!(
    /// Top-1 accuracy on the validation set, the figure of the classifying models.
    Accuracy,
    /// Correct top-1 predictions over the validation examples with a label.
    val_accuracy
);

figure!(
    /// Exact match of decoded captions, the captioner's figure.
    ExactMatch,
    /// Share of the validation images whose greedy caption names exactly their (colour, shape)
    /// set.
    val_exact_match
);

/// `checkpoint.json` of a model folder: `train` is the model's training configuration, `M` its
/// validation figures, `X` what else it keeps (its fields stand beside the shared ones).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint<C, M, X = ()> {
    /// The training configuration; on resume, its settings but the epochs are the ones used.
    pub train: C,
    /// The dataset folder.
    pub data: PathBuf,
    /// Epochs trained (and saved).
    pub epochs_done: usize,
    /// One record per epoch done.
    pub log: Vec<EpochLog<M>>,
    /// The model's own fields.
    #[serde(flatten)]
    pub extra: X,
}

impl<C, M, X> Checkpoint<C, M, X>
where
    C: Serialize + DeserializeOwned + AsMut<Settings>,
    M: Serialize + DeserializeOwned,
    X: Serialize + DeserializeOwned,
{
    /// A run of `train` on `data` that has done nothing yet.
    pub fn new(train: C, data: &Path, extra: X) -> Self {
        Checkpoint { train, data: data.to_path_buf(), epochs_done: 0, log: Vec::new(), extra }
    }

    /// `out/checkpoint.json`, with its planned epochs set to `epochs`: the run to resume
    /// (AdamW's moments restart). Without that file, an error about the setting `resume` naming
    /// the folder and the file: asking to resume is not asking to start afresh.
    pub fn resume(out: &Path, epochs: usize) -> Result<Self> {
        let path = out.join("checkpoint.json");
        if !path.exists() {
            let problem = format!("finds nothing to continue from: {} holds no checkpoint.json (start afresh without it)", out.display());
            return Err(gradcam_core::SettingError::new(vec!["resume"], problem).into());
        }
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let mut ckpt: Self = serde_json::from_str(&text).map_err(|source| Error::Json { path, source })?;
        ckpt.train.as_mut().epochs = epochs;
        Ok(ckpt)
    }

    /// Writes `out/checkpoint.json` (through a temporary file).
    pub fn save(&self, out: &Path) -> Result<()> {
        let path = out.join("checkpoint.json");
        let text = serde_json::to_string_pretty(self).map_err(|source| Error::Json { path: path.clone(), source })?;
        Ok(gradcam_io::write_atomic(&path, text.as_bytes())?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A model's training configuration.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub(crate) struct Config {
        #[serde(flatten)]
        pub(crate) settings: Settings,
        pub(crate) hidden: usize,
    }

    crate::settings_field!(Config);

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Extra {
        skipped: usize,
    }

    /// The shared and flattened fields stand in the order the models wrote before this crate.
    #[test]
    fn the_json_keeps_its_fields_and_their_order() {
        let settings = Settings { epochs: 3, batch_size: 8, lr: 0.003, weight_decay: 0.0, seed: 1 };
        let mut c = Checkpoint::new(Config { settings, hidden: 16 }, Path::new("d"), Extra { skipped: 2 });
        c.log.push(EpochLog { epoch: 0, train_loss: 1.5, val_loss: 0.1, metrics: Accuracy { val_accuracy: 0.25 }, seconds: 2.0 });
        let text = serde_json::to_string(&c).unwrap();
        let expected = r#"{"train":{"epochs":3,"batch_size":8,"lr":0.003,"weight_decay":0.0,"seed":1,"hidden":16},"data":"d","epochs_done":0,"log":[{"epoch":0,"train_loss":1.5,"val_loss":0.1,"val_accuracy":0.25,"seconds":2.0}],"skipped":2}"#;
        assert_eq!(text, expected);
        let back: Checkpoint<Config, Accuracy, Extra> = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), expected);
        let none: Checkpoint<Config, Accuracy> = serde_json::from_str(&text).unwrap();
        assert_eq!(none.log[0].val_loss, 0.1);
    }
}
