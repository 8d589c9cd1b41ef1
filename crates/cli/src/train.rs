//! `gradcam train captioner|vqa|classifier`: the flags they share, the progress of training,
//! the flag of a setting that cannot train, and the model card with its test figures.

use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;

use gradcam_train::cli::TrainArgs;
use gradcam_train::{Checkpoint, Event, Settings};

use crate::progress::bar;

#[derive(clap::Subcommand)]
pub enum TrainCommand {
    /// The Show-and-Tell captioner.
    Captioner(CaptionerArgs),
    /// The VQA fusion model.
    Vqa(VqaArgs),
    /// A scene classifier (scene CNN + global average pooling + linear) on COCO-instances data.
    Classifier(ClassifierArgs),
    /// A small CLIP (a ViT and a text transformer, contrastive) on ShapeScenes' phrases and captions.
    Clip(ClipArgs),
}

#[derive(clap::Args)]
pub struct CaptionerArgs {
    #[command(flatten)]
    train: TrainArgs,
    #[arg(long, default_value_t = gradcam_captioner::train::TrainConfig::default().settings.epochs)]
    epochs: usize,
    /// Label smoothing of the word targets (keeps word gradients informative).
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Weight of the auxiliary loss that predicts, from `conv4` alone (a head at every position,
    /// max-pooled over space), which words the image's captions use (0 = off).
    #[arg(long, default_value_t = 0.0)]
    word_loss: f64,
    /// LSTM hidden size (explaining costs grow with it).
    #[arg(long, default_value_t = gradcam_captioner::train::TrainConfig::default().hidden)]
    hidden: usize,
    /// Weight of an L1 penalty on the explained layer's activations (0 = off).
    #[arg(long, default_value_t = 0.0)]
    activation_l1: f64,
    /// The auxiliary loss also predicts frequent word pairs ("blue circle").
    #[arg(long)]
    word_pairs: bool,
}

#[derive(clap::Args)]
pub struct VqaArgs {
    #[command(flatten)]
    train: TrainArgs,
    #[arg(long, default_value_t = gradcam_vqa::train::TrainConfig::default().settings.epochs)]
    epochs: usize,
    /// Start the image encoder from this trained model folder's (e.g. models/captioner).
    #[arg(long)]
    encoder_from: Option<PathBuf>,
    /// Keep that encoder fixed while training the rest.
    #[arg(long, requires = "encoder_from")]
    freeze_encoder: bool,
    /// The encoder's own learning rate (default: --lr), for fine-tuning it more gently.
    #[arg(long, conflicts_with = "freeze_encoder")]
    encoder_lr: Option<f64>,
    /// Leave out that encoder's units that are active at more than half of all positions of
    /// the training images: units that fire over the background put a floor under every map.
    #[arg(long, requires = "encoder_from")]
    drop_background_units: bool,
}

#[derive(clap::Args)]
pub struct ClassifierArgs {
    #[command(flatten)]
    train: TrainArgs,
    #[arg(long, default_value_t = gradcam_classifier::train::TrainConfig::default().settings.epochs)]
    epochs: usize,
    #[arg(long, default_value_t = Settings::default().weight_decay)]
    weight_decay: f64,
    /// Units of the explained layer `conv4`.
    #[arg(long, default_value_t = gradcam_classifier::train::TrainConfig::default().channels)]
    channels: usize,
    /// Input side in pixels (images are resized to it).
    #[arg(long, default_value_t = gradcam_classifier::train::TrainConfig::default().image_size)]
    image_size: u32,
    /// Train on at most this many images of the train split.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(clap::Args)]
pub struct ClipArgs {
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    c: gradcam_clip::cli::TrainFlags,
}

pub fn run(what: TrainCommand) -> anyhow::Result<ExitCode> {
    let weight_decay = Settings::default().weight_decay;
    match what {
        TrainCommand::Captioner(a) => {
            use gradcam_captioner::train::{train, TrainConfig};
            let (settings, t) = (a.train.settings(a.epochs, weight_decay), &a.train);
            let tc = TrainConfig { settings, label_smoothing: a.label_smoothing, word_loss: a.word_loss, hidden: a.hidden, activation_l1: a.activation_l1, word_pairs: a.word_pairs, ..Default::default() };
            fit(t, |e| train(&t.data, &t.out, &tc, t.resume, e), "test images", |c, m, p| gradcam_captioner::card::write(&t.data, &t.out, &tc, c, m, p), |m| eprintln!("test: exact match {:.3}, BLEU-4 {:.3}", m.exact_match, m.bleu4))
        }
        TrainCommand::Vqa(a) => {
            use gradcam_vqa::train::{train, TrainConfig};
            let (settings, t) = (a.train.settings(a.epochs, weight_decay), &a.train);
            let tc = TrainConfig { settings, encoder_from: a.encoder_from, freeze_encoder: a.freeze_encoder, encoder_lr: a.encoder_lr, drop_background_units: a.drop_background_units };
            fit(t, |e| train(&t.data, &t.out, &tc, t.resume, e), "test questions", |c, m, p| gradcam_vqa::card::write(&t.data, &t.out, &tc, c, m, p), |m| {
                eprintln!("test: VQA accuracy {:.3}, pointing {:.3} (centre {:.3})", m.overall.accuracy, m.pointing.accuracy(), m.pointing.centre_accuracy())
            })
        }
        TrainCommand::Classifier(a) => {
            use gradcam_classifier::train::{train, TrainConfig};
            let (settings, t) = (a.train.settings(a.epochs, a.weight_decay), &a.train);
            let tc = TrainConfig { settings, channels: a.channels, image_size: a.image_size, limit: a.limit };
            fit(t, |e| train(&t.data, &t.out, &tc, t.resume, e), "test images", |c, m, p| gradcam_classifier::card::write(&t.data, &t.out, c, m, p), |t| {
                eprintln!("test accuracy {:.3} on {} images; model card in {}", t.accuracy, t.images, a.train.out.join("README.md").display())
            })
        }
        TrainCommand::Clip(a) => {
            use gradcam_clip::train::{train, TrainConfig};
            let (settings, t) = (a.train.settings(a.c.epochs, weight_decay), &a.train);
            let tc = TrainConfig { settings, phrase_share: a.c.phrase_share, phrase_loss: a.c.phrase_loss };
            fit(t, |e| train(&t.data, &t.out, &tc, t.resume, e), "test images", |c, m, p| gradcam_clip::card::write(&t.data, &t.out, &tc, c, m, p), |f| eprintln!("test: {} ({} objects)", f.metrics, f.objects))
        }
    }
}

pub use gradcam_train::cli::{events, hint};

/// Runs `train` with its progress printed, then writes the model card (measured on the test
/// split, with a bar over its `items`), whose figures `summary` prints.
fn fit<C, M: Display, X, T, E: Into<anyhow::Error>, F: Into<anyhow::Error>>(
    args: &TrainArgs,
    train: impl FnOnce(&mut dyn FnMut(Event<M>)) -> Result<Checkpoint<C, M, X>, E>,
    items: &str,
    write: impl FnOnce(&Checkpoint<C, M, X>, f64, &dyn Fn(usize, usize)) -> Result<Option<T>, F>,
    summary: impl FnOnce(&T),
) -> anyhow::Result<ExitCode> {
    let start = std::time::Instant::now();
    let ckpt = train(&mut events()).map_err(hint)?;
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    eprintln!("trained {} epochs in {minutes:.1} min; model in {}", ckpt.epochs_done, args.out.display());
    let b = bar(0, items);
    let figures = write(&ckpt, minutes, &|i, n| {
        b.set_length(n as u64);
        b.set_position(i as u64)
    })
    .map_err(Into::into)?;
    b.finish_and_clear();
    if let Some(f) = &figures {
        summary(f);
    }
    Ok(ExitCode::SUCCESS)
}
