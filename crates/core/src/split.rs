//! [`Split`]: any two closures (features, head) as an explainable model, with the guided
//! forward, the token layout and the attention a model may add.

use std::sync::Arc;

use candle_core::Tensor;

use crate::{Error, Explainable, Result, Rule};

/// A model given as two functions: `features` (input -> activations A `[n, K, h, w]` of the
/// explained layer) and `head` (A -> scores `[n, ...]`, one row per input). This is all a candle
/// model needs to be explained: run its layers up to the one you explain in `features`, the
/// rest in `head`.
///
/// The guided methods also need the whole model with guided ReLUs: give it with
/// [`Split::guided`] (a forward whose ReLUs are built with [`Rule::Guided`], e.g.
/// `Activation::Relu.forward_with(x, Rule::Guided)`); without it they are refused, never run
/// with the plain gradient.
///
/// A transformer's layer is tokens, not a grid: give its [`Layout`](crate::Layout) with
/// [`Split::layout`] (`features` then returns each image's row `[n, len]`, the tokens flattened
/// and anything else the head reads), and its attention for rollout and relevance with
/// [`Split::attention`].
pub struct Split<F, H, G = NoGuidedForward> {
    features: F,
    head: H,
    guided: G,
    layout: crate::Layout,
    attention: Option<AttentionForward>,
}

/// A whole transformer, input to output rows, that passes each block's attention probabilities
/// through the function it is given (see [`Split::attention`]).
pub type AttentionForward = Arc<dyn Fn(&Tensor, &dyn Fn(Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> + Send + Sync>;

/// A [`Split`]'s guided forward: none, or a closure from the input to the output rows.
pub trait GuidedForward {
    /// The output rows of `input` through the guided twin of the model, if there is one.
    fn guided_forward(&self, input: &Tensor) -> Option<candle_core::Result<Tensor>>;
}

/// A [`Split`] without a guided forward.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGuidedForward;

impl GuidedForward for NoGuidedForward {
    fn guided_forward(&self, _input: &Tensor) -> Option<candle_core::Result<Tensor>> {
        None
    }
}

impl<G: Fn(&Tensor) -> candle_core::Result<Tensor>> GuidedForward for G {
    fn guided_forward(&self, input: &Tensor) -> Option<candle_core::Result<Tensor>> {
        Some(self(input))
    }
}

impl<F, H> Split<F, H>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
    H: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    /// The model split into `features` and `head`.
    pub fn new(features: F, head: H) -> Self {
        Split { features, head, guided: NoGuidedForward, layout: crate::Layout::Grid, attention: None }
    }
}

impl<F, H, G> Split<F, H, G> {
    /// The same split, with `forward` (input -> output rows, the model's ReLUs built with
    /// [`Rule::Guided`]) for Guided Backpropagation and Guided Grad-CAM.
    pub fn guided<G2: Fn(&Tensor) -> candle_core::Result<Tensor>>(self, forward: G2) -> Split<F, H, G2> {
        Split { features: self.features, head: self.head, guided: forward, layout: self.layout, attention: self.attention }
    }

    /// The same split, its activations holding the grid as `layout` says (a transformer's
    /// tokens: [`crate::Layout::tokens`]).
    pub fn layout(mut self, layout: crate::Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The same split, with the whole model for [`crate::Method::Rollout`] and
    /// [`crate::Method::Relevance`]: `forward(input, attend)` gives the output rows and passes
    /// each block's attention probabilities (the softmax's output, `[1, heads, T, T]`) through
    /// `attend`, using what it returns in their place. Needs a token [`Split::layout`] (the class
    /// token's row is read over the grid).
    pub fn attention(mut self, forward: impl Fn(&Tensor, &dyn Fn(Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> + Send + Sync + 'static) -> Self {
        self.attention = Some(Arc::new(forward));
        self
    }
}

impl<F, H, G> Explainable for Split<F, H, G>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
    H: Fn(&Tensor) -> candle_core::Result<Tensor>,
    G: GuidedForward,
{
    fn features(&self, input: &Tensor) -> Result<Tensor> {
        let a = (self.features)(input)?;
        match self.layout {
            crate::Layout::Grid if a.rank() != 4 => Err(Error::Shape(format!("features must give activations [n, K, h, w] (or, with Split::layout, rows [n, len]); got {:?}", a.dims()))),
            crate::Layout::Packed { .. } if a.rank() != 2 => Err(Error::Shape(format!("with a packed layout, features must give rows [n, len]; got {:?}", a.dims()))),
            _ => Ok(a),
        }
    }

    fn head(&self, activations: &Tensor) -> Result<Tensor> {
        Ok((self.head)(activations)?)
    }

    fn forward_with(&self, input: &Tensor, rule: Rule) -> Result<Tensor> {
        match (rule, self.guided.guided_forward(input)) {
            (Rule::Exact, _) => self.head(&self.features(input)?),
            (Rule::Guided, Some(out)) => Ok(out?),
            (Rule::Guided, None) => Err(Error::CannotGuide { reason: "this Split has no guided forward: give one with Split::guided".into() }),
        }
    }

    fn layout(&self) -> crate::Layout {
        self.layout
    }

    fn attention(&self, input: &Tensor, score: Option<crate::attention::ScoreFn<'_>>) -> Result<crate::Attention> {
        let Some(forward) = &self.attention else {
            return Err(Error::NoAttention { reason: "this Split gives none: add the model's forward with Split::attention".into() });
        };
        let crate::Layout::Packed { start, h, w, channels } = self.layout else {
            return Err(Error::NoAttention { reason: "the Split's layout is a grid, not tokens: give it with Split::layout(Layout::tokens(..))".into() });
        };
        crate::attention::record(input, score, start / channels.max(1), (h, w), forward.as_ref())
    }
}
