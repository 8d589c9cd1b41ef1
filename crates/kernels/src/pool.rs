//! Pooling with PyTorch's semantics and exact backward: global average + max, max pooling (the
//! first maximum of a window gets the gradient) and adaptive average pooling.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, CResult};
use super::planes_per_task;


/// Global average and max pooling side by side, in one pass with one backward (candle's max
/// backward builds an equality mask over the whole input); the first maximum gets the gradient.
#[derive(Debug, Clone, Copy)]
pub struct GlobalAvgMaxPool;

impl GlobalAvgMaxPool {
    /// # Shapes
    /// `[n, C, h, w]` -> `[n, 2C]`: averages, then maxima.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(*self)
    }
}

impl CustomOp1 for GlobalAvgMaxPool {
    fn name(&self) -> &'static str {
        "gradcam-global-avg-max-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let plane = h * w;
        let mut out = vec![0.0f32; n * 2 * c];
        for (p, src) in x.chunks(plane).enumerate() {
            let (b, k) = (p / c, p % c);
            out[b * 2 * c + k] = src.iter().sum::<f32>() / plane as f32;
            out[b * 2 * c + c + k] = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, 2 * c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let plane = h * w;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0.0f32; n * c * plane];
        for (p, (dst, src)) in dx.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
            let (b, k) = (p / c, p % c);
            dst.fill(g[b * 2 * c + k] / plane as f32);
            let arg = src.iter().enumerate().fold(0, |best, (i, &v)| if v > src[best] { i } else { best });
            dst[arg] += g[b * 2 * c + c + k];
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Max pooling with PyTorch semantics (padding counts as -inf, the first maximum of a window
/// receives the gradient).
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    /// Window side.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Padding on every side (counts as -inf).
    pub padding: usize,
}

impl MaxPool2d {
    /// `[n, c, h, w]` -> `[n, c, out_h, out_w]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(*self)
    }

    fn out_size(&self, n: usize) -> CResult<usize> {
        if n + 2 * self.padding < self.kernel || self.stride == 0 {
            candle_core::bail!("max-pool: input side {n} is smaller than the kernel {}", self.kernel);
        }
        Ok((n + 2 * self.padding - self.kernel) / self.stride + 1)
    }

    /// One plane's maxima, row by row of windows (the same values as [`Self::argmax`] picks: a
    /// NaN in a window wins, as in PyTorch).
    fn forward_plane(&self, src: &[f32], h: usize, w: usize, ow: usize, dst: &mut [f32]) {
        // max that keeps a NaN from either side.
        #[inline(always)]
        fn nanmax(a: f32, b: f32) -> f32 {
            if b > a || b.is_nan() { b } else { a }
        }
        let (k, s, pad) = (self.kernel, self.stride, self.padding);
        // Separable: the maxima down each column of a row of windows (whole rows at a time,
        // which vectorise) into a row padded with -inf, then across each window of that row.
        // Room for every window, and for the last one's pair-wise reads below to cover ow windows.
        let wp = (ow * s + k).max(w + pad);
        let mut col = vec![f32::NEG_INFINITY; wp];
        for (oy, drow) in dst.chunks_mut(ow).enumerate() {
            let inner = &mut col[pad..pad + w];
            inner.fill(f32::NEG_INFINITY);
            for iy in (oy * s..oy * s + k).filter_map(|y| y.checked_sub(pad)).filter(|&iy| iy < h) {
                let srow = &src[iy * w..(iy + 1) * w];
                inner.iter_mut().zip(srow).for_each(|(c, &v)| *c = nanmax(*c, v));
            }
            match (k, s) {
                (3, 2) => drow.iter_mut().zip(col.chunks_exact(2)).zip(col[2..].chunks_exact(2)).for_each(|((d, a), b)| *d = nanmax(nanmax(a[0], a[1]), b[0])),
                (2, 2) => drow.iter_mut().zip(col.chunks_exact(2)).for_each(|(d, a)| *d = nanmax(a[0], a[1])),
                _ => drow.iter_mut().enumerate().for_each(|(ox, d)| *d = col[ox * s..ox * s + k].iter().fold(f32::NEG_INFINITY, |m, &v| nanmax(m, v))),
            }
        }
    }

    /// Index (within the plane) of the first maximum of window (oy, ox).
    #[inline]
    fn argmax(&self, src: &[f32], h: usize, w: usize, oy: usize, ox: usize) -> usize {
        let mut best = f32::NEG_INFINITY;
        let mut best_i = usize::MAX;
        for ky in 0..self.kernel {
            let iy = (oy * self.stride + ky) as isize - self.padding as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            for kx in 0..self.kernel {
                let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                if ix < 0 || ix >= w as isize {
                    continue;
                }
                let i = iy as usize * w + ix as usize;
                let v = src[i];
                if best_i == usize::MAX || v > best || v.is_nan() {
                    best = v;
                    best_i = i;
                    if v.is_nan() {
                        return i;
                    }
                }
            }
        }
        best_i
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "gradcam-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (oh, ow) = (self.out_size(h)?, self.out_size(w)?);
        let mut out = super::zeros(b * c * oh * ow);
        out.par_chunks_mut(oh * ow).enumerate().with_min_len(planes_per_task(oh * ow)).for_each(|(p, dst)| {
            self.forward_plane(&x[p * h * w..(p + 1) * h * w], h, w, ow, dst);
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let (b, c, h, w) = arg.dims4()?;
        let (oh, ow) = (self.out_size(h)?, self.out_size(w)?);
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0.0f32; b * c * h * w];
        dx.par_chunks_mut(h * w).enumerate().with_min_len(planes_per_task(h * w)).for_each(|(p, dst)| {
            let src = &x[p * h * w..(p + 1) * h * w];
            let g = &grad[p * oh * ow..(p + 1) * oh * ow];
            for oy in 0..oh {
                for ox in 0..ow {
                    dst[self.argmax(src, h, w, oy, ox)] += g[oy * ow + ox];
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// PyTorch's `AdaptiveAvgPool2d`: bin i covers [floor(i*H/OH), ceil((i+1)*H/OH)).
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveAvgPool2d {
    /// Output rows.
    pub out_h: usize,
    /// Output columns.
    pub out_w: usize,
}

impl AdaptiveAvgPool2d {
    /// `[n, c, h, w]` -> `[n, c, out_h, out_w]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if h == self.out_h && w == self.out_w {
            return Ok(x.clone());
        }
        x.contiguous()?.apply_op1(*self)
    }

    fn bins(n: usize, out: usize) -> Vec<(usize, usize)> {
        (0..out).map(|i| (i * n / out, ((i + 1) * n).div_ceil(out))).collect()
    }
}

impl CustomOp1 for AdaptiveAvgPool2d {
    fn name(&self) -> &'static str {
        "gradcam-adaptive-avg-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (ys, xs) = (Self::bins(h, self.out_h), Self::bins(w, self.out_w));
        let mut out = vec![0.0f32; b * c * self.out_h * self.out_w];
        out.par_chunks_mut(self.out_h * self.out_w).enumerate().for_each(|(p, dst)| {
            let src = &x[p * h * w..(p + 1) * h * w];
            for (oy, &(y0, y1)) in ys.iter().enumerate() {
                for (ox, &(x0, x1)) in xs.iter().enumerate() {
                    let mut s = 0.0;
                    for y in y0..y1 {
                        s += src[y * w + x0..y * w + x1].iter().sum::<f32>();
                    }
                    dst[oy * self.out_w + ox] = s / ((y1 - y0) * (x1 - x0)) as f32;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, self.out_h, self.out_w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let (b, c, h, w) = arg.dims4()?;
        let (ys, xs) = (Self::bins(h, self.out_h), Self::bins(w, self.out_w));
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0.0f32; b * c * h * w];
        dx.par_chunks_mut(h * w).enumerate().with_min_len(planes_per_task(h * w)).for_each(|(p, dst)| {
            let g = &grad[p * self.out_h * self.out_w..(p + 1) * self.out_h * self.out_w];
            for (oy, &(y0, y1)) in ys.iter().enumerate() {
                for (ox, &(x0, x1)) in xs.iter().enumerate() {
                    let share = g[oy * self.out_w + ox] / ((y1 - y0) * (x1 - x0)) as f32;
                    for y in y0..y1 {
                        dst[y * w + x0..y * w + x1].iter_mut().for_each(|d| *d += share);
                    }
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
