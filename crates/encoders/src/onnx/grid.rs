//! Token layers: where a transformer's value lies on the image. A 3-D value `[1, P + h*w, D]`
//! holds P prefix tokens (class, distillation, registers) and then the patch grid row-major; a
//! channels-last 4-D value `[1, h, w, C]` (Swin) is the grid itself. The grid comes from the
//! input size and the patch embedding (the first Conv whose kernel equals its stride), coarser by
//! powers of two after patch merging. Also here: the attention Softmaxes (for rollout and
//! relevance), the default layer of a transformer, and the values a head reads from the forward
//! pass around its layer (the residual stream).

use std::collections::HashSet;

use candle_core::DType;
use gradcam_core::SettingError;

use super::ops::attr_ints;
use super::OnnxModel;
use crate::{Error, Result};

/// Most prefix tokens a grid is guessed with (class, distillation and a few registers).
const MAX_PREFIX: usize = 16;

/// A `--tokens P:HxW` override: P prefix tokens, then an H x W grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenGrid {
    pub prefix: usize,
    pub h: usize,
    pub w: usize,
}

impl std::str::FromStr for TokenGrid {
    type Err = SettingError;

    fn from_str(s: &str) -> std::result::Result<Self, SettingError> {
        let bad = || SettingError::value("tokens", format!("{s:?}"), "give P:HxW (prefix tokens, then the grid), e.g. 1:14x14");
        let (p, grid) = s.split_once(':').ok_or_else(bad)?;
        let (h, w) = grid.split_once(['x', 'X']).ok_or_else(bad)?;
        let n = |v: &str| v.trim().parse::<usize>().ok().filter(|&n| n <= 1 << 16);
        let (prefix, h, w) = (n(p).ok_or_else(bad)?, n(h).filter(|&v| v > 0).ok_or_else(bad)?, n(w).filter(|&v| v > 0).ok_or_else(bad)?);
        Ok(TokenGrid { prefix, h, w })
    }
}

/// How an explained value lies on the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueLayout {
    /// `[1, C, h, w]`.
    Nchw,
    /// `[1, prefix + h*w, dim]`.
    Tokens { prefix: usize, h: usize, w: usize, dim: usize },
    /// `[1, h, w, channels]`.
    ChannelsLast { h: usize, w: usize, channels: usize },
}

impl ValueLayout {
    /// As `gradcam layers` shows it.
    pub fn describe(&self) -> String {
        match self {
            ValueLayout::Nchw => String::new(),
            ValueLayout::Tokens { prefix, h, w, .. } => format!("tokens {prefix}+{h}x{w}"),
            ValueLayout::ChannelsLast { h, w, .. } => format!("channels-last {h}x{w}"),
        }
    }
}

impl OnnxModel {
    /// The patch grid (found at load by [`OnnxModel::find_patch_grid`]).
    pub(super) fn patch_grid(&self) -> Option<(usize, usize)> {
        self.patch
    }

    /// The patch grid: the output size of the first Conv whose kernel equals its stride (> 1).
    pub(super) fn find_patch_grid(&self) -> Option<(usize, usize)> {
        self.nodes.iter().filter(|n| n.op_type == "Conv").find_map(|n| {
            let k = attr_ints(n, "kernel_shape")?;
            let s = attr_ints(n, "strides")?;
            if k.len() != 2 || k != s || k[0] < 2 {
                return None;
            }
            match self.shapes.get(&n.outputs[0])?.as_slice() {
                [1, _, h, w] => Some((*h, *w)),
                _ => None,
            }
        })
    }

    /// The grids a token count may lie on: the patch grid, then coarser ones (patch merging).
    fn grids(&self) -> Vec<(usize, usize)> {
        let Some((h, w)) = self.patch_grid() else { return Vec::new() };
        (0..6).map(|k| (h >> k, w >> k)).filter(|&(a, b)| a > 0 && b > 0).collect()
    }

    /// The layout of a value, guessed from its shape and the graph (no override).
    pub(super) fn guess(&self, value: &str) -> Option<ValueLayout> {
        let shape = self.shapes.get(value)?;
        let grids = self.grids();
        match shape.as_slice() {
            [1, c, h, w] => {
                let channels_last = grids.contains(&(*c, *h)) && !grids.contains(&(*h, *w));
                let both = grids.contains(&(*c, *h)) && grids.contains(&(*h, *w));
                if channels_last || (both && self.normalises_last_axis(value)) {
                    return Some(ValueLayout::ChannelsLast { h: *c, w: *h, channels: *w });
                }
                Some(ValueLayout::Nchw)
            }
            // Prefix tokens on the patch grid; the coarser grids of patch merging have none.
            [1, t, d] => grids.iter().enumerate().find(|&(k, &(h, w))| *t >= h * w && *t - h * w <= if k == 0 { MAX_PREFIX } else { 0 }).map(|(_, &(h, w))| ValueLayout::Tokens { prefix: *t - h * w, h, w, dim: *d }),
            _ => None,
        }
    }

    /// Whether `value` comes from a LayerNormalization over its last axis (or a Transpose that
    /// moves the channels last).
    fn normalises_last_axis(&self, value: &str) -> bool {
        let Some(&i) = self.producer.get(value) else { return false };
        let n = &self.nodes[i];
        match n.op_type.as_str() {
            "LayerNormalization" => matches!(super::ops::attr_int(n, "axis", -1), -1 | 3),
            "Transpose" => attr_ints(n, "perm").is_some_and(|p| p == [0, 2, 3, 1]),
            _ => false,
        }
    }

    /// The layout of the explained value, with the user's overrides checked against its shape.
    pub(super) fn layout_of(&self, value: &str) -> Result<ValueLayout> {
        let shape = self.shapes.get(value).cloned().unwrap_or_default();
        let refuse = |why: String| -> Result<ValueLayout> { Err(SettingError::value("layer", value, why).into()) };
        if let Some(t) = self.tokens {
            return match shape.as_slice() {
                [1, n, d] if *n == t.prefix + t.h * t.w => Ok(ValueLayout::Tokens { prefix: t.prefix, h: t.h, w: t.w, dim: *d }),
                [1, n, _] => refuse(format!("has {n} tokens, not the {} of --tokens {}:{}x{}", t.prefix + t.h * t.w, t.prefix, t.h, t.w)),
                _ => refuse(format!("has shape {shape:?}; --tokens is for token values [1, tokens, width]")),
            };
        }
        if self.channels_last {
            return match shape.as_slice() {
                [1, h, w, c] => Ok(ValueLayout::ChannelsLast { h: *h, w: *w, channels: *c }),
                _ => refuse(format!("has shape {shape:?}; --channels-last is for 4-D values [1, h, w, channels]")),
            };
        }
        match (shape.as_slice(), self.guess(value)) {
            (_, Some(layout)) => Ok(layout),
            ([1, t, _], None) => {
                let grid = self.patch_grid().map_or("no patch embedding (a Conv whose kernel equals its stride) was found".to_string(), |(h, w)| format!("the patch grid is {h}x{w}"));
                refuse(format!(
                    "has {t} tokens, which lie on no grid of the {}x{} input ({grid}); give the layout with --tokens P:HxW",
                    self.input_size.0, self.input_size.1
                ))
            }
            ([1, d], None) if !self.attention_softmaxes().is_empty() => refuse(format!("has shape [1, {d}]: it comes after the tokens are pooled (the class token or the mean), so it has no grid left; explain a block's tokens (the default is the last block's attention input)")),
            _ => Err(Error::LayerShape { layer: value.to_string(), shape, nearest: self.nearest(value) }),
        }
    }

    /// The attention Softmaxes: over the last axis of a value `[.., T, T]` (T > 1), in graph order.
    pub(super) fn attention_softmaxes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                let n = &self.nodes[i];
                let Some(s) = self.shapes.get(&n.outputs[0]) else { return false };
                let r = s.len();
                let a = super::ops::attr_int(n, "axis", -1);
                n.op_type == "Softmax" && r >= 3 && (a == -1 || a == r as i64 - 1) && s[r - 1] == s[r - 2] && s[r - 1] > 1
            })
            .collect()
    }

    /// A transformer's default layer: the input of its last attention, i.e. the output of the
    /// last LayerNormalization before that attention's Softmax with a token layout (torchvision's
    /// `ln_1`, timm's `norm1`); without a LayerNormalization op (a decomposed one), the last token
    /// value before it that a MatMul by constant weights reads (the attention's projection).
    pub(super) fn transformer_default(&self) -> Option<String> {
        let last = *self.attention_softmaxes().last()?;
        let before = self.ancestors(&self.nodes[last].outputs[0]);
        let tries = std::cell::Cell::new(0);
        let gridded = |v: &String| {
            let on_grid = matches!(self.guess(v), Some(ValueLayout::Tokens { .. } | ValueLayout::ChannelsLast { .. })) && tries.get() < super::MAX_DEFAULT_TRIES;
            tries.set(tries.get() + on_grid as usize);
            on_grid && self.head_set(v).is_ok()
        };
        let norm = (0..self.nodes.len()).rev().filter(|i| before.contains(i)).find_map(|i| {
            let n = &self.nodes[i];
            (n.op_type == "LayerNormalization" && gridded(&n.outputs[0])).then(|| n.outputs[0].clone())
        });
        norm.or_else(|| {
            (0..self.nodes.len()).rev().filter(|i| before.contains(i)).find_map(|i| {
                let n = &self.nodes[i];
                let projection = matches!(n.op_type.as_str(), "MatMul" | "Gemm") && n.inputs.get(1).is_some_and(|w| self.constants.contains_key(w));
                (projection && gridded(&n.inputs[0])).then(|| n.inputs[0].clone())
            })
        })
    }

    /// The values the head `head` reads that the forward pass computes (besides `layer`): the
    /// residual stream around the layer. Nodes computing shapes from them join the head (so that
    /// they follow its batch size). An error names a value that cannot be carried per image.
    pub(super) fn side_values(&self, layer: &str, head: &mut Vec<usize>) -> Result<Vec<String>> {
        let from_input = self.descendants(&self.input);
        loop {
            let set: HashSet<usize> = head.iter().copied().collect();
            let mut sides = Vec::new();
            let mut pull = Vec::new();
            for &i in head.iter() {
                for v in &self.nodes[i].inputs {
                    let Some(&p) = self.producer.get(v) else { continue };
                    if v == layer || set.contains(&p) || !from_input.contains(&p) || sides.contains(v) {
                        continue;
                    }
                    // Shape arithmetic on a carried value: recomputed in the head.
                    if self.nodes[p].op_type == "Shape" || self.constants_dtype(v) == Some(DType::I64) {
                        pull.push(p);
                        continue;
                    }
                    sides.push(v.clone());
                }
            }
            if !pull.is_empty() {
                head.extend(pull);
                head.sort_unstable();
                head.dedup();
                continue;
            }
            for v in &sides {
                let shape = self.shapes.get(v).cloned().unwrap_or_default();
                if shape.first() != Some(&1) {
                    return Err(Error::Data(format!(
                        "{}: the head from {layer:?} also reads {v:?} (shape {shape:?}), computed from the image without passing through {layer:?}, and its first dimension is not the batch; explain another value",
                        self.name
                    )));
                }
            }
            return Ok(sides);
        }
    }

    /// The dtype a value had when the graph was traced (I64 for shapes and indices).
    fn constants_dtype(&self, value: &str) -> Option<DType> {
        self.dtypes.get(value).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::TokenGrid;

    #[test]
    fn token_grids_parse_and_bad_ones_name_the_flag() {
        assert_eq!("1:14x14".parse::<TokenGrid>().unwrap(), TokenGrid { prefix: 1, h: 14, w: 14 });
        assert_eq!("0:7X9".parse::<TokenGrid>().unwrap(), TokenGrid { prefix: 0, h: 7, w: 9 });
        for bad in ["14x14", "1:14", "a:1x1", "1:0x4", "-1:2x2"] {
            let e = bad.parse::<TokenGrid>().unwrap_err();
            assert!(e.to_string().starts_with("tokens"), "{e}");
        }
    }
}

/// What rollout and relevance read from an ONNX transformer: the whole graph run with a gradient
/// tap on each global attention Softmax.
pub(super) struct AttentionProbe {
    full: super::plan::Part,
    output: String,
    softmaxes: HashSet<String>,
    prefix: usize,
    grid: (usize, usize),
}

impl AttentionProbe {
    /// The probe of `model`, or why it has none (no Softmax over all the patch tokens).
    pub(super) fn new(model: &OnnxModel) -> std::result::Result<AttentionProbe, String> {
        let Some((h, w)) = model.patch_grid() else { return Err("no patch embedding (a Conv whose kernel equals its stride) was found".into()) };
        let all = model.attention_softmaxes();
        let global: Vec<(usize, usize)> = all
            .iter()
            .filter_map(|&i| {
                let t = *model.shapes.get(&model.nodes[i].outputs[0])?.last()?;
                (t >= h * w && t - h * w <= MAX_PREFIX).then_some((i, t - h * w))
            })
            .collect();
        let Some(&(_, prefix)) = global.first() else {
            return Err(if all.is_empty() {
                "the graph has no attention Softmax (over the last axis of a [.., T, T] value)".into()
            } else {
                format!("its {} attention Softmaxes are not over the {h}x{w} patch tokens (windowed attention, as in Swin, has no class token row)", all.len())
            });
        };
        let softmaxes: HashSet<String> = global.iter().filter(|(_, p)| *p == prefix).map(|&(i, _)| model.nodes[i].outputs[0].clone()).collect();
        let needed = model.ancestors(&model.output);
        let set: Vec<usize> = (0..model.nodes.len()).filter(|i| needed.contains(i)).collect();
        let mut keep: HashSet<String> = softmaxes.clone();
        keep.insert(model.output.clone());
        let full = super::plan::Part::new(model.nodes.clone(), set, &model.constants, &model.input, &model.output, keep).map_err(|e| e.to_string())?;
        Ok(AttentionProbe { full, output: model.output.clone(), softmaxes, prefix, grid: (h, w) })
    }

    /// The attention of the single image `input`, with gradients for `score` when given.
    pub(super) fn run(&self, input: &candle_core::Tensor, score: Option<gradcam_core::attention::ScoreFn<'_>>) -> gradcam_core::Result<gradcam_core::Attention> {
        gradcam_core::attention::record(input, score, self.prefix, self.grid, &|x, attend| {
            let tap = |name: &str, t: candle_core::Tensor| if self.softmaxes.contains(name) { attend(t) } else { Ok(t) };
            Ok(self.full.run_with(x, &[], gradcam_kernels::Rule::Exact, std::slice::from_ref(&self.output), Some(&tap))?.remove(0))
        })
    }
}
