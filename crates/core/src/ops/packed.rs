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

/// The output, shared by the tasks, which write disjoint (rows, columns) rectangles of it.
struct Out(*mut f32);
// SAFETY: every task writes only its own rectangle (see `conv`), so no two threads touch the
// same element, and the pointer outlives the parallel loop that uses it.
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

/// `dst[m, plane] = act(W @ B + bias)`, `dst` row-major `[m, plane]`.
pub(super) fn conv(p: &PackedWeights, cols: Columns<'_>, plane: usize, act: Activation, dst: &mut [f32]) {
    assert!(dst.len() >= p.m * plane, "packed conv: output too small");
    if let Columns::Input(x) = cols {
        assert!(x.len() >= p.k * plane, "packed conv: input too small");
    }
    let tiles = plane.div_ceil(NR);
    let blocks = p.m.div_ceil(MR);
    let threads = rayon::current_num_threads();
    // Enough items for the threads to balance (at least 8 per thread), but each item's panel
    // serves as many row blocks as that allows.
    let splits = (8 * threads).div_ceil(tiles).clamp(1, blocks);
    let per = blocks.div_ceil(splits);
    let splits = blocks.div_ceil(per);
    let out = Out(dst.as_mut_ptr());
    let out = &out;
    (0..tiles * splits).into_par_iter().with_min_len((tiles * splits / (8 * threads)).max(1)).for_each_init(Vec::new, |panel, item| {
        let (t, s) = (item / splits, item % splits);
        let (j0, n) = (t * NR, NR.min(plane - t * NR));
        let (b, ldb): (&[f32], usize) = match cols {
            Columns::Input(x) if n == NR => (&x[j0..], plane),
            Columns::Input(x) => {
                panel.clear();
                panel.resize(p.k * NR, 0.0);
                for (kk, row) in panel.chunks_mut(NR).enumerate() {
                    row[..n].copy_from_slice(&x[kk * plane + j0..kk * plane + j0 + n]);
                }
                (&panel[..], NR)
            }
            Columns::Im2col { x, g, c0 } => {
                panel.resize(p.k * NR, 0.0);
                super::kernels::im2col_panel(x, g, c0, p.k, j0, n, NR, panel);
                (&panel[..], NR)
            }
        };
        for blk in s * per..((s + 1) * per).min(blocks) {
            let rows = MR.min(p.m - blk * MR);
            let a = &p.data[blk * p.k * MR..(blk + 1) * p.k * MR];
            let bias = &p.bias[blk * MR..(blk + 1) * MR];
            // SAFETY: `available()` was checked when the weights were packed (callers only pack
            // then); `a` holds k x MR values, `b` k rows of at least `n` values at stride `ldb`
            // (the asserts above and the panel's size), and the rectangle rows blk*MR.. + rows,
            // columns j0..j0 + n lies inside dst, written by this item only.
            unsafe { tile(p.k, a, b, ldb, n, bias, act, out.0.add(blk * MR * plane + j0), plane, rows) };
        }
    });
}

/// One micro-tile, up to MR x NR, with AVX-512 when compiled for x86-64.
///
/// # Safety
/// The CPU must support AVX-512F; `a` holds `k * MR` values; `b` holds `k` rows of at least
/// `n.next_multiple_of(16)` readable values (fewer only when `n` is a multiple of 16) at stride
/// `ldb`; `c` addresses `rows` rows of `n` writable values at stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(k: usize, a: &[f32], b: &[f32], ldb: usize, n: usize, bias: &[f32], act: Activation, c: *mut f32, ldc: usize, rows: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        if n > 16 {
            tile_avx512::<2>(k, a, b, ldb, n, bias, act, c, ldc, rows)
        } else {
            tile_avx512::<1>(k, a, b, ldb, n, bias, act, c, ldc, rows)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the packed kernels run on x86-64 only ({k} {} {} {ldb} {n} {} {act:?} {c:?} {ldc} {rows})", a.len(), b.len(), bias.len());
}

/// # Safety
/// As [`tile`], with `n <= 16 * NV`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const NV: usize>(k: usize, a: &[f32], b: &[f32], ldb: usize, n: usize, bias: &[f32], act: Activation, c: *mut f32, ldc: usize, rows: usize) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= k * MR && bias.len() >= MR && n <= 16 * NV);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // Lanes of the last vector that are real columns.
    let tail = n - 16 * (NV - 1);
    let mask: __mmask16 = if tail >= 16 { 0xffff } else { (1u16 << tail) - 1 };
    // SAFETY: the caller's contract bounds every pointer below.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for kk in 0..k {
            let bp = pb.add(kk * ldb);
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
                let mut y = _mm512_add_ps(s, bias);
                y = match act {
                    Activation::Identity => y,
                    Activation::Relu => _mm512_max_ps(y, zero),
                    Activation::Relu6 => _mm512_min_ps(_mm512_max_ps(y, zero), six),
                };
                let dst = c.add(r * ldc + 16 * v);
                if v + 1 == NV && mask != 0xffff {
                    _mm512_mask_storeu_ps(dst, mask, y);
                } else {
                    _mm512_storeu_ps(dst, y);
                }
            }
        }
    }
}
