//! The epoch loop.

use std::path::Path;

use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use gradcam_scenes::scene::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Checkpoint, EpochLog, Error, Settings};

/// What the progress callback hears.
pub enum Event<'a, M> {
    /// The data is loaded: training and validation examples (from models that say so).
    Loaded {
        /// Training examples.
        train: usize,
        /// Validation examples.
        val: usize,
    },
    /// An epoch begins, of `steps` steps.
    Start {
        /// The epoch (from 0).
        epoch: usize,
        /// Its steps.
        steps: usize,
    },
    /// A step is done.
    Step {
        /// Its loss.
        loss: f32,
    },
    /// An epoch is done and saved.
    Epoch(&'a EpochLog<M>),
}

/// Parameters that one AdamW moves, at their own base learning rate (the cosine schedule scales
/// it like every group's).
pub struct Group {
    /// The parameters.
    pub vars: Vec<Var>,
    /// The learning rate of the first epoch.
    pub lr: f64,
}

/// What a model says to be trained by [`fit`].
pub trait Trainable {
    /// The validation figures of an epoch beyond its loss.
    type Metrics: Serialize + DeserializeOwned;
    /// What `checkpoint.json` holds beyond the shared fields.
    type Extra: Serialize + DeserializeOwned;
    /// The model's error, which this crate's errors become.
    type Error: From<Error>;

    /// The scalar loss of the training examples `ids` (a step minimises it).
    fn loss(&mut self, ids: &[usize]) -> Result<Tensor, Self::Error>;

    /// The mean loss over the validation examples, in batches of about `batch_size`.
    fn validate(&mut self, batch_size: usize) -> Result<f32, Self::Error>;

    /// The validation figures of the weights just validated: called after `validate` when its
    /// loss was finite, before the weights are saved.
    fn metrics(&mut self) -> Result<Self::Metrics, Self::Error>;

    /// How many training examples an epoch shuffles and goes through.
    fn examples(&self) -> usize;

    /// The parameters, written to `model.safetensors` after every epoch.
    fn varmap(&self) -> &VarMap;

    /// The parameter groups, one AdamW each. Default: every parameter at `settings.lr`.
    fn groups(&self, settings: &Settings) -> Result<Vec<Group>, Self::Error> {
        Ok(vec![Group { vars: self.varmap().all_vars(), lr: settings.lr }])
    }
}

/// Trains `model` from `ckpt.epochs_done` to the planned epochs of `ckpt.train` (the training
/// configuration: the shared [`Settings`] and the model's own), writing
/// `out/model.safetensors` and `out/checkpoint.json` after every epoch. Each epoch goes through
/// the training examples in an order shuffled from the seed and the epoch, at the learning rate
/// `lr * (1 + cos(pi * epoch / epochs)) / 2` of every group; AdamW (the settings' weight decay)
/// steps on each batch's loss. A loss that is not finite stops training with an error, as does a
/// validation loss that is not finite (then nothing of the epoch is saved).
pub fn fit<T, C>(model: &mut T, ckpt: &mut Checkpoint<C, T::Metrics, T::Extra>, out: &Path, progress: &mut dyn FnMut(Event<T::Metrics>)) -> Result<(), T::Error>
where
    T: Trainable,
    C: Serialize + DeserializeOwned + AsRef<Settings> + AsMut<Settings>,
{
    let s = *ckpt.train.as_ref();
    let mut opts = Vec::new();
    for g in model.groups(&s)? {
        let params = ParamsAdamW { lr: g.lr, weight_decay: s.weight_decay, ..Default::default() };
        opts.push((AdamW::new(g.vars, params).map_err(Error::from)?, g.lr));
    }
    let bs = s.batch_size.max(1);
    for epoch in ckpt.epochs_done..s.epochs {
        let start = std::time::Instant::now();
        let mut order: Vec<usize> = (0..model.examples()).collect();
        Rng::new(s.seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9)).shuffle(&mut order);
        // Cosine decay over the planned epochs.
        let decay = 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / s.epochs as f64).cos());
        for (opt, lr) in &mut opts {
            opt.set_learning_rate(*lr * decay);
        }
        let steps = order.len().div_ceil(bs);
        progress(Event::Start { epoch, steps });
        let mut total = 0.0;
        for chunk in order.chunks(bs) {
            let l = model.loss(chunk)?;
            step(&mut opts, &l)?;
            let l = l.to_scalar::<f32>().map_err(Error::from)?;
            if !l.is_finite() {
                return Err(Error::Diverged { epoch, loss: l }.into());
            }
            total += l;
            progress(Event::Step { loss: l });
        }
        let val_loss = model.validate(bs)?;
        // A step can make the weights non-finite after the last finite loss: never save them.
        if !val_loss.is_finite() {
            return Err(Error::DivergedValidation { epoch, loss: val_loss }.into());
        }
        let metrics = model.metrics()?;
        gradcam_encoders::scene_cnn::save_parameters(model.varmap(), &out.join("model.safetensors")).map_err(Error::from)?;
        ckpt.epochs_done = epoch + 1;
        ckpt.log.push(EpochLog { epoch, train_loss: total / steps as f32, val_loss, metrics, seconds: start.elapsed().as_secs_f64() });
        ckpt.save(out)?;
        progress(Event::Epoch(ckpt.log.last().expect("just pushed")));
    }
    Ok(())
}

/// One AdamW step of every group on the gradients of `loss`.
fn step(opts: &mut [(AdamW, f64)], loss: &Tensor) -> Result<(), Error> {
    let grads = loss.backward()?;
    for (opt, _) in opts {
        opt.step(&grads)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::Config;
    use crate::Accuracy;
    use candle_core::{DType, Device};

    /// Fits `w` to the examples' values (0, 1, 2, ...); the loss of the step `nan_at` (counted
    /// from 0) is NaN, and so is validation from epoch `bad_val`.
    struct Toy {
        varmap: VarMap,
        w: Var,
        steps: usize,
        nan_at: usize,
        validations: usize,
        bad_val: usize,
    }

    impl Toy {
        fn new(nan_at: usize, bad_val: usize) -> Self {
            let varmap = VarMap::new();
            varmap.get(1, "w", candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu).unwrap();
            let w = varmap.all_vars().remove(0);
            Toy { varmap, w, steps: 0, nan_at, validations: 0, bad_val }
        }
    }

    impl Trainable for Toy {
        type Metrics = Accuracy;
        type Extra = ();
        type Error = Error;

        fn loss(&mut self, ids: &[usize]) -> Result<Tensor, Error> {
            self.steps += 1;
            let scale = if self.steps - 1 == self.nan_at { f64::NAN } else { 1.0 };
            let target = ids.iter().sum::<usize>() as f64 / ids.len() as f64;
            Ok(((self.w.as_tensor() - target)?.sqr()?.sum_all()? * scale)?)
        }

        fn validate(&mut self, _: usize) -> Result<f32, Error> {
            self.validations += 1;
            Ok(if self.validations > self.bad_val { f32::INFINITY } else { self.w.as_tensor().to_vec1::<f32>()?[0] })
        }

        fn metrics(&mut self) -> Result<Accuracy, Error> {
            Ok(Accuracy { val_accuracy: 0.5 })
        }

        fn examples(&self) -> usize {
            8
        }

        fn varmap(&self) -> &VarMap {
            &self.varmap
        }
    }

    fn settings(epochs: usize) -> Config {
        Config { settings: Settings { epochs, batch_size: 3, lr: 0.1, weight_decay: 0.0, seed: 7 }, hidden: 1 }
    }

    #[test]
    fn epochs_are_saved_and_resumed() {
        let out = std::env::temp_dir().join(format!("gradcam-train-fit-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        let mut ckpt = Checkpoint::new(settings(2), Path::new("data"), ());
        let mut events = Vec::new();
        fit(&mut Toy::new(usize::MAX, usize::MAX), &mut ckpt, &out, &mut |e| {
            events.push(match e {
                Event::Start { epoch, steps } => format!("start {epoch} {steps}"),
                Event::Step { .. } => "step".into(),
                Event::Epoch(log) => format!("epoch {}", log.epoch),
                Event::Loaded { .. } => "loaded".into(),
            })
        })
        .unwrap();
        assert_eq!(events.join(","), "start 0 3,step,step,step,epoch 0,start 1 3,step,step,step,epoch 1");
        assert_eq!(ckpt.epochs_done, 2);
        assert!(ckpt.log[0].train_loss > ckpt.log[1].train_loss, "{:?}", ckpt.log);
        assert!(out.join("model.safetensors").exists());
        // Resumed with 3 planned epochs: one more, from the written checkpoint.
        let mut resumed: Checkpoint<Config, Accuracy> = Checkpoint::resume(&out, 3).unwrap();
        assert_eq!((resumed.epochs_done, resumed.train.settings.epochs), (2, 3));
        fit(&mut Toy::new(usize::MAX, usize::MAX), &mut resumed, &out, &mut |_| {}).unwrap();
        assert_eq!((resumed.epochs_done, resumed.log.len(), resumed.log[2].epoch), (3, 3, 2));
        // Nothing to resume from is an error naming the folder and the file, not a fresh start.
        std::fs::remove_file(out.join("checkpoint.json")).unwrap();
        let err = Checkpoint::<Config, Accuracy>::resume(&out, 3).unwrap_err();
        assert!(matches!(&err, Error::Setting(s) if s.settings == ["resume"]), "{err}");
        assert!(err.to_string().contains(&format!("{} holds no checkpoint.json", out.display())), "{err}");
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn a_loss_that_is_not_finite_stops_training_and_saves_nothing_of_its_epoch() {
        let out = std::env::temp_dir().join(format!("gradcam-train-nan-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        let mut ckpt = Checkpoint::new(settings(3), Path::new("data"), ());
        let err = fit(&mut Toy::new(4, usize::MAX), &mut ckpt, &out, &mut |_| {}).unwrap_err();
        assert!(matches!(err, Error::Diverged { epoch: 1, loss } if loss.is_nan()), "{err}");
        assert_eq!(ckpt.epochs_done, 1);
        let err = fit(&mut Toy::new(usize::MAX, 0), &mut Checkpoint::new(settings(3), Path::new("data"), ()), &out, &mut |_| {}).unwrap_err();
        assert_eq!(err.to_string(), "the validation loss became inf in epoch 0; nothing of this epoch saved");
        let saved: Checkpoint<Config, Accuracy> = Checkpoint::resume(&out, 3).unwrap();
        assert_eq!(saved.epochs_done, 1);
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn settings_errors_name_the_setting_its_value_and_the_requirement() {
        let bad = Settings { lr: 0.0, ..Settings::default() }.check().unwrap_err();
        assert!(matches!(&bad, Error::Setting(s) if s.settings == ["lr"] && s.value.as_deref() == Some("0")), "{bad}");
        assert_eq!(bad.to_string(), "lr 0: must be a learning rate above 0 and at most 10");
        for s in [Settings { lr: f64::NAN, ..Settings::default() }, Settings { epochs: 0, ..Settings::default() }, Settings { batch_size: 0, ..Settings::default() }, Settings { weight_decay: -1.0, ..Settings::default() }] {
            assert!(s.check().is_err(), "{s:?}");
        }
        Settings::default().check().unwrap();
    }
}
