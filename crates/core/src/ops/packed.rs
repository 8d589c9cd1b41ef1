//! Dense convolutions as one GEMM per layer on weights packed once, at load, into the layout an
//! AVX-512 micro-kernel reads (MLAS's and oneDNN's way): `out[m, plane] = W[m, k] @ B[k, plane]`
//! where B is the input itself for 1x1 stride-1 convolutions (no copy) and otherwise im2col
//! written straight into the kernel's column panels, one panel per task (it stays in cache).
//! Bias and activation are applied in the registers before the only store of each output.
//! Work is split over (column panel, row block) items of the whole layer, so that 7x7 planes
//! keep both threads busy too. Used when the CPU has AVX-512F; the GEMM crate otherwise.

use rayon::prelude::*;

use super::conv::ConvGeometry;
use super::Activation;

/// Output channels per micro-tile (one broadcast each per step of k).
const MR: usize = 8;
/// Output columns per full micro-tile: two 16-float vectors.
const NR: usize = 32;

/// Whether the CPU runs the packed kernels (AVX-512F, detected at run time), unless the
/// environment sets `GRADCAM_NO_AVX512` (to test or compare the portable path).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::env::var_os("GRADCAM_NO_AVX512").is_none()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One group's weights `[m, k]` as `ceil(m / MR)` blocks of `[k][MR]` (rows past `m` zero), and
/// its bias padded alike.
#[derive(Debug, Clone)]
pub(super) struct PackedWeights {
    data: Vec<f32>,
    bias: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedWeights {
    pub(super) fn new(w: &[f32], bias: &[f32], m: usize, k: usize) -> Self {
        let blocks = m.div_ceil(MR);
        let mut data = vec![0f32; blocks * k * MR];
        for (blk, dst) in data.chunks_mut(k * MR).enumerate() {
            for r in 0..MR.min(m - blk * MR) {
                let row = &w[(blk * MR + r) * k..(blk * MR + r + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    dst[kk * MR + r] = v;
                }
            }
        }
        let mut b = bias.to_vec();
        b.resize(blocks * MR, 0.0);
        Self { data, bias: b, m, k }
    }
}

/// Where the GEMM's right-hand side comes from.
#[derive(Clone, Copy)]
pub(super) enum Columns<'a> {
    /// A 1x1 stride-1 convolution: the input rows `[k, plane]` themselves.
    Input(&'a [f32]),
    /// Any other: im2col of the input (channels from `c0`), made panel by panel.
    Im2col { x: &'a [f32], g: &'a ConvGeometry, c0: usize },
}

/// Steps of k per pass over a panel: its `KC x NR` slice (32 KiB) stays in the L1 cache while
/// every row block of the item uses it.
const KC: usize = 256;

/// The output, shared by the tasks, which write disjoint (rows, columns) rectangles of it.
struct Out(*mut f32);
// SAFETY: every task writes only its own rectangle (see `conv`), so no two threads touch the
// same element, and the pointer outlives the parallel loop that uses it.
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

/// Layers of at most this many panels (planes up to 128 values, a network's last stage) make
/// their panels once and share them: each task takes a range of row blocks over every panel,
/// so the weights (megabytes there) are read once instead of once per panel.
const SHARED_PANELS: usize = 4;

/// `dst[m, plane] = act(W @ B + bias)`, `dst` row-major `[m, plane]`.
pub(super) fn conv(p: &PackedWeights, cols: Columns<'_>, plane: usize, act: Activation, dst: &mut [f32]) {
    assert!(dst.len() >= p.m * plane, "packed conv: output too small");
    if let Columns::Input(x) = cols {
        assert!(x.len() >= p.k * plane, "packed conv: input too small");
    }
    let tiles = plane.div_ceil(NR);
    let blocks = p.m.div_ceil(MR);
    let threads = rayon::current_num_threads();
    let panel_len = p.k * NR;
    let fill = |panel: &mut [f32], t: usize| {
        let (j0, n) = (t * NR, NR.min(plane - t * NR));
        // k rows of NR columns (columns past n hold stale values, never stored).
        match cols {
            Columns::Input(x) => {
                for (kk, row) in panel.chunks_mut(NR).enumerate() {
                    row[..n].copy_from_slice(&x[kk * plane + j0..kk * plane + j0 + n]);
                }
            }
            Columns::Im2col { x, g, c0 } => super::kernels::im2col_panel(x, g, c0, p.k, j0, n, NR, panel),
        }
    };
    let out = Out(dst.as_mut_ptr());
    let out = &out;
    // Row blocks `blocks` of the panels of `tiles` (the slice `panels`, `tiles.len()` panels).
    let run = |panels: &[f32], tiles: std::ops::Range<usize>, blocks: std::ops::Range<usize>| {
        // k in passes of about KC steps.
        let passes = p.k.div_ceil(KC);
        let kc = p.k.div_ceil(passes);
        for k0 in (0..p.k).step_by(kc) {
            let len = kc.min(p.k - k0);
            let pass = Pass { first: k0 == 0, last: k0 + len == p.k };
            for (i, t) in tiles.clone().enumerate() {
                let (j0, n) = (t * NR, NR.min(plane - t * NR));
                let b = &panels[i * panel_len + k0 * NR..i * panel_len + (k0 + len) * NR];
                for blk in blocks.clone() {
                    let rows = MR.min(p.m - blk * MR);
                    let a = &p.data[(blk * p.k + k0) * MR..(blk * p.k + k0 + len) * MR];
                    let bias = &p.bias[blk * MR..(blk + 1) * MR];
                    // SAFETY: `available()` was checked when the weights were packed (callers
                    // only pack then); `a` holds len x MR values and `b` len x NR; the rectangle
                    // rows blk*MR.. + rows, columns j0..j0 + n lies inside dst (asserted above)
                    // and is written by this task only.
                    unsafe { tile(len, a, b, n, bias, act, pass, out.0.add(blk * MR * plane + j0), plane, rows) };
                }
            }
        }
    };
    if tiles <= SHARED_PANELS {
        let mut panels = vec![0f32; tiles * panel_len];
        panels.par_chunks_mut(panel_len).enumerate().for_each(|(t, panel)| fill(panel, t));
        let per = blocks.div_ceil(4 * threads).max(1);
        (0..blocks.div_ceil(per)).into_par_iter().for_each(|i| run(&panels, 0..tiles, i * per..((i + 1) * per).min(blocks)));
        return;
    }
    // Otherwise each task makes its own panel and runs it through a range of row blocks: enough
    // tasks for the threads to balance (at least 8 per thread), each panel serving as many row
    // blocks as that allows.
    let splits = (8 * threads).div_ceil(tiles).clamp(1, blocks);
    let per = blocks.div_ceil(splits);
    let splits = blocks.div_ceil(per);
    (0..tiles * splits).into_par_iter().with_min_len((tiles * splits / (8 * threads)).max(1)).for_each_init(Vec::new, |panel, item| {
        let (t, s) = (item / splits, item % splits);
        panel.resize(panel_len, 0.0);
        fill(panel, t);
        run(panel, t..t + 1, s * per..((s + 1) * per).min(blocks));
    });
}

/// Which pass over k a micro-tile call is: the first starts from zero (else from the partial
/// sums in the output), the last adds the bias and applies the activation.
#[derive(Clone, Copy)]
struct Pass {
    first: bool,
    last: bool,
}

/// One micro-tile, up to MR x NR, with AVX-512 when compiled for x86-64.
///
/// # Safety
/// The CPU must support AVX-512F; `a` holds `k * MR` values and `b` `k * NR`; `c` addresses
/// `rows` rows of `n` writable values at stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(k: usize, a: &[f32], b: &[f32], n: usize, bias: &[f32], act: Activation, pass: Pass, c: *mut f32, ldc: usize, rows: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        if n > 16 {
            tile_avx512::<2>(k, a, b, n, bias, act, pass, c, ldc, rows)
        } else {
            tile_avx512::<1>(k, a, b, n, bias, act, pass, c, ldc, rows)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the packed kernels run on x86-64 only ({k} {} {} {n} {} {act:?} {c:?} {ldc} {rows} {})", a.len(), b.len(), bias.len(), pass.first);
}

/// # Safety
/// As [`tile`], with `n <= 16 * NV`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const NV: usize>(k: usize, a: &[f32], b: &[f32], n: usize, bias: &[f32], act: Activation, pass: Pass, c: *mut f32, ldc: usize, rows: usize) {
    use std::arch::x86_64::*;
    assert!(a.len() >= k * MR && b.len() >= k * NR && bias.len() >= MR && n <= 16 * NV && rows <= MR);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // Lanes of each vector that are real columns.
    let lanes = |v: usize| -> __mmask16 {
        let real = n.saturating_sub(16 * v).min(16);
        if real == 16 { 0xffff } else { (1u16 << real) - 1 }
    };
    // SAFETY: the assert and the caller's contract bound every pointer below.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        if !pass.first {
            for (r, row) in acc.iter_mut().enumerate().take(rows) {
                for (v, s) in row.iter_mut().enumerate() {
                    *s = _mm512_maskz_loadu_ps(lanes(v), c.add(r * ldc + 16 * v));
                }
            }
        }
        for kk in 0..k {
            let bp = pb.add(kk * NR);
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, slot) in bv.iter_mut().enumerate() {
                *slot = _mm512_loadu_ps(bp.add(16 * v));
            }
            let ap = pa.add(kk * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r));
                for (v, s) in row.iter_mut().enumerate() {
                    *s = _mm512_fmadd_ps(av, bv[v], *s);
                }
            }
        }
        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
        for (r, row) in acc.iter().enumerate().take(rows) {
            let bias = _mm512_set1_ps(bias[r]);
            for (v, &s) in row.iter().enumerate() {
                let y = if !pass.last {
                    s
                } else {
                    let y = _mm512_add_ps(s, bias);
                    match act {
                        Activation::Identity => y,
                        Activation::Relu => _mm512_max_ps(y, zero),
                        Activation::Relu6 => _mm512_min_ps(_mm512_max_ps(y, zero), six),
                    }
                };
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), lanes(v), y);
            }
        }
    }
}
