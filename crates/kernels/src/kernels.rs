//! The numeric kernels behind the ops: im2col / col2im, the depthwise convolution planes, GEMM (through
//! the `gemm` crate), the AVX2/FMA matrix-vector products of recurrent heads and the
//! weight-streaming fully-connected rows.

use rayon::prelude::*;

use super::conv::ConvGeometry;
#[cfg(target_arch = "x86_64")]
use super::cpu::has_avx2_fma;
use super::{planes_per_task, Activation};

/// im2col for one group (channels from `c0`) of one image: `[cg * kh * kw, oh * ow]`.
pub(super) fn im2col(x: &[f32], g: &ConvGeometry, c0: usize, col: &mut [f32]) {
    let (kh, kw, stride) = (g.kh, g.kw, g.stride);
    let plane = g.oh * g.ow;
    col.par_chunks_mut(plane).enumerate().with_min_len(planes_per_task(plane)).for_each(|(row, dst)| {
        let ci = c0 + row / (kh * kw);
        let ky = (row / kw) % kh;
        let kx = row % kw;
        let src = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for oy in 0..g.oh {
            let iy = (oy * stride + ky) as isize - g.pad_top as isize;
            let drow = &mut dst[oy * g.ow..(oy + 1) * g.ow];
            if iy < 0 || iy >= g.h as isize {
                drow.fill(0.0);
                continue;
            }
            let srow = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
            for (ox, d) in drow.iter_mut().enumerate() {
                let ix = (ox * stride + kx) as isize - g.pad_left as isize;
                *d = if ix >= 0 && (ix as usize) < g.w { srow[ix as usize] } else { 0.0 };
            }
        }
    });
}

/// im2col of output columns `p0..p0 + n` into rows `ld` values apart: `col[row * ld + j]`
/// (values `n..ld` of each row are left as they are).
#[allow(clippy::too_many_arguments)]
pub(super) fn im2col_panel(x: &[f32], g: &ConvGeometry, c0: usize, rows: usize, p0: usize, n: usize, ld: usize, col: &mut [f32]) {
    let (kh, kw, stride) = (g.kh, g.kw, g.stride);
    for row in 0..rows {
        let ci = c0 + row / (kh * kw);
        let ky = (row / kw) % kh;
        let kx = row % kw;
        let src = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        let dst = &mut col[row * ld..row * ld + n];
        let mut p = p0;
        while p < p0 + n {
            let (oy, ox0) = (p / g.ow, p % g.ow);
            let len = (g.ow - ox0).min(p0 + n - p);
            let drow = &mut dst[p - p0..p - p0 + len];
            let iy = (oy * stride + ky) as isize - g.pad_top as isize;
            if iy < 0 || iy >= g.h as isize {
                drow.fill(0.0);
            } else {
                let srow = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
                // Output columns ox0 + j read input column (ox0 + j) * stride + kx - pad_left:
                // inside the row for j in lo..hi, zero padding outside.
                let first = (ox0 * stride + kx) as isize - g.pad_left as isize;
                let lo = if first >= 0 { 0 } else { ((-first) as usize).div_ceil(stride).min(len) };
                let hi = if first >= g.w as isize { lo } else { ((g.w as isize - first) as usize).div_ceil(stride).clamp(lo, len) };
                drow[..lo].fill(0.0);
                drow[hi..].fill(0.0);
                let start = (first + (lo * stride) as isize) as usize;
                if hi == lo {
                    // Every column of this row reads padding (a padding wider than the input).
                } else if stride == 1 {
                    drow[lo..hi].copy_from_slice(&srow[start..start + hi - lo]);
                } else {
                    for (d, &v) in drow[lo..hi].iter_mut().zip(srow[start..].iter().step_by(stride)) {
                        *d = v;
                    }
                }
            }
            p += len;
        }
    }
}

/// Output columns per tile of [`conv_tiled`]: the tile's im2col (`k` rows) stays within about
/// 256 KiB, at least 64 and a multiple of 16 columns.
fn tile_columns(k: usize, plane: usize) -> usize {
    ((64 * 1024 / k.max(1)) / 16 * 16).clamp(64, plane.max(64))
}

/// Whether [`conv_tiled`] pays for a group: its whole im2col would not fit in the caches.
pub(super) fn tiling_pays(k: usize, plane: usize) -> bool {
    k * plane > 1 << 20 && plane >= 256
}

/// One group of a convolution as one GEMM per tile of output columns, the tiles spread over the
/// threads: `dst[og, plane] = w[og, k] @ im2col(x)[k, plane]`, then `epilogue(o, row)` on each
/// output channel's row of each tile (bias and activation). The im2col of a tile stays in
/// cache, where the whole image's may be hundreds of megabytes.
pub(super) fn conv_tiled(x: &[f32], g: &ConvGeometry, c0: usize, cg: usize, w: &[f32], og: usize, epilogue: &(dyn Fn(usize, &mut [f32]) + Sync), dst: &mut [f32]) {
    let plane = g.oh * g.ow;
    let k = cg * g.kh * g.kw;
    let tn = tile_columns(k, plane);
    let tiles: Vec<(usize, Vec<f32>)> = (0..plane.div_ceil(tn))
        .into_par_iter()
        .map_init(Vec::new, |col, t| {
            let (p0, n) = (t * tn, tn.min(plane - t * tn));
            col.resize(k * n, 0.0);
            im2col_panel(x, g, c0, k, p0, n, n, col);
            let mut out = vec![0f32; og * n];
            gemm_serial(&mut out, w, (k, 1), col, (n, 1), og, n, k);
            for (o, row) in out.chunks_mut(n).enumerate() {
                epilogue(o, row);
            }
            (p0, out)
        })
        .collect();
    dst.par_chunks_mut(plane).enumerate().for_each(|(o, row)| {
        for (p0, out) in &tiles {
            let n = out.len() / og;
            row[*p0..p0 + n].copy_from_slice(&out[o * n..(o + 1) * n]);
        }
    });
}

/// col2im, the adjoint of [`Self::im2col`]: accumulates `col` into `dx`.
pub(super) fn col2im(col: &[f32], g: &ConvGeometry, c0: usize, cg: usize, dx: &mut [f32]) {
    let (kh, kw, stride) = (g.kh, g.kw, g.stride);
    let plane = g.oh * g.ow;
    dx[c0 * g.h * g.w..(c0 + cg) * g.h * g.w]
        .par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(cl, dst)| {
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = (cl * kh + ky) * kw + kx;
                    let src = &col[row * plane..(row + 1) * plane];
                    for oy in 0..g.oh {
                        let iy = (oy * stride + ky) as isize - g.pad_top as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let drow = &mut dst[iy as usize * g.w..(iy as usize + 1) * g.w];
                        for ox in 0..g.ow {
                            let ix = (ox * stride + kx) as isize - g.pad_left as isize;
                            if ix >= 0 && (ix as usize) < g.w {
                                drow[ix as usize] += src[oy * g.ow + ox];
                            }
                        }
                    }
                }
            }
        });
}


/// One channel of a depthwise convolution with its bias and activation. The input is first copied
/// into zero-padded planes split by row and column phase (`stride^2` planes; phase (p, q) holds
/// the padded pixels (p + stride i, q + stride j)), so that for every kernel tap the whole output
/// plane reads one contiguous run of one phase plane: computed on a grid as wide as the phase
/// planes (the extra columns are thrown away), each tap is a single long multiply-add that
/// vectorises even for 7x7 outputs. `buf` and `ext` are scratch space reused across channels.
#[allow(clippy::too_many_arguments)]
pub(super) fn depthwise_channel(
    src: &[f32],
    wk: &[f32],
    bias: f32,
    act: Activation,
    g: &ConvGeometry,
    stride: usize,
    kh: usize,
    kw: usize,
    dst: &mut [f32],
    (buf, ext): &mut (Vec<f32>, Vec<f32>),
) {
    let s = stride;
    let (rows, cols) = ((g.oh - 1) * s + kh, (g.ow - 1) * s + kw); // padded extent used
    let (prow, pcol) = (rows.div_ceil(s), cols.div_ceil(s)); // one phase plane
    let plane = prow * pcol;
    buf.clear();
    buf.resize(s * s * plane, 0.0);
    let n = g.w.min(cols.saturating_sub(g.pad_left)); // input columns inside the padded extent
    for r in 0..rows {
        let iy = r as isize - g.pad_top as isize;
        if iy < 0 || iy >= g.h as isize {
            continue;
        }
        let srow = &src[iy as usize * g.w..iy as usize * g.w + n];
        let (rp, ri) = (r % s, r / s);
        for q in 0..s {
            let dst = &mut buf[(rp * s + q) * plane + ri * pcol..(rp * s + q) * plane + (ri + 1) * pcol];
            // Padded column j = c * s + q holds input column j - pad_left.
            let c0 = g.pad_left.saturating_sub(q).div_ceil(s);
            let first = (c0 * s + q).saturating_sub(g.pad_left).min(n);
            for (d, &v) in dst[c0..].iter_mut().zip(srow[first..].iter().step_by(s)) {
                *d = v;
            }
        }
    }
    let len = (g.oh - 1) * pcol + g.ow;
    ext.clear();
    ext.resize(len, bias);
    for ky in 0..kh {
        for kx in 0..kw {
            let wv = wk[ky * kw + kx];
            let start = ((ky % s) * s + kx % s) * plane + (ky / s) * pcol + kx / s;
            for (d, &v) in ext.iter_mut().zip(&buf[start..start + len]) {
                *d += wv * v;
            }
        }
    }
    for (oy, drow) in dst.chunks_mut(g.ow).enumerate() {
        for (d, &v) in drow.iter_mut().zip(&ext[oy * pcol..oy * pcol + g.ow]) {
            *d = act.apply(v);
        }
    }
}

pub(super) fn depthwise_channel_backward(
    gout: &[f32],
    wk: &[f32],
    g: &ConvGeometry,
    stride: usize,
    kh: usize,
    kw: usize,
    dst: &mut [f32],
) {
    dst.fill(0.0);
    for oy in 0..g.oh {
        let grow = &gout[oy * g.ow..(oy + 1) * g.ow];
        for ky in 0..kh {
            let iy = (oy * stride + ky) as isize - g.pad_top as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            let drow = &mut dst[iy as usize * g.w..(iy as usize + 1) * g.w];
            for kx in 0..kw {
                let wv = wk[ky * kw + kx];
                let first = (g.pad_left.saturating_sub(kx)).div_ceil(stride);
                let last = ((g.w + g.pad_left).saturating_sub(kx + 1) / stride + 1).min(g.ow);
                for ox in first..last {
                    drow[ox * stride + kx - g.pad_left] += wv * grow[ox];
                }
            }
        }
    }
}


/// `out = W x` for row-major `W` `[out.len(), x.len()]`: the small matrix-vector products of
/// recurrent heads, where a GEMM's setup costs more than the product. With AVX2 + FMA when the
/// CPU has them (detected at run time; the build targets baseline x86-64).
pub fn matvec(w: &[f32], x: &[f32], out: &mut [f32]) {
    assert!(out.len().checked_mul(x.len()).is_some_and(|n| w.len() >= n), "matvec: W too small");
    if x.is_empty() {
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { matvec_avx2(w, x, out) };
    }
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len().max(1))) {
        *o = dot_portable(row, x);
    }
}


/// Eight partial sums, so that the compiler vectorises the reduction.
#[inline(always)]
fn dot_portable(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matvec_avx2(w: &[f32], x: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len().max(1))) {
        // SAFETY: this function's own contract.
        *o = unsafe { dot_fma(row, x) };
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_ptr());
    let mut i = 0;
    // SAFETY: the caller guarantees AVX2 + FMA; every load reads 8 floats below n of both
    // slices, and `lanes` holds 8.
    unsafe {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i + 8)), _mm256_loadu_ps(py.add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)), acc0);
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1));
        lanes.iter().sum::<f32>() + x[i..n].iter().zip(&y[i..n]).map(|(a, b)| a * b).sum::<f32>()
    }
}

/// Batches up to this size take [`linear_rows`] / [`linear_rows_backward`] instead of a GEMM: a
/// fully-connected layer on a few rows is a stream over its weights, which a GEMM would first copy
/// into its packed layout (VGG-16's fc6 is 411 MB).
pub(super) const FEW_ROWS: usize = 4;

/// `out[b, o] = x[b, :] . w[o, :]` for `batch` rows of `x` (`[batch, k]`) and row-major `w`
/// (`[n, k]`), reading `w` once, its rows spread over the threads.
pub(super) fn linear_rows(x: &[f32], batch: usize, w: &[f32], n: usize, k: usize, out: &mut [f32]) {
    assert!(x.len() >= batch * k && w.len() >= n * k && out.len() >= batch * n, "linear_rows: sizes");
    if batch == 0 || n == 0 {
        return;
    }
    let block = (n / (8 * rayon::current_num_threads())).clamp(1, 256);
    // Output transposed, [n, batch], so that each task owns a contiguous block.
    let mut t = vec![0f32; n * batch];
    t.par_chunks_mut(block * batch).enumerate().for_each(|(i, dst)| {
        let rows = dst.len() / batch;
        let w = &w[i * block * k..(i * block + rows) * k];
        for b in 0..batch {
            let xb = &x[b * k..(b + 1) * k];
            let mut j = 0;
            while j + 4 <= rows {
                let d4 = dot4(&w[j * k..(j + 4) * k], k, xb);
                for (r, v) in d4.into_iter().enumerate() {
                    dst[(j + r) * batch + b] = v;
                }
                j += 4;
            }
            for j in j..rows {
                dst[j * batch + b] = dot(&w[j * k..(j + 1) * k], xb);
            }
        }
    });
    for (o, vals) in t.chunks(batch).enumerate() {
        for (b, &v) in vals.iter().enumerate() {
            out[b * n + o] = v;
        }
    }
}

/// `dx[b, :] = sum_o g[b, o] w[o, :]`, the input gradient of [`linear_rows`]: columns of `w`
/// spread over the threads, and the rows whose gradient is zero in every batch row (a ReLU's
/// silent units) never read.
pub(super) fn linear_rows_backward(g: &[f32], batch: usize, w: &[f32], n: usize, k: usize, dx: &mut [f32]) {
    assert!(g.len() >= batch * n && w.len() >= n * k && dx.len() >= batch * k, "linear_rows_backward: sizes");
    if batch == 0 || k == 0 {
        return;
    }
    let live: Vec<usize> = (0..n).filter(|&o| (0..batch).any(|b| g[b * n + o] != 0.0)).collect();
    let block = (k / (4 * rayon::current_num_threads())).div_ceil(16).max(64) * 16;
    let parts: Vec<(usize, Vec<f32>)> = (0..k.div_ceil(block))
        .into_par_iter()
        .map(|i| {
            let (c0, c1) = (i * block, ((i + 1) * block).min(k));
            let mut acc = vec![0f32; batch * (c1 - c0)];
            for &o in &live {
                let row = &w[o * k + c0..o * k + c1];
                for (b, a) in acc.chunks_mut(c1 - c0).enumerate() {
                    let s = g[b * n + o];
                    if s != 0.0 {
                        axpy(s, row, a);
                    }
                }
            }
            (c0, acc)
        })
        .collect();
    for (c0, acc) in parts {
        let len = acc.len() / batch.max(1);
        for (b, a) in acc.chunks(len.max(1)).enumerate() {
            dx[b * k + c0..b * k + c0 + len].copy_from_slice(a);
        }
    }
}

/// The dot products of four consecutive rows of `w` (row length `k`) with `x`, reading `x` once.
fn dot4(w: &[f32], k: usize, x: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { dot4_fma(w, k, x) };
    }
    std::array::from_fn(|r| dot_portable(&w[r * k..(r + 1) * k], x))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_fma(w: &[f32], k: usize, x: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    assert!(w.len() >= 4 * k && x.len() >= k, "dot4: sizes");
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut i = 0;
    let mut out = [0f32; 4];
    // SAFETY: the caller guarantees AVX2 + FMA; every load reads 8 floats below k of x and of
    // each of the four rows, which the assert keeps inside the slices.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        while i + 8 <= k {
            let xv = _mm256_loadu_ps(px.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(pw.add(r * k + i)), xv, *a);
            }
            i += 8;
        }
        for (r, a) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            out[r] = lanes.iter().sum::<f32>() + w[r * k + i..(r + 1) * k].iter().zip(&x[i..k]).map(|(a, b)| a * b).sum::<f32>();
        }
    }
    out
}

/// `x . y`, with AVX2 + FMA when the CPU has them.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { dot_fma(x, y) };
    }
    dot_portable(x, y)
}

/// `y += a x`, with AVX2 + FMA when the CPU has them.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { axpy_fma(a, x, y) };
    }
    y.iter_mut().zip(x).for_each(|(v, &u)| *v += a * u);
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_fma(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(v, &u)| *v = u.mul_add(a, *v));
}

/// `dst[m, n] = lhs[m, k] @ rhs[k, n]` with (row stride, column stride) for the operands;
/// `dst` is row-major and overwritten. Panics if a slice is too small for the sizes and strides.
#[allow(clippy::too_many_arguments)]
pub fn matmul(dst: &mut [f32], lhs: &[f32], lhs_strides: (usize, usize), rhs: &[f32], rhs_strides: (usize, usize), m: usize, n: usize, k: usize) {
    // Below about 2M multiply-adds, waking the pool costs more than a second thread saves.
    let parallel = m.saturating_mul(n).saturating_mul(k) > 128 * 128 * 128;
    gemm_with(dst, lhs, lhs_strides, rhs, rhs_strides, m, n, k, parallel)
}

/// [`matmul`] on the calling thread only (for callers that spread work over threads themselves).
#[allow(clippy::too_many_arguments)]
fn gemm_serial(dst: &mut [f32], lhs: &[f32], lhs_strides: (usize, usize), rhs: &[f32], rhs_strides: (usize, usize), m: usize, n: usize, k: usize) {
    gemm_with(dst, lhs, lhs_strides, rhs, rhs_strides, m, n, k, false)
}

#[allow(clippy::too_many_arguments)]
fn gemm_with(dst: &mut [f32], lhs: &[f32], lhs_strides: (usize, usize), rhs: &[f32], rhs_strides: (usize, usize), m: usize, n: usize, k: usize, parallel: bool) {
    // The largest offset each operand addresses, with overflow counted as out of bounds.
    let reach = |(rs, cs): (usize, usize), rows: usize, cols: usize| -> Option<usize> {
        rows.saturating_sub(1).checked_mul(rs)?.checked_add(cols.saturating_sub(1).checked_mul(cs)?)
    };
    // An empty operand addresses nothing; `rows * cols == 0` would wrap for huge sizes and skip
    // the check, so each size is tested on its own.
    let fits = |len: usize, strides: (usize, usize), rows: usize, cols: usize| rows == 0 || cols == 0 || reach(strides, rows, cols).is_some_and(|r| r < len);
    assert!(m.checked_mul(n).is_some_and(|mn| dst.len() >= mn), "matmul: dst too small");
    assert!(fits(lhs.len(), lhs_strides, m, k), "matmul: lhs too small");
    assert!(fits(rhs.len(), rhs_strides, k, n), "matmul: rhs too small");
    let as_isize = |v: usize| isize::try_from(v).expect("a stride within a slice fits isize");
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above check that the slices cover every element addressed by the sizes
    // and (non-negative) strides; dst is a distinct &mut, so it does not alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            as_isize(lhs_strides.1),
            as_isize(lhs_strides.0),
            rhs.as_ptr(),
            as_isize(rhs_strides.1),
            as_isize(rhs_strides.0),
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes whose product wraps: m * k = 2 * 2^63 = 2^64 = 0 in usize. The check used to take the
    /// wrapped 0 for an empty operand and let the GEMM read 2^63 columns of a 4-value slice.
    #[test]
    fn sizes_whose_product_wraps_are_refused_not_read() {
        let (lhs, rhs) = (vec![1f32; 4], vec![1f32; 4]);
        let huge = 1usize << (usize::BITS - 1);
        let wrapped = std::panic::catch_unwind(move || {
            let mut dst = vec![0f32; 2];
            matmul(&mut dst, &lhs, (huge, 1), &rhs, (1, 1), 2, 1, huge);
        });
        let mut dst = vec![0f32; 2];
        let message = wrapped.expect_err("refused").downcast::<&str>().map(|s| s.to_string()).unwrap_or_default();
        assert!(message.contains("too small"), "{message}");
        // Real empty operands still work, and products are right.
        matmul(&mut dst, &[], (0, 1), &[], (1, 1), 2, 1, 0);
        assert_eq!(dst, [0.0, 0.0]);
        let mut d = vec![0f32; 4];
        matmul(&mut d, &[1.0, 2.0, 3.0, 4.0], (2, 1), &[5.0, 6.0, 7.0, 8.0], (2, 1), 2, 2, 2);
        assert_eq!(d, [19.0, 22.0, 43.0, 50.0]);
        let mut out = vec![9f32; 2];
        matvec(&[1.0, 2.0], &[], &mut out[..0]);
        matvec(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0], &mut out);
        assert_eq!(out, [3.0, 7.0]);
    }
}
