//! A depthwise convolution over a batch with the images in the vector lanes: for each channel,
//! the same pixel of 16 images is one 16-float vector, so that every tap of the kernel is one
//! full-width multiply-add whatever the plane's size. One image's planes of a network's last
//! stages (7x7, 14x14) are too small to vectorise along a row (most of the time went into the
//! edges and the per-plane setup); a batch's are not.

use rayon::prelude::*;

use crate::conv::ConvGeometry;
use crate::{Activation, Avx512, Pointwise};

/// Images per vector.
pub(crate) const LANES: usize = 16;

/// The weights and epilogue of one depthwise convolution.
pub(crate) struct Depthwise<'a> {
    /// `[c, kh * kw]`.
    pub weight: &'a [f32],
    /// `[c]`.
    pub bias: &'a [f32],
    pub act: Activation,
    pub smooth: Option<Pointwise>,
}

/// `out[b, c] = act(conv(x[b, c]) + bias[c])` for `x` `[batch, c, h, w]` and `out`
/// `[batch, c, oh, ow]`, the images by groups of [`LANES`] (the last group padded with zeros),
/// the (group, channel) items spread over the threads. The sums are taken in the order of the
/// per-image kernel (bias, then the taps row by row), so the values are the same.
pub(crate) fn depthwise_batch(cpu: Option<Avx512>, d: &Depthwise<'_>, x: &[f32], g: &ConvGeometry, out: &mut [f32]) {
    let (c, kk) = (g.c, g.kh * g.kw);
    let (plane_in, plane) = (g.h * g.w, g.oh * g.ow);
    assert!(x.len() >= g.batch * c * plane_in && out.len() >= g.batch * c * plane && d.weight.len() >= c * kk && d.bias.len() >= c, "depthwise_batch: sizes");
    let (hp, wp) = ((g.oh - 1) * g.stride + g.kh, (g.ow - 1) * g.stride + g.kw);
    let groups = g.batch.div_ceil(LANES);
    let dst = Out(out.as_mut_ptr());
    let dst = &dst;
    let (act, smooth) = (d.act, d.smooth);
    (0..groups * c).into_par_iter().with_min_len((4096 / plane.max(1)).max(1)).for_each_init(
        || (Vec::new(), vec![0f32; plane * LANES]),
        |(buf, res): &mut (Vec<f32>, Vec<f32>), item| {
            let (grp, ch) = (item / c, item % c);
            let images = LANES.min(g.batch - grp * LANES);
            // The padded input planes of the group's images, [hp][wp][LANES].
            buf.clear();
            buf.resize(hp * wp * LANES, 0.0);
            let (rows, cols) = (g.h.min(hp.saturating_sub(g.pad_top)), g.w.min(wp.saturating_sub(g.pad_left)));
            let srcs: [&[f32]; LANES] = std::array::from_fn(|l| if l < images { &x[((grp * LANES + l) * c + ch) * plane_in..][..plane_in] } else { &[] });
            for iy in 0..rows {
                let line = &mut buf[((iy + g.pad_top) * wp + g.pad_left) * LANES..][..cols * LANES];
                for (ix, px) in line.chunks_exact_mut(LANES).enumerate() {
                    for (v, src) in px.iter_mut().zip(&srcs[..images]) {
                        *v = src[iy * g.w + ix];
                    }
                }
            }
            let wk = &d.weight[ch * kk..(ch + 1) * kk];
            match cpu {
                // SAFETY: the token proves the CPU has AVX-512F.
                #[cfg(target_arch = "x86_64")]
                Some(_) => unsafe { taps_avx512(buf, wp, wk, d.bias[ch], g, res) },
                _ => taps(buf, wp, wk, d.bias[ch], g, res),
            }
            for l in 0..images {
                // SAFETY: item (grp, ch) alone writes the planes of channel ch of the group's
                // images, each inside `out` (asserted above), while `out` is borrowed here.
                let plane_out = unsafe { std::slice::from_raw_parts_mut(dst.0.add(((grp * LANES + l) * c + ch) * plane), plane) };
                match (smooth, act) {
                    (None, Activation::Relu6) => plane_out.iter_mut().enumerate().for_each(|(p, v)| *v = res[p * LANES + l].clamp(0.0, 6.0)),
                    (None, _) => plane_out.iter_mut().enumerate().for_each(|(p, v)| *v = act.apply(res[p * LANES + l])),
                    (Some(s), _) => plane_out.iter_mut().enumerate().for_each(|(p, v)| *v = s.apply(act.apply(res[p * LANES + l]))),
                }
            }
        },
    );
}

/// The output, written by the items of [`depthwise_batch`], each its own planes.
struct Out(*mut f32);
// SAFETY: every item writes only its own planes (see `depthwise_batch`), and the pointer
// outlives the parallel loop that uses it.
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn taps_avx512(buf: &[f32], wp: usize, wk: &[f32], bias: f32, g: &ConvGeometry, res: &mut [f32]) {
    taps(buf, wp, wk, bias, g, res)
}

/// Every output pixel's vector: the bias, then each tap's product added, row by row.
#[inline(always)]
fn taps(buf: &[f32], wp: usize, wk: &[f32], bias: f32, g: &ConvGeometry, res: &mut [f32]) {
    let s = g.stride;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let mut acc = [bias; LANES];
            for ky in 0..g.kh {
                let row = &buf[((oy * s + ky) * wp + ox * s) * LANES..][..g.kw * LANES];
                for (kx, v) in row.chunks_exact(LANES).enumerate() {
                    let w = wk[ky * g.kw + kx];
                    for l in 0..LANES {
                        acc[l] += w * v[l];
                    }
                }
            }
            res[(oy * g.ow + ox) * LANES..][..LANES].copy_from_slice(&acc);
        }
    }
}
