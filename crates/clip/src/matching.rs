//! Any image tower that gives an embedding, turned into a model whose output row is the
//! similarity of the image with each text: what the methods explain.

use candle_core::{Tensor, D};
use gradcam_core::attention::ScoreFn;
use gradcam_core::{Attention, Explainable, Layout, Score};

use crate::model::normalize;

/// CLIP's logit scale for zero-shot probabilities: softmax over 100 x cosine.
pub const LOGIT_SCALE: f64 = 100.0;

/// `image` (split at its explained layer, its head giving the image embedding `[n, E]`) matched
/// against texts: the head's row is each text's cosine similarity with the image, times `scale`
/// (1, or [`LOGIT_SCALE`] for zero-shot logits).
pub struct Matching<'a> {
    pub image: &'a dyn Explainable,
    /// The texts' normalised embeddings `[T, E]`.
    pub texts: Tensor,
    pub scale: f64,
}

impl Matching<'_> {
    /// The row of an image embedding `[n, E]`: `[n, T]`.
    pub fn scores(&self, embedding: &Tensor) -> gradcam_core::Result<Tensor> {
        let e = embedding.flatten_from(1)?;
        if e.dim(1)? != self.texts.dim(1)? {
            return Err(gradcam_core::Error::Shape(format!("the image embedding has {} values and the text embeddings {}; the towers do not share a space", e.dim(1)?, self.texts.dim(1)?)));
        }
        let s = normalize(&e).map_err(gradcam_core::Error::from)?.matmul(&self.texts.t()?)?;
        Ok(if self.scale == 1.0 { s } else { (s * self.scale)? })
    }
}

impl Explainable for Matching<'_> {
    fn features(&self, input: &Tensor) -> gradcam_core::Result<Tensor> {
        self.image.features(input)
    }

    fn head(&self, a: &Tensor) -> gradcam_core::Result<Tensor> {
        self.scores(&self.image.head(a)?)
    }

    fn layout(&self) -> Layout {
        self.image.layout()
    }

    fn attention(&self, input: &Tensor, score: Option<ScoreFn<'_>>) -> gradcam_core::Result<Attention> {
        let composed = score.map(|s| move |e: &Tensor| -> gradcam_core::Result<Tensor> { s(&self.scores(e)?) });
        let mut att = match &composed {
            Some(f) => self.image.attention(input, Some(f))?,
            None => self.image.attention(input, None)?,
        };
        att.output = self.scores(&att.output)?;
        Ok(att)
    }
}

/// The zero-shot probability of text `index` among the texts: softmax of the row (logits at
/// [`LOGIT_SCALE`]) at `index`, the target that makes each text's map class-discriminative.
#[derive(Debug, Clone, Copy)]
pub struct Probability(pub usize);

impl Score for Probability {
    fn score(&self, row: &Tensor) -> gradcam_core::Result<Tensor> {
        let row = row.flatten_all()?;
        let n = row.dim(0)?;
        if self.0 >= n {
            return Err(gradcam_core::Error::ClassOutOfRange { class: self.0, num_classes: n });
        }
        // Plain ops (candle's fused softmax has no backward).
        let max = row.max_keepdim(D::Minus1)?.detach();
        let e = row.broadcast_sub(&max)?.exp()?;
        Ok(e.get(self.0)?.broadcast_div(&e.sum_all()?)?)
    }
}
