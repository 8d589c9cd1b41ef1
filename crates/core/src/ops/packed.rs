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

/// f32 values that start on a cache line (64 bytes), so that no vector load of the kernels,
/// whose offsets are multiples of 64 bytes, splits across two lines (large allocations start
/// 16 bytes past a page).
#[derive(Debug, Clone, Default)]
pub(super) struct Aligned {
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
pub(super) struct Blocks<const R: usize> {
    data: Aligned,
    bias: Vec<f32>,
    m: usize,
    k: usize,
}

pub(super) type PackedWeights = Blocks<MR>;
pub(super) type ChannelBlocks = Blocks<NC>;

impl<const R: usize> Blocks<R> {
    pub(super) fn new(w: &[f32], bias: &[f32], m: usize, k: usize) -> Self {
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
/// row-major `[m, plane]`.
pub(super) fn conv(p: &PackedWeights, cols: Columns<'_>, plane: usize, act: Activation, res: Option<&[f32]>, dst: &mut [f32]) {
    assert!(dst.len() >= p.m * plane && res.is_none_or(|r| r.len() >= p.m * plane), "packed conv: output too small");
    let res = Residual(res.map_or(std::ptr::null(), |r| r.as_ptr()));
    let res = &res;
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
                    // SAFETY: `available()` was checked when the weights were packed (callers
                    // only pack then); `a` holds len x MR values and `b` len x NR; the rectangle
                    // rows blk*MR.. + rows, columns j0..j0 + n lies inside dst (asserted above)
                    // and is written by this task only; the residual's like it is inside res.
                    unsafe { tile(len, a, b, n, bias, act, pass, c, r, plane, rows) };
                }
            }
        }
    };
    if tiles <= SHARED_PANELS {
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
/// The CPU must support AVX-512F; `a` holds `k * MR` values and `b` `k * NR`; `c` addresses
/// `rows` rows of `n` writable values at stride `ldc`, `res` (unless null) as many readable.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(k: usize, a: &[f32], b: &[f32], n: usize, bias: &[f32], act: Activation, pass: Pass, c: *mut f32, res: *const f32, ldc: usize, rows: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
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

/// Output channels per block of the pixel-major kernel: two 16-float vectors.
const NC: usize = 32;
/// Pixels per micro-tile of the pixel-major kernel at most (28 accumulators): a whole row of a
/// 14x14 plane.
const MAXP: usize = 14;
/// Winograd tiles per micro-tile of its products at most.
const ROW_SEGMENT: usize = 12;

/// Whether the pixel-major kernel takes a convolution of this geometry (strides 1 and 2): every
/// kernel larger than 1x1, whose im2col costs the column panels more than the pixel-major
/// kernel's transposed stores, and 1x1 kernels on narrow outputs, where column panels would
/// waste vector lanes (measured on ResNet-50 and VGG-16 with `bench classify --layers`).
pub(super) fn pixel_major_pays(g: &ConvGeometry) -> bool {
    (g.kh * g.kw > 1 || g.ow <= 16) && (g.stride == 1 || g.stride == 2)
}

/// A convolution computed pixel by pixel with the output channels in the vector lanes (the
/// orientation of oneDNN's and MLAS's blocked-layout kernels), reading the input straight from
/// (a zero-padded copy of) the image, no im2col: each step of k broadcasts one input value per
/// pixel of a row segment and multiplies it by 32 channels' weights. Channels `c0..` of `x`
/// (`[c, h, w]`), output `dst` `[m, oh * ow]`; `res`, when given, is added before the
/// activation.
pub(super) fn conv_pixel_major(p: &ChannelBlocks, x: &[f32], g: &ConvGeometry, c0: usize, act: Activation, res: Option<&[f32]>, dst: &mut [f32]) {
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
    let out = Out(dst.as_mut_ptr());
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
                // SAFETY: `available()` was checked when the weights were packed; w's slice holds
                // len x NC values; every address base + offsets[kk] + j * stride (j < n) lies
                // inside src (the assert above bounds the largest); tmp holds MAXP x NC values;
                // `ahead` is only prefetched; channels blk*NC + c < m (c < channels) and pixels
                // pixel .. pixel + n < plane are inside dst (and res), and dst's are this item's
                // alone (its channel block and tiles).
                unsafe { pixels(n, g.stride, len, &w[k0 * NC..(k0 + len) * NC], src[base..].as_ptr(), &offsets[k0..k0 + len], bias, act, pass, ahead, tmp, to) };
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
unsafe fn pixels(n: usize, stride: usize, k: usize, w: &[f32], src: *const f32, offsets: &[usize], bias: &[f32], act: Activation, pass: Pass, ahead: *const f32, tmp: &mut [f32], to: Planes) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
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
struct Planes {
    out: *mut f32,
    res: *const f32,
    ld: usize,
    channels: usize,
}

impl Planes {
    const BUFFER: Planes = Planes { out: std::ptr::null_mut(), res: std::ptr::null(), ld: 0, channels: 0 };
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


/// Winograd F(2x2, 3x3) (Lavin and Gray, 2016) for 3x3 stride-1 convolutions: each 2x2 block of
/// outputs from a 4x4 input patch with 16 multiplications per (input, output) channel pair
/// instead of 36. The weights are transformed once (`U = G g G^T`); per call the patches are
/// transformed (`V = B^T d B`), multiplied channel-wise by the pixel-major kernel (16
/// products of `[tiles, C] x [C, 32]`) and transformed back (`Y = A^T M A`) with the bias and
/// activation. The transforms are exact in real arithmetic; in f32 the maps stay within the
/// goldens' 1e-3.
#[derive(Debug, Clone)]
pub(super) struct Winograd {
    /// Per block of NC output channels, per position xi of the 4x4 transform: `[C][NC]`.
    data: Aligned,
    bias: Vec<f32>,
    m: usize,
    c: usize,
}

/// Input channels below which the transforms cost more than the products save.
pub(super) const WINOGRAD_MIN_CHANNELS: usize = 512;

impl Winograd {
    /// From weights `[m, c, 3, 3]`.
    pub(super) fn new(w: &[f32], bias: &[f32], m: usize, c: usize) -> Self {
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
pub(super) fn winograd_pays(g: &ConvGeometry) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == 1 && g.c >= WINOGRAD_MIN_CHANNELS && g.ow >= 28 && g.oh * g.ow <= 32 * 32
}

/// `dst[m, oh * ow] = act(conv3x3(x) + bias + res)` by Winograd F(2x2, 3x3); `x` `[c, h, w]`.
pub(super) fn conv_winograd(p: &Winograd, x: &[f32], g: &ConvGeometry, act: Activation, res: Option<&[f32]>, dst: &mut [f32]) {
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
    let out = Out(dst.as_mut_ptr());
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
                // SAFETY: `available()` was checked when the weights were transformed; u's slice
                // holds c x NC values; the n tiles' values ((ty * 16 + xi) * c + kk) * tw + tx0 + j
                // (kk < c, j < n) lie inside v; mx holds MAXP x NC values.
                unsafe { pixels(n, 1, c, &u[xi * c * NC..(xi + 1) * c * NC], v[(ty * 16 + xi) * c * tw + tx0..].as_ptr(), &offsets, &zero, Activation::Identity, Pass { first: true, last: true, own: true }, std::ptr::null(), mx, Planes::BUFFER) };
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
                            unsafe { *out.0.add(at) = act.apply(val + bias[l] + r) };
                        }
                    }
                }
            }
        }
    });
}
