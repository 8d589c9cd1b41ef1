//! Dense convolutions as one GEMM per layer on weights packed once, at load, into the layout an
//! AVX-512 micro-kernel reads (MLAS's and oneDNN's way): `out[m, plane] = W[m, k] @ B[k, plane]`
//! where B is the input itself for 1x1 stride-1 convolutions (no copy) and otherwise im2col
//! written straight into the kernel's column panels, one panel per task (it stays in cache).
//! Bias and activation are applied in the registers before the only store of each output.
//! Work is split over (column panel, row block) items of the whole layer, so that 7x7 planes
//! keep both threads busy too. Used when the CPU has AVX-512F; the GEMM crate otherwise.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::conv::ConvGeometry;
use crate::{Activation, Avx512};

mod pixel;
mod winograd;

pub(crate) use pixel::{conv_pixel_major, pixel_major_pays, NC};
pub(crate) use winograd::{conv_winograd, winograd_pays, Winograd, WINOGRAD_MIN_CHANNELS};

/// Output channels per micro-tile (one broadcast each per step of k).
const MR: usize = 8;
/// Output columns per full micro-tile: two 16-float vectors.
const NR: usize = 32;

/// f32 values that start on a cache line (64 bytes), so that no vector load of the kernels,
/// whose offsets are multiples of 64 bytes, splits across two lines (large allocations start
/// 16 bytes past a page).
#[derive(Debug, Clone, Default)]
pub(crate) struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    pub(super) fn zeros(len: usize) -> Self {
        let mut a = Self::default();
        a.resize(len);
        a
    }

    /// `len` values (zeros where new).
    fn resize(&mut self, len: usize) {
        if len + 15 > self.buf.len() {
            self.buf = vec![0f32; len + 15];
            self.start = self.buf.as_ptr().align_offset(64);
        }
        self.len = len;
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// One group's weights `[m, k]` as `ceil(m / R)` blocks of `[k][R]` (rows past `m` zero), and
/// its bias padded alike: R = MR rows for the column-panel GEMM ([`PackedWeights`]), NC output
/// channels for the pixel-major kernel ([`ChannelBlocks`]).
#[derive(Debug, Clone)]
pub(crate) struct Blocks<const R: usize> {
    data: Aligned,
    bias: Vec<f32>,
    m: usize,
    k: usize,
}

pub(crate) type PackedWeights = Blocks<MR>;
pub(crate) type ChannelBlocks = Blocks<NC>;

impl<const R: usize> Blocks<R> {
    pub(crate) fn new(w: &[f32], bias: &[f32], m: usize, k: usize) -> Self {
        let blocks = m.div_ceil(R);
        let mut data = Aligned::zeros(blocks * k * R);
        for (blk, dst) in data.chunks_mut(k * R).enumerate() {
            for r in 0..R.min(m - blk * R) {
                let row = &w[(blk * R + r) * k..(blk * R + r + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    dst[kk * R + r] = v;
                }
            }
        }
        let mut b = bias.to_vec();
        b.resize(blocks * R, 0.0);
        Self { data, bias: b, m, k }
    }
}

/// Where the GEMM's right-hand side comes from.
#[derive(Clone, Copy)]
pub(crate) enum Columns<'a> {
    /// A 1x1 stride-1 convolution: the input rows `[k, plane]` themselves.
    Input(&'a [f32]),
    /// The same transposed: `[plane, k]`, each column of the product a row here (a
    /// transformer's tokens, as a fully-connected layer reads them).
    Rows(&'a [f32]),
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

/// The residual added before the activation, or null.
struct Residual(*const f32);
// SAFETY: only read, while the slice it comes from is borrowed by `conv`.
unsafe impl Sync for Residual {}
unsafe impl Send for Residual {}

impl Residual {
    /// The residual's element `offset`, or null when there is none.
    fn at(&self, offset: usize) -> *const f32 {
        if self.0.is_null() { self.0 } else { self.0.wrapping_add(offset) }
    }
}

/// Layers of at most this many panels (planes up to 128 values, a network's last stage) make
/// their panels once and share them: each task takes a range of row blocks over every panel,
/// so the weights (megabytes there) are read once instead of once per panel.
const SHARED_PANELS: usize = 4;

/// `dst[m, plane] = act(W @ B + bias + res)`, `dst` and `res` (a residual, when given)
/// row-major `[m, plane]`. Every value of `dst[..m * plane]` is written (it may start
/// uninitialised); `cpu` proves the kernel's instructions exist.
pub(crate) fn conv(cpu: Avx512, p: &PackedWeights, cols: Columns<'_>, plane: usize, act: Activation, res: Option<&[f32]>, dst: &mut [MaybeUninit<f32>]) {
    assert!(dst.len() >= p.m * plane && res.is_none_or(|r| r.len() >= p.m * plane), "packed conv: output too small");
    let res = Residual(res.map_or(std::ptr::null(), |r| r.as_ptr()));
    let res = &res;
    if let Columns::Input(x) | Columns::Rows(x) = cols {
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
            Columns::Rows(x) => {
                for j in 0..n {
                    let src = &x[(j0 + j) * p.k..(j0 + j + 1) * p.k];
                    for (kk, &v) in src.iter().enumerate() {
                        panel[kk * NR + j] = v;
                    }
                }
            }
            Columns::Im2col { x, g, c0 } => super::kernels::im2col_panel(x, g, c0, p.k, j0, n, NR, panel),
        }
    };
    let out = Out(dst.as_mut_ptr().cast::<f32>());
    let out = &out;
    // Row blocks `blocks` of the panels of `tiles` (the slice `panels`, `tiles.len()` panels).
    let run = |panels: &[f32], tiles: std::ops::Range<usize>, blocks: std::ops::Range<usize>| {
        // k in passes of about KC steps.
        let passes = p.k.div_ceil(KC);
        let kc = p.k.div_ceil(passes);
        for k0 in (0..p.k).step_by(kc) {
            let len = kc.min(p.k - k0);
            let pass = Pass { first: k0 == 0, last: k0 + len == p.k, own: false };
            for (i, t) in tiles.clone().enumerate() {
                let (j0, n) = (t * NR, NR.min(plane - t * NR));
                let b = &panels[i * panel_len + k0 * NR..i * panel_len + (k0 + len) * NR];
                for blk in blocks.clone() {
                    let rows = MR.min(p.m - blk * MR);
                    let a = &p.data[(blk * p.k + k0) * MR..(blk * p.k + k0 + len) * MR];
                    let bias = &p.bias[blk * MR..(blk + 1) * MR];
                    // The next row block's output lines (and the residual's, which the last pass
                    // reads), one per row and vector: a plane apart, they are misses the hardware
                    // does not foresee.
                    if blk + 1 < blocks.end {
                        let next = (blk + 1) * MR * plane + j0;
                        let r = if pass.last { res.at(next) } else { std::ptr::null() };
                        prefetch_rows(out.0.wrapping_add(next), r, plane, MR.min(p.m - (blk + 1) * MR), n);
                    }
                    let (c, r) = (out.0.wrapping_add(blk * MR * plane + j0), res.at(blk * MR * plane + j0));
                    // SAFETY: `cpu` proves AVX-512F; `a` holds len x MR values and `b` len x NR;
                    // the rectangle rows blk*MR.. + rows, columns j0..j0 + n lies inside dst
                    // (asserted above) and is written by this task only (a later pass reads what
                    // the first pass of the same task wrote there); the residual's like it is
                    // inside res.
                    unsafe { tile(cpu, len, a, b, n, bias, act, pass, c, r, plane, rows) };
                }
            }
        }
    };
    // A fully-connected layer's token rows (a transformer's MB of weights, a few hundred KB of
    // panels): shared too, so that the weights stream from memory once, not once per panel.
    let rows_fit = matches!(cols, Columns::Rows(_)) && tiles * panel_len * std::mem::size_of::<f32>() <= 2 << 20;
    if tiles <= SHARED_PANELS || rows_fit {
        let mut panels = Aligned::zeros(tiles * panel_len);
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
    (0..tiles * splits).into_par_iter().with_min_len((tiles * splits / (8 * threads)).max(1)).for_each_init(Aligned::default, |panel, item| {
        let (t, s) = (item / splits, item % splits);
        panel.resize(panel_len);
        fill(panel, t);
        run(panel, t..t + 1, s * per..((s + 1) * per).min(blocks));
    });
}

/// Prefetches `rows` rows of `n` values `ld` apart from `c` (for writing) and from `res` (unless
/// null); only hints, so any address will do.
fn prefetch_rows(c: *mut f32, res: *const f32, ld: usize, rows: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        for r in 0..rows {
            for v in (0..n).step_by(16) {
                // SAFETY: prefetches never fault and read nothing.
                unsafe {
                    _mm_prefetch::<_MM_HINT_ET0>(c.wrapping_add(r * ld + v) as *const i8);
                    if !res.is_null() {
                        _mm_prefetch::<_MM_HINT_T0>(res.wrapping_add(r * ld + v) as *const i8);
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (c, res, ld, rows, n);
}

/// Which pass over k a micro-tile call is: the first starts from zero (else from the partial
/// sums in the output), the last adds the bias and applies the activation.
#[derive(Clone, Copy)]
struct Pass {
    first: bool,
    last: bool,
    /// Whether the pixel-major kernel prefetches this pass's weights (its first tile).
    own: bool,
}

/// One micro-tile, up to MR x NR, with AVX-512 when compiled for x86-64.
///
/// # Safety
/// `a` holds `k * MR` values and `b` `k * NR`; `c` addresses `rows` rows of `n` writable values
/// at stride `ldc` (initialised unless `pass.first`), `res` (unless null) as many readable.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(_cpu: Avx512, k: usize, a: &[f32], b: &[f32], n: usize, bias: &[f32], act: Activation, pass: Pass, c: *mut f32, res: *const f32, ldc: usize, rows: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; `_cpu` proves AVX-512F.
    unsafe {
        if n > 16 {
            tile_avx512::<2>(k, a, b, n, bias, act, pass, c, res, ldc, rows)
        } else {
            tile_avx512::<1>(k, a, b, n, bias, act, pass, c, res, ldc, rows)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the packed kernels run on x86-64 only ({k} {} {} {n} {} {act:?} {c:?} {res:?} {ldc} {rows} {})", a.len(), b.len(), bias.len(), pass.first);
}

/// # Safety
/// As [`tile`], with `n <= 16 * NV`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const NV: usize>(k: usize, a: &[f32], b: &[f32], n: usize, bias: &[f32], act: Activation, pass: Pass, c: *mut f32, res: *const f32, ldc: usize, rows: usize) {
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
                    let mut y = _mm512_add_ps(s, bias);
                    if !res.is_null() {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(lanes(v), res.add(r * ldc + 16 * v)));
                    }
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
