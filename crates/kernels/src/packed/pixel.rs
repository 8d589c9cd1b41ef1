//! The pixel-major kernel: output channels in the vector lanes, output pixels broadcast from the
//! (zero-padded) input, no im2col.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{Aligned, ChannelBlocks, Out, Pass};
use crate::conv::ConvGeometry;
use crate::{Activation, Avx512};
/// Output channels per block of the pixel-major kernel: two 16-float vectors.
pub(crate) const NC: usize = 32;
/// Pixels per micro-tile of the pixel-major kernel at most (28 accumulators): a whole row of a
/// 14x14 plane.
pub(super) const MAXP: usize = 14;
/// Winograd tiles per micro-tile of its products at most.
pub(super) const ROW_SEGMENT: usize = 12;

/// Whether the pixel-major kernel takes a convolution of this geometry (strides 1 and 2): every
/// kernel larger than 1x1, whose im2col costs the column panels more than the pixel-major
/// kernel's transposed stores, and 1x1 kernels on narrow outputs, where column panels would
/// waste vector lanes (measured on ResNet-50 and VGG-16 with `bench classify --layers`).
pub(crate) fn pixel_major_pays(g: &ConvGeometry) -> bool {
    (g.kh * g.kw > 1 || g.ow <= 16) && (g.stride == 1 || g.stride == 2)
}

/// A convolution computed pixel by pixel with the output channels in the vector lanes (the
/// orientation of oneDNN's and MLAS's blocked-layout kernels), reading the input straight from
/// (a zero-padded copy of) the image, no im2col: each step of k broadcasts one input value per
/// pixel of a row segment and multiplies it by 32 channels' weights. Channels `c0..` of `x`
/// (`[c, h, w]`), output `dst` `[m, oh * ow]`; `res`, when given, is added before the
/// activation.
pub(crate) fn conv_pixel_major(cpu: Avx512, p: &ChannelBlocks, x: &[f32], g: &ConvGeometry, c0: usize, act: Activation, res: Option<&[f32]>, dst: &mut [MaybeUninit<f32>]) {
    let plane = g.oh * g.ow;
    assert!(dst.len() >= p.m * plane && res.is_none_or(|r| r.len() >= p.m * plane) && pixel_major_pays(g), "pixel-major conv: sizes");
    let cg = p.k / (g.kh * g.kw);
    // The padded extent the windows read.
    let (hp, wp) = ((g.oh - 1) * g.stride + g.kh, (g.ow - 1) * g.stride + g.kw);
    let needs_copy = g.pad_top > 0 || g.pad_left > 0 || hp > g.h || wp > g.w;
    let padded: Vec<f32>;
    let (src, hs, ws): (&[f32], usize, usize) = if needs_copy {
        // Every value written once, padding included, in one parallel pass (no zeroing first).
        let mut buf: Vec<f32> = Vec::with_capacity(cg * hp * wp);
        buf.spare_capacity_mut()[..cg * hp * wp].par_chunks_mut(hp * wp).enumerate().for_each(|(ci, plane_out)| {
            let src = &x[(c0 + ci) * g.h * g.w..(c0 + ci + 1) * g.h * g.w];
            let (l, n) = (g.pad_left.min(wp), (wp.saturating_sub(g.pad_left)).min(g.w));
            for (r, row) in plane_out.chunks_mut(wp).enumerate() {
                let line = r.checked_sub(g.pad_top).filter(|&iy| iy < g.h).map(|iy| &src[iy * g.w..iy * g.w + n]);
                match line {
                    Some(line) => {
                        row[..l].iter_mut().for_each(|v| _ = v.write(0.0));
                        row[l..l + n].iter_mut().zip(line).for_each(|(v, &q)| _ = v.write(q));
                        row[l + n..].iter_mut().for_each(|v| _ = v.write(0.0));
                    }
                    None => row.iter_mut().for_each(|v| _ = v.write(0.0)),
                }
            }
        });
        // SAFETY: the loop above wrote each of the cg * hp * wp values (every row of every plane,
        // each row in full).
        unsafe { buf.set_len(cg * hp * wp) };
        padded = buf;
        (&padded[..], hp, wp)
    } else {
        (&x[c0 * g.h * g.w..(c0 + cg) * g.h * g.w], g.h, g.w)
    };
    let offsets: Vec<usize> = (0..p.k).map(|kk| (kk / (g.kh * g.kw)) * hs * ws + ((kk / g.kw) % g.kh) * ws + kk % g.kw).collect();
    // The last window's last value is the largest address read.
    assert!(offsets.last().is_none_or(|&o| o + ((g.oh - 1) * ws + g.ow - 1) * g.stride < src.len()), "pixel-major conv: window outside the input");
    // Micro-tiles: (input offset of the first window, output pixel, pixels). A 1x1 stride-1
    // convolution reads and writes its plane as one long row, so that narrow planes (7x7) still
    // fill whole tiles; others go row by row, in as few segments of at most MAXP pixels as
    // possible, as even as possible (14 each on 56-, 112- and 224-wide rows).
    let flat = g.kh == 1 && g.kw == 1 && g.stride == 1 && (hs, ws) == (g.oh, g.ow);
    let (rows, width) = if flat { (1, plane) } else { (g.oh, g.ow) };
    let segments = width.div_ceil(MAXP);
    let seg = width.div_ceil(segments);
    let tiles: Vec<(usize, usize, usize)> = (0..rows)
        .flat_map(|oy| (0..width).step_by(seg).map(move |ox0| (oy * g.stride * ws + ox0 * g.stride, oy * width + ox0, seg.min(width - ox0))))
        .collect();
    let blocks = p.m.div_ceil(NC);
    let threads = rayon::current_num_threads();
    let chunks = (8 * threads).div_ceil(blocks).clamp(1, tiles.len());
    let per = tiles.len().div_ceil(chunks);
    let chunks = tiles.len().div_ceil(per);
    // k in passes whose weights (kc x NC values) stay in the L1 cache while every tile of the
    // item uses them; the partial sums wait in `acc` between passes.
    let passes = if p.k <= PIXEL_ONE_PASS { 1 } else { p.k.div_ceil(PIXEL_KC) };
    let kc = p.k.div_ceil(passes);
    let out = Out(dst.as_mut_ptr().cast::<f32>());
    let out = &out;
    (0..blocks * chunks).into_par_iter().for_each_init(Aligned::default, |acc, item| {
        let (blk, chunk) = (item / chunks, item % chunks);
        let w = &p.data[blk * p.k * NC..(blk + 1) * p.k * NC];
        let bias = &p.bias[blk * NC..(blk + 1) * NC];
        let channels = NC.min(p.m - blk * NC);
        let mine = &tiles[chunk * per..((chunk + 1) * per).min(tiles.len())];
        acc.resize(mine.len() * MAXP * NC);
        for k0 in (0..p.k).step_by(kc) {
            let len = kc.min(p.k - k0);
            let pass = Pass { first: k0 == 0, last: k0 + len == p.k, own: false };
            // The weights of the next pass (this block's, else the next block's first): the
            // second and third tiles bring them into L2 while the pass computes, one line per
            // step each, so that the next pass does not wait on memory.
            let next = if k0 + len < p.k { &w[(k0 + len) * NC..] } else { p.data.get((blk + 1) * p.k * NC..).unwrap_or(&[]) };
            for (i, (&(base, pixel, n), tmp)) in mine.iter().zip(acc.chunks_exact_mut(MAXP * NC)).enumerate() {
                let ahead = match i {
                    1 | 2 => next.get((i - 1) * len * 16..).map_or(std::ptr::null(), |a| a.as_ptr()),
                    _ => std::ptr::null(),
                };
                // The last pass writes the tile's pixels of the block's channels.
                let at = blk * NC * plane + pixel;
                let to = Planes { out: out.0.wrapping_add(at), res: res.map_or(std::ptr::null(), |r| r[at..].as_ptr()), ld: plane, channels };
                // The first tile loads this pass's weights and prefetches them ahead into L1.
                let pass = Pass { own: i == 0, ..pass };
                // SAFETY: `cpu` proves AVX-512F; w's slice holds
                // len x NC values; every address base + offsets[kk] + j * stride (j < n) lies
                // inside src (the assert above bounds the largest); tmp holds MAXP x NC values;
                // `ahead` is only prefetched; channels blk*NC + c < m (c < channels) and pixels
                // pixel .. pixel + n < plane are inside dst (and res), and dst's are this item's
                // alone (its channel block and tiles).
                unsafe { pixels(cpu, n, g.stride, len, &w[k0 * NC..(k0 + len) * NC], src[base..].as_ptr(), &offsets[k0..k0 + len], bias, act, pass, ahead, tmp, to) };
            }
        }
    });
}

/// Steps of k ahead that the pixel-major kernel prefetches its weights (4 KiB) on a pass's first
/// tile (the pass before brought them into L2, or, for an item's first pass, nothing did).
const PREFETCH: usize = 32;

/// Steps of k per pass of the pixel-major kernel: 16 KiB of weights, which share the L1 cache
/// with the input rows of a tile.
const PIXEL_KC: usize = 128;

/// Steps of k up to which one pass does (24 KiB of weights: a 7x7 convolution of an RGB image).
const PIXEL_ONE_PASS: usize = 192;

/// # Safety
/// As [`pixels_avx512`], with `1 <= n <= MAXP` pixels `stride` values apart.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pixels(_cpu: Avx512, n: usize, stride: usize, k: usize, w: &[f32], src: *const f32, offsets: &[usize], bias: &[f32], act: Activation, pass: Pass, ahead: *const f32, tmp: &mut [f32], to: Planes) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; `_cpu` proves AVX-512F.
    unsafe {
        macro_rules! dispatch {
            ($($p:literal)*) => {
                match (n, stride) {
                    $(($p, 1) => pixels_avx512::<$p, 1>(k, w, src, offsets, 1, bias, act, pass, ahead, tmp, to),)*
                    $(($p, 2) => pixels_avx512::<$p, 2>(k, w, src, offsets, 2, bias, act, pass, ahead, tmp, to),)*
                    $(($p, _) => pixels_avx512::<$p, 0>(k, w, src, offsets, stride, bias, act, pass, ahead, tmp, to),)*
                    _ => unreachable!("{n} pixels"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the packed kernels run on x86-64 only ({n} {stride} {k} {} {src:?} {} {} {act:?} {} {} {ahead:?} {:?})", w.len(), offsets.len(), bias.len(), tmp.len(), pass.first, to.out);
}

/// `tmp[j * NC + c] (+)= sum_kk w[kk][c] src[offsets[kk] + j * S]` for `P` pixels (`S` = 0:
/// `step` apart): from zero on the first pass over k, else onto the partial sums in `tmp`. The
/// last pass adds the bias (and `to`'s residual) and applies the activation, and writes `tmp`,
/// or when `to.out` is not null, each channel's P pixels to its plane (transposed in registers).
///
/// # Safety
/// The CPU must support AVX-512F; `w` holds `k * NC` values, `offsets` `k`, `bias` `NC`; every
/// `src + offsets[kk] + j * S` for `j < P` is readable; unless null, `to.out + c * to.ld + j`
/// (and `to.res` alike) for `c < to.channels`, `j < P` is writable (readable).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn pixels_avx512<const P: usize, const S: usize>(k: usize, w: &[f32], src: *const f32, offsets: &[usize], step: usize, bias: &[f32], act: Activation, pass: Pass, ahead: *const f32, tmp: &mut [f32], to: Planes) {
    let own = pass.own;
    use std::arch::x86_64::*;
    assert!(w.len() >= k * NC && offsets.len() >= k && bias.len() >= NC && P <= MAXP && tmp.len() >= P * NC);
    let pw = w.as_ptr();
    // SAFETY: the assert and the caller's contract bound every pointer below.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; P];
        if !pass.first {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = [_mm512_loadu_ps(tmp.as_ptr().add(j * NC)), _mm512_loadu_ps(tmp.as_ptr().add(j * NC + 16))];
            }
        }
        // One step of k: the weights' prefetch (this pass's, 32 steps ahead, into L1 on the
        // first tile of a pass; the next pass's into L2 when `ahead` is given), then 2P FMAs.
        macro_rules! step_k {
            ($kk:expr) => {{
                let kk = $kk;
                if !ahead.is_null() {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(kk * 16) as *const i8);
                } else if own {
                    _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add((kk + PREFETCH) * NC) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add((kk + PREFETCH) * NC + 16) as *const i8);
                }
                let (w0, w1) = (_mm512_loadu_ps(pw.add(kk * NC)), _mm512_loadu_ps(pw.add(kk * NC + 16)));
                let xp = src.add(*offsets.get_unchecked(kk));
                for (j, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xp.add(j * if S == 0 { step } else { S }));
                    a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                }
            }};
        }
        // Two steps per iteration: half the loop's own instructions.
        let mut kk = 0;
        while kk + 2 <= k {
            step_k!(kk);
            step_k!(kk + 1);
            kk += 2;
        }
        if kk < k {
            step_k!(kk);
        }
        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
        let b = [_mm512_loadu_ps(bias.as_ptr()), _mm512_loadu_ps(bias.as_ptr().add(16))];
        let activate = |y: __m512| match act {
            Activation::Identity => y,
            Activation::Relu => _mm512_max_ps(y, zero),
            Activation::Relu6 => _mm512_min_ps(_mm512_max_ps(y, zero), six),
        };
        if pass.last && !to.out.is_null() {
            // Out of line, so that the loop above keeps its accumulators in registers.
            let mut rows = [[zero; 16]; 2];
            for j in 0..P {
                rows[0][j] = _mm512_add_ps(acc[j][0], b[0]);
                rows[1][j] = _mm512_add_ps(acc[j][1], b[1]);
            }
            store_planes(rows, P, act, to);
            return;
        }
        for (j, a) in acc.iter().enumerate() {
            for v in 0..2 {
                if !pass.last {
                    _mm512_storeu_ps(tmp.as_mut_ptr().add(j * NC + 16 * v), a[v]);
                    continue;
                }
                _mm512_storeu_ps(tmp.as_mut_ptr().add(j * NC + 16 * v), activate(_mm512_add_ps(a[v], b[v])));
            }
        }
    }
}

/// Stores `rows[v][j]` (pixel j's channels 16v..16v+16) as `act(rows + res)` to `to`'s planes,
/// `n` pixels each, transposed in registers.
///
/// # Safety
/// As [`pixels_avx512`]'s `to`, with `n <= 16` and `to.out` not null.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn store_planes(rows: [[std::arch::x86_64::__m512; 16]; 2], n: usize, act: Activation, to: Planes) {
    use std::arch::x86_64::*;
    let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
    let lanes = ((1u32 << n) - 1) as __mmask16;
    for (v, half) in rows.into_iter().enumerate() {
        for (l, col) in transpose16(half).into_iter().enumerate().take(to.channels.saturating_sub(16 * v)) {
            let at = (16 * v + l) * to.ld;
            // SAFETY: channel 16v + l < to.channels and the first n pixels: the caller's contract.
            unsafe {
                let y = if to.res.is_null() { col } else { _mm512_add_ps(col, _mm512_maskz_loadu_ps(lanes, to.res.add(at))) };
                let y = match act {
                    Activation::Identity => y,
                    Activation::Relu => _mm512_max_ps(y, zero),
                    Activation::Relu6 => _mm512_min_ps(_mm512_max_ps(y, zero), six),
                };
                _mm512_mask_storeu_ps(to.out.add(at), lanes, y);
            }
        }
    }
}

/// Where the pixel-major kernel's last pass writes: `channels` planes `ld` apart from `out`
/// (null: to its buffer instead), with the residual `res` (or null) laid out alike.
#[derive(Clone, Copy)]
pub(super) struct Planes {
    out: *mut f32,
    res: *const f32,
    ld: usize,
    channels: usize,
}

impl Planes {
    pub(super) const BUFFER: Planes = Planes { out: std::ptr::null_mut(), res: std::ptr::null(), ld: 0, channels: 0 };
}

/// The 16x16 transpose of `r` (rows to columns) in registers: pairs of rows interleaved, then
/// quads of them, then 128-bit lanes across four vectors, twice.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_ps();
    let (mut lo, mut hi) = ([zero; 8], [zero; 8]);
    for i in 0..8 {
        // Per 128-bit lane q: rows 2i and 2i+1 of columns 4q, 4q+1 (lo) and 4q+2, 4q+3 (hi).
        lo[i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        hi[i] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // s[i][m], lane q: rows 4i..4i+4 of column 4q + m.
    let mut s = [[zero; 4]; 4];
    for (i, si) in s.iter_mut().enumerate() {
        si[0] = _mm512_shuffle_ps::<0x44>(lo[2 * i], lo[2 * i + 1]);
        si[1] = _mm512_shuffle_ps::<0xEE>(lo[2 * i], lo[2 * i + 1]);
        si[2] = _mm512_shuffle_ps::<0x44>(hi[2 * i], hi[2 * i + 1]);
        si[3] = _mm512_shuffle_ps::<0xEE>(hi[2 * i], hi[2 * i + 1]);
    }
    // Column 4q + m gathers lane q of s[0..4][m].
    let mut c = [zero; 16];
    for m in 0..4 {
        let x0 = _mm512_shuffle_f32x4::<0x44>(s[0][m], s[1][m]);
        let x1 = _mm512_shuffle_f32x4::<0xEE>(s[0][m], s[1][m]);
        let y0 = _mm512_shuffle_f32x4::<0x44>(s[2][m], s[3][m]);
        let y1 = _mm512_shuffle_f32x4::<0xEE>(s[2][m], s[3][m]);
        c[m] = _mm512_shuffle_f32x4::<0x88>(x0, y0);
        c[4 + m] = _mm512_shuffle_f32x4::<0xDD>(x0, y0);
        c[8 + m] = _mm512_shuffle_f32x4::<0x88>(x1, y1);
        c[12 + m] = _mm512_shuffle_f32x4::<0xDD>(x1, y1);
    }
    c
}
