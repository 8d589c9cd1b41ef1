//! The log-probabilities of one caption's words as a single differentiable op of the image
//! embedding: the teacher-forced LSTM forward and its backward through time written out, so that
//! explaining every word costs one op instead of a graph of ~25 ops per word and step.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use gradcam_core::ops::matmul;

type CResult<T> = candle_core::Result<T>;

/// Frozen decoder weights and one caption: input tokens (`<start>` w1 .. w_{T-1}) and targets
/// (w1 .. w_T).
#[derive(Clone)]
pub struct CaptionLogProbs {
    pub(crate) embed: Arc<Vec<f32>>,
    /// `[4H, 2E + H]`: weight_ih (word, image) and weight_hh side by side.
    pub(crate) lstm: Arc<Vec<f32>>,
    /// `[4H]`: bias_ih + bias_hh.
    pub(crate) lstm_bias: Arc<Vec<f32>>,
    /// `[V, H]`, `[V]`.
    pub(crate) out: Arc<Vec<f32>>,
    pub(crate) out_bias: Arc<Vec<f32>>,
    pub(crate) e: usize,
    pub(crate) h: usize,
    pub(crate) v: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// The forward trace of the last single-image call, reused by the backward.
    pub(crate) cache: Arc<std::sync::Mutex<Option<(Vec<f32>, Trace)>>>,
}

/// Per-row, per-step values the backward needs.
pub(crate) struct Trace {
    /// Gate activations i, f, g, o: `[T][4H]`.
    gates: Vec<Vec<f32>>,
    /// Cell states c_0 .. c_T: `[T + 1][H]`.
    cells: Vec<Vec<f32>>,
    /// Hidden states h_0 .. h_T.
    hiddens: Vec<Vec<f32>>,
    /// Softmax of each step's logits: `[T][V]`.
    probs: Vec<Vec<f32>>,
}

/// out = W x for row-major W `[out.len(), x.len()]` (GEMM's setup costs more than a matrix-vector
/// product this small).
fn matvec(w: &[f32], x: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len())) {
        // Eight partial sums, so that the compiler vectorises the reduction.
        let mut acc = [0.0f32; 8];
        let (rc, xc) = (row.chunks_exact(8), x.chunks_exact(8));
        let tail: f32 = rc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
        for (r, xx) in rc.zip(xc) {
            for i in 0..8 {
                acc[i] += r[i] * xx[i];
            }
        }
        *o = acc.iter().sum::<f32>() + tail;
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CaptionLogProbs {
    /// Forward of one row; the log-probabilities of the targets and the trace.
    fn run(&self, img: &[f32]) -> (Vec<f32>, Trace) {
        let (e, h, v) = (self.e, self.h, self.v);
        let k = 2 * e + h;
        let mut tr = Trace { gates: vec![], cells: vec![vec![0.0; h]], hiddens: vec![vec![0.0; h]], probs: vec![] };
        let mut x = vec![0.0f32; k];
        let mut pre = vec![0.0f32; 4 * h];
        let mut logits = vec![0.0f32; v];
        let mut lp = Vec::with_capacity(self.inputs.len());
        for (t, (&input, &target)) in self.inputs.iter().zip(&self.targets).enumerate() {
            let row = input as usize * e;
            x[..e].copy_from_slice(&self.embed[row..row + e]);
            x[e..2 * e].copy_from_slice(img);
            x[2 * e..].copy_from_slice(&tr.hiddens[t]);
            matvec(&self.lstm, &x, &mut pre);
            let gates: Vec<f32> = pre
                .iter()
                .zip(self.lstm_bias.iter())
                .enumerate()
                .map(|(j, (&z, &b))| if (2 * h..3 * h).contains(&j) { (z + b).tanh() } else { sigmoid(z + b) })
                .collect();
            let c: Vec<f32> = (0..h).map(|j| gates[h + j] * tr.cells[t][j] + gates[j] * gates[2 * h + j]).collect();
            let hh: Vec<f32> = (0..h).map(|j| gates[3 * h + j] * c[j].tanh()).collect();
            matvec(&self.out, &hh, &mut logits);
            logits.iter_mut().zip(self.out_bias.iter()).for_each(|(l, b)| *l += b);
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            lp.push(logits[target as usize] - max - sum.ln());
            tr.probs.push(logits.iter().map(|l| (l - max).exp() / sum).collect());
            tr.gates.push(gates);
            tr.cells.push(c);
            tr.hiddens.push(hh);
        }
        (lp, tr)
    }

    /// d(sum_t g[r][t] * log p_t) / d img for every row r of `g`, all rows sharing one forward
    /// trace: backpropagation through time, batched over rows with GEMMs.
    fn backward(&self, tr: &Trace, g: &[Vec<f32>]) -> Vec<f32> {
        let (e, h, v) = (self.e, self.h, self.v);
        let (n, k) = (g.len(), 2 * e + h);
        let mut dimg = vec![0.0f32; n * e];
        let (mut dh, mut dc) = (vec![0.0f32; n * h], vec![0.0f32; n * h]);
        let mut dlogits = vec![0.0f32; n * v];
        let mut dh_out = vec![0.0f32; n * h];
        let mut dpre = vec![0.0f32; n * 4 * h];
        let mut dx = vec![0.0f32; n * k];
        // Rows whose weights are all zero from step t on need no work before t.
        let last: Vec<usize> = g.iter().map(|row| row.iter().rposition(|&w| w != 0.0).map_or(0, |t| t + 1)).collect();
        for t in (0..self.inputs.len()).rev() {
            let active: Vec<usize> = (0..n).filter(|&r| last[r] > t).collect();
            if active.is_empty() {
                continue;
            }
            let m = active.len();
            // log p = logit[target] - logsumexp: d/dlogits = g (onehot - softmax).
            for (a, &r) in active.iter().enumerate() {
                for w in 0..v {
                    dlogits[a * v + w] = g[r][t] * ((w as u32 == self.targets[t]) as u8 as f32 - tr.probs[t][w]);
                }
            }
            // dh_out[m, H] = dlogits[m, V] @ W_out[V, H]
            matmul(&mut dh_out, &dlogits, (v as isize, 1), &self.out, (h as isize, 1), m, h, v);
            let (gates, c, c_prev) = (&tr.gates[t], &tr.cells[t + 1], &tr.cells[t]);
            for (a, &r) in active.iter().enumerate() {
                for j in 0..h {
                    let (i, f, gg, o) = (gates[j], gates[h + j], gates[2 * h + j], gates[3 * h + j]);
                    let tc = c[j].tanh();
                    let dhj = dh[r * h + j] + dh_out[a * h + j];
                    let dcj = dc[r * h + j] + dhj * o * (1.0 - tc * tc);
                    let d = &mut dpre[a * 4 * h..(a + 1) * 4 * h];
                    d[j] = dcj * gg * i * (1.0 - i);
                    d[h + j] = dcj * c_prev[j] * f * (1.0 - f);
                    d[2 * h + j] = dcj * i * (1.0 - gg * gg);
                    d[3 * h + j] = dhj * tc * o * (1.0 - o);
                    dc[r * h + j] = dcj * f;
                }
            }
            // dx[m, E + H] = dpre[m, 4H] @ W[4H, E..]: the image part accumulates, the hidden part
            // flows back (the word embeddings' columns are not needed).
            let kx = e + h;
            matmul(&mut dx, &dpre, ((4 * h) as isize, 1), &self.lstm[e..], (k as isize, 1), m, kx, 4 * h);
            for (a, &r) in active.iter().enumerate() {
                let row = &dx[a * kx..(a + 1) * kx];
                dimg[r * e..(r + 1) * e].iter_mut().zip(&row[..e]).for_each(|(d, x)| *d += x);
                dh[r * h..(r + 1) * h].copy_from_slice(&row[e..]);
            }
        }
        dimg
    }

    /// Rows of `img`, and whether they are all the same (explanations replicate one image).
    fn rows<'a>(&self, img: &'a [f32]) -> (Vec<&'a [f32]>, bool) {
        let rows: Vec<&[f32]> = img.chunks(self.e).collect();
        let same = rows.iter().all(|r| *r == rows[0]);
        (rows, same)
    }
}

impl CustomOp1 for CaptionLogProbs {
    fn name(&self) -> &'static str {
        "gradcam-caption-logprobs"
    }

    /// `[n, E]` image embeddings -> `[n, T]` log p of each target word.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("{} supports f32 only", self.name()) };
        let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("{} needs a contiguous input", self.name()) };
        let (n, e) = layout.shape().dims2()?;
        if e != self.e {
            candle_core::bail!("{}: image embedding of {e}, the decoder takes {}", self.name(), self.e);
        }
        let (rows, same) = self.rows(&data[a..b]);
        let out: Vec<f32> = if same && n > 0 {
            let (lp, trace) = self.run(rows[0]);
            *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((rows[0].to_vec(), trace));
            (0..n).flat_map(|_| lp.iter().copied()).collect()
        } else {
            rows.iter().flat_map(|row| self.run(row).0).collect()
        };
        Ok((CpuStorage::F32(out), Shape::from((n, self.inputs.len()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let img = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.to_vec2::<f32>()?;
        let (rows, same) = self.rows(&img);
        let dimg: Vec<f32> = if same && !rows.is_empty() {
            let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|(img, _)| img.as_slice() == rows[0]);
            let trace = match cached {
                Some((_, trace)) => trace,
                None => self.run(rows[0]).1,
            };
            self.backward(&trace, &g)
        } else {
            rows.iter().zip(&g).flat_map(|(row, g)| self.backward(&self.run(row).1, std::slice::from_ref(g))).collect()
        };
        Ok(Some(Tensor::from_vec(dimg, arg.shape(), arg.device())?))
    }
}

/// The whole head of a caption's explanation as one op of the `conv4` activations: global
/// pooling (average, maximum and, optionally, the x and y moments), the image projection and
/// [`CaptionLogProbs`]. Written out rather than as a graph of candle ops because explaining
/// replicates the activations once per word: the forward and the backward through the decoder
/// run once for all rows, and the pooling's backward is a fill per channel.
#[derive(Clone)]
pub struct CaptionHead {
    pub(crate) scores: CaptionLogProbs,
    /// `[E, P]` and `[E]`, P = 2C (or 4C with moments).
    pub(crate) proj_w: Arc<Vec<f32>>,
    pub(crate) proj_b: Arc<Vec<f32>>,
    pub(crate) moments: bool,
}

/// Coordinates in [-1, 1] of `n` positions, as `scene_cnn::Pooling` uses.
fn axis(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * (2.0 / (n.max(2) - 1) as f32) - 1.0).collect()
}

impl CaptionHead {
    /// The pooled vector of one image's activations `[C, h, w]`, and each channel's argmax.
    fn pool(&self, a: &[f32], c: usize, h: usize, w: usize) -> (Vec<f32>, Vec<usize>) {
        let plane = h * w;
        let (xs, ys) = (axis(w), axis(h));
        let width = if self.moments { 4 * c } else { 2 * c };
        let mut p = vec![0.0f32; width];
        let mut arg = vec![0usize; c];
        for k in 0..c {
            let src = &a[k * plane..(k + 1) * plane];
            p[k] = src.iter().sum::<f32>() / plane as f32;
            let best = src.iter().enumerate().fold(0, |best, (i, &v)| if v > src[best] { i } else { best });
            p[c + k] = src[best];
            arg[k] = best;
            if self.moments {
                let (mut mx, mut my) = (0.0f32, 0.0f32);
                for (row, y) in src.chunks_exact(w).zip(&ys) {
                    mx += row.iter().zip(&xs).map(|(v, x)| v * x).sum::<f32>();
                    my += row.iter().sum::<f32>() * y;
                }
                p[2 * c + k] = mx / plane as f32;
                p[3 * c + k] = my / plane as f32;
            }
        }
        (p, arg)
    }

    /// e = W p + b.
    fn project(&self, p: &[f32]) -> Vec<f32> {
        let mut e = vec![0.0f32; self.proj_b.len()];
        matvec(&self.proj_w, p, &mut e);
        e.iter_mut().zip(self.proj_b.iter()).for_each(|(x, b)| *x += b);
        e
    }
}

impl CustomOp1 for CaptionHead {
    fn name(&self) -> &'static str {
        "gradcam-caption-head"
    }

    /// `[n, C, h, w]` activations -> `[n, T]` log p of each target word.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("{} supports f32 only", self.name()) };
        let Some((s, e)) = layout.contiguous_offsets() else { candle_core::bail!("{} needs a contiguous input", self.name()) };
        let (n, c, h, w) = layout.shape().dims4()?;
        let expected = if self.moments { 4 * c } else { 2 * c };
        if self.proj_w.len() != expected * self.scores.e {
            candle_core::bail!("{}: {c} channels do not fit the image projection", self.name());
        }
        let rows: Vec<&[f32]> = data[s..e].chunks(c * h * w).collect();
        let same = rows.iter().all(|r| *r == rows[0]);
        let embed = |row: &[f32]| self.project(&self.pool(row, c, h, w).0);
        let out: Vec<f32> = if same && n > 0 {
            let img = embed(rows[0]);
            let (lp, trace) = self.scores.run(&img);
            *self.scores.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((img, trace));
            (0..n).flat_map(|_| lp.iter().copied()).collect()
        } else {
            rows.iter().flat_map(|row| self.scores.run(&embed(row)).0).collect()
        };
        Ok((CpuStorage::F32(out), Shape::from((n, self.scores.inputs.len()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let plane = h * w;
        let a = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.to_vec2::<f32>()?;
        let rows: Vec<&[f32]> = a.chunks(c * plane).collect();
        let same = n > 0 && rows.iter().all(|r| *r == rows[0]);
        // d/d e for every row, then d/d pooled = dE W.
        let (de, args): (Vec<f32>, Vec<Vec<usize>>) = if same {
            let (p, arg0) = self.pool(rows[0], c, h, w);
            let img = self.project(&p);
            let cached = self.scores.cache.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|(x, _)| *x == img);
            let trace = match cached {
                Some((_, trace)) => trace,
                None => self.scores.run(&img).1,
            };
            (self.scores.backward(&trace, &g), vec![arg0; n])
        } else {
            let mut de = Vec::with_capacity(n * self.scores.e);
            let mut args = Vec::with_capacity(n);
            for (row, g) in rows.iter().zip(&g) {
                let (p, arg_r) = self.pool(row, c, h, w);
                de.extend(self.scores.backward(&self.scores.run(&self.project(&p)).1, std::slice::from_ref(g)));
                args.push(arg_r);
            }
            (de, args)
        };
        let (e_dim, p_dim) = (self.scores.e, if self.moments { 4 * c } else { 2 * c });
        let mut dp = vec![0.0f32; n * p_dim];
        matmul(&mut dp, &de, (e_dim as isize, 1), &self.proj_w, (p_dim as isize, 1), n, p_dim, e_dim);
        let (xs, ys) = (axis(w), axis(h));
        let mut da = vec![0.0f32; n * c * plane];
        for r in 0..n {
            let dpr = &dp[r * p_dim..(r + 1) * p_dim];
            for k in 0..c {
                let dst = &mut da[(r * c + k) * plane..(r * c + k + 1) * plane];
                let avg = dpr[k] / plane as f32;
                if self.moments {
                    let (gx, gy) = (dpr[2 * c + k] / plane as f32, dpr[3 * c + k] / plane as f32);
                    for (row, y) in dst.chunks_exact_mut(w).zip(&ys) {
                        let base = avg + gy * y;
                        row.iter_mut().zip(&xs).for_each(|(d, x)| *d = base + gx * x);
                    }
                } else {
                    dst.fill(avg);
                }
                dst[args[r][k]] += dpr[c + k];
            }
        }
        Ok(Some(Tensor::from_vec(da, arg.shape(), arg.device())?))
    }
}
