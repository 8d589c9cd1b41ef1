//! Winograd F(2x2, 3x3) on the pixel-major kernel's products.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::pixel::{pixels, Planes, MAXP, NC, ROW_SEGMENT};
use super::{Aligned, Out, Pass};
use crate::conv::ConvGeometry;
use crate::{Activation, Avx512};
/// Winograd F(2x2, 3x3) (Lavin and Gray, 2016) for 3x3 stride-1 convolutions: each 2x2 block of
/// outputs from a 4x4 input patch with 16 multiplications per (input, output) channel pair
/// instead of 36. The weights are transformed once (`U = G g G^T`); per call the patches are
/// transformed (`V = B^T d B`), multiplied channel-wise by the pixel-major kernel (16
/// products of `[tiles, C] x [C, 32]`) and transformed back (`Y = A^T M A`) with the bias and
/// activation. The transforms are exact in real arithmetic; in f32 the maps stay within the
/// goldens' 1e-3.
#[derive(Debug, Clone)]
pub(crate) struct Winograd {
    /// Per block of NC output channels, per position xi of the 4x4 transform: `[C][NC]`.
    data: Aligned,
    bias: Vec<f32>,
    m: usize,
    c: usize,
}

/// Input channels below which the transforms cost more than the products save.
pub(crate) const WINOGRAD_MIN_CHANNELS: usize = 512;

impl Winograd {
    /// From weights `[m, c, 3, 3]`.
    pub(crate) fn new(w: &[f32], bias: &[f32], m: usize, c: usize) -> Self {
        let blocks = m.div_ceil(NC);
        let mut data = Aligned::zeros(blocks * 16 * c * NC);
        for o in 0..m {
            for i in 0..c {
                let g = &w[(o * c + i) * 9..(o * c + i + 1) * 9];
                // G g (4x3), then (G g) G^T (4x4); G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
                let mut gg = [[0f32; 3]; 4];
                for col in 0..3 {
                    let (a, b, d) = (g[col], g[3 + col], g[6 + col]);
                    gg[0][col] = a;
                    gg[1][col] = 0.5 * (a + b + d);
                    gg[2][col] = 0.5 * (a - b + d);
                    gg[3][col] = d;
                }
                for (r, row) in gg.iter().enumerate() {
                    let (a, b, d) = (row[0], row[1], row[2]);
                    let u = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                    for (q, &v) in u.iter().enumerate() {
                        let xi = r * 4 + q;
                        data[(((o / NC) * 16 + xi) * c + i) * NC + o % NC] = v;
                    }
                }
            }
        }
        let mut b = bias.to_vec();
        b.resize(blocks * NC, 0.0);
        Self { data, bias: b, m, c }
    }
}

/// Whether [`conv_winograd`] takes a convolution of this geometry: 3x3 stride 1 with at least
/// 512 input channels on planes from 28 to 32 wide (VGG-16's conv4_2 and conv4_3), where the
/// products dominate the transforms. Measured against the direct pixel-major kernel (k in
/// passes) on single layers: 8.9-9.5 against 10.3-10.8 ms at 28x28 with 512 channels, but
/// slower at 14x14 (1.0 against 0.67 ms with 256 channels, 3.0 against 2.7 ms with 512) and at
/// 28x28 with 256 channels (3.1 against 2.7 ms), and on larger planes, where the transformed
/// input is 4x the input.
pub(crate) fn winograd_pays(g: &ConvGeometry) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == 1 && g.c >= WINOGRAD_MIN_CHANNELS && g.ow >= 28 && g.oh * g.ow <= 32 * 32
}

/// `dst[m, oh * ow] = act(conv3x3(x) + bias + res)` by Winograd F(2x2, 3x3); `x` `[c, h, w]`.
pub(crate) fn conv_winograd(cpu: Avx512, p: &Winograd, x: &[f32], g: &ConvGeometry, act: Activation, res: Option<&[f32]>, dst: &mut [MaybeUninit<f32>]) {
    let (c, plane) = (p.c, g.oh * g.ow);
    assert!(winograd_pays(g) && g.c == c && x.len() >= c * g.h * g.w && dst.len() >= p.m * plane && res.is_none_or(|r| r.len() >= p.m * plane), "winograd conv: sizes");
    let (th, tw) = (g.oh.div_ceil(2), g.ow.div_ceil(2));

    // V[ty][xi][ci][tx]: per tile row and position xi of the 4x4 transform, each channel's values
    // of the row's tiles (contiguous, so that the product kernel broadcasts neighbouring values
    // with immediate offsets).
    // Every value is written once below (each xi, channel and tile of each tile row), so it is
    // not zeroed first.
    let mut v: Vec<f32> = Vec::with_capacity(th * 16 * tw * c);
    // A tile row's four input rows of one channel, zero-padded to the tiles' extent, and B^T d.
    let wp = 2 * tw + 2;
    v.spare_capacity_mut()[..th * 16 * tw * c].par_chunks_mut(16 * tw * c).enumerate().for_each_init(
        || vec![0f32; 8 * wp],
        |rows, (ty, vr)| {
            let (n, l) = (g.w.min(wp.saturating_sub(g.pad_left)), g.pad_left.min(wp));
            for ci in 0..c {
                let src = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
                let (d, t) = rows.split_at_mut(4 * wp);
                for (r, row) in d.chunks_mut(wp).enumerate() {
                    row.fill(0.0);
                    let iy = (2 * ty + r) as isize - g.pad_top as isize;
                    if iy >= 0 && iy < g.h as isize {
                        row[l..l + n].copy_from_slice(&src[iy as usize * g.w..iy as usize * g.w + n]);
                    }
                }
                // B^T d, row by row over the whole width. B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
                let (d0, rest) = d.split_at(wp);
                let (d1, rest) = rest.split_at(wp);
                let (d2, d3) = rest.split_at(wp);
                let (t0, rest) = t.split_at_mut(wp);
                let (t1, rest) = rest.split_at_mut(wp);
                let (t2, t3) = rest.split_at_mut(wp);
                for j in 0..wp {
                    t0[j] = d0[j] - d2[j];
                    t1[j] = d1[j] + d2[j];
                    t2[j] = d2[j] - d1[j];
                    t3[j] = d1[j] - d3[j];
                }
                // (B^T d) B, column by column of each tile.
                for (r, tr) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                    for tx in 0..tw {
                        let q = &tr[2 * tx..2 * tx + 4];
                        let at = |xi: usize| (xi * c + ci) * tw + tx;
                        vr[at(r * 4)].write(q[0] - q[2]);
                        vr[at(r * 4 + 1)].write(q[1] + q[2]);
                        vr[at(r * 4 + 2)].write(q[2] - q[1]);
                        vr[at(r * 4 + 3)].write(q[1] - q[3]);
                    }
                }
            }
        },
    );
    // SAFETY: the loop above wrote every value: for each tile row, 16 positions x c channels x
    // tw tiles, all of its chunk.
    unsafe { v.set_len(th * 16 * tw * c) };
    let offsets: Vec<usize> = (0..c).map(|ci| ci * tw).collect();
    let zero = [0f32; NC];
    let blocks = p.m.div_ceil(NC);
    let threads = rayon::current_num_threads();
    // Groups of up to MAXP tiles within a tile row.
    let segments = tw.div_ceil(ROW_SEGMENT);
    let seg = tw.div_ceil(segments);
    let groups = th * segments;
    let chunks = (8 * threads).div_ceil(blocks).clamp(1, groups);
    let per = groups.div_ceil(chunks);
    let chunks = groups.div_ceil(per);
    let out = Out(dst.as_mut_ptr().cast::<f32>());
    let out = &out;
    (0..blocks * chunks).into_par_iter().for_each(|item| {
        let (blk, chunk) = (item / chunks, item % chunks);
        let u = &p.data[blk * 16 * c * NC..(blk + 1) * 16 * c * NC];
        let bias = &p.bias[blk * NC..(blk + 1) * NC];
        let channels = NC.min(p.m - blk * NC);
        let mut m = [[0f32; MAXP * NC]; 16];
        for grp in chunk * per..((chunk + 1) * per).min(groups) {
            let (ty, tx0) = (grp / segments, (grp % segments) * seg);
            let n = seg.min(tw - tx0);
            let t0 = ty * tw + tx0;
            for (xi, mx) in m.iter_mut().enumerate() {
                // SAFETY: `cpu` proves AVX-512F; u's slice
                // holds c x NC values; the n tiles' values ((ty * 16 + xi) * c + kk) * tw + tx0 + j
                // (kk < c, j < n) lie inside v; mx holds MAXP x NC values.
                unsafe { pixels(cpu, n, 1, c, &u[xi * c * NC..(xi + 1) * c * NC], v[(ty * 16 + xi) * c * tw + tx0..].as_ptr(), &offsets, &zero, Activation::Identity, Pass { first: true, last: true, own: true }, std::ptr::null(), mx, Planes::BUFFER) };
            }
            for j in 0..n {
                let (ty, tx) = ((t0 + j) / tw, (t0 + j) % tw);
                let (rows, cols) = ((g.oh - 2 * ty).min(2), (g.ow - 2 * tx).min(2));
                for l in 0..channels {
                    let mv = |xi: usize| m[xi][j * NC + l];
                    // A^T M A, A^T = [1 1 1 0; 0 1 -1 -1].
                    let mut s = [[0f32; 4]; 2];
                    for q in 0..4 {
                        s[0][q] = mv(q) + mv(4 + q) + mv(8 + q);
                        s[1][q] = mv(4 + q) - mv(8 + q) - mv(12 + q);
                    }
                    let o = blk * NC + l;
                    for (dy, row) in s.iter().enumerate().take(rows) {
                        let y = [row[0] + row[1] + row[2], row[1] - row[2] - row[3]];
                        for (dx, &val) in y.iter().enumerate().take(cols) {
                            let at = o * plane + (2 * ty + dy) * g.ow + 2 * tx + dx;
                            let r = res.map_or(0.0, |r| r[at]);
                            // SAFETY: output channel o < m, pixel inside the plane: inside dst,
                            // and in this item's channel block and tiles only.
                            unsafe { out.0.add(at).write(act.apply(val + bias[l] + r)) };
                        }
                    }
                }
            }
        }
    });
}
