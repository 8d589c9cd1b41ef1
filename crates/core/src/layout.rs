//! Where the explained layer's grid lies in its activations: a CNN's layer is the grid
//! `[n, K, h, w]` itself; a transformer's is a row of values per image in which the patch tokens
//! lie channels-last (`[h, w, K]`, after the class and distillation tokens), beside what else the
//! head reads from the forward pass (the residual stream around the layer), held as it is. The
//! methods read the grid; the head gets the row back with the grid replaced (`ungrid`).

use candle_core::Tensor;

use crate::{Error, Result};

/// How the explained layer's activations hold its grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[n, K, h, w]`: the activations are the grid (a CNN's layer).
    #[default]
    Grid,
    /// `[n, len]`: from element `start` of each row, the grid channels-last `[h, w, channels]`;
    /// the rest of the row (prefix tokens, values around the layer) is what else the head reads.
    Packed {
        /// Where the grid starts in a row.
        start: usize,
        /// Grid rows.
        h: usize,
        /// Grid columns.
        w: usize,
        /// Values per grid cell (the token width).
        channels: usize,
    },
}

impl Layout {
    /// A transformer's tokens `[n, prefix + h*w, dim]` flattened to rows (the grid row-major after
    /// `prefix` class / distillation tokens), nothing after them.
    pub fn tokens(prefix: usize, h: usize, w: usize, dim: usize) -> Layout {
        Layout::Packed { start: prefix * dim, h, w, channels: dim }
    }

    /// The grid `[n, K, h, w]` of `activations` (the model's own layout).
    pub fn grid(&self, activations: &Tensor) -> Result<Tensor> {
        match *self {
            Layout::Grid => Ok(activations.clone()),
            Layout::Packed { start, h, w, channels } => {
                let (n, len) = activations.dims2()?;
                if start + h * w * channels > len {
                    return Err(Error::Shape(format!("activations rows of {len} values hold no {h}x{w}x{channels} grid from {start}")));
                }
                Ok(activations.narrow(1, start, h * w * channels)?.reshape((n, h, w, channels))?.permute((0, 3, 1, 2))?.contiguous()?)
            }
        }
    }

    /// Activations in the model's layout with `grid` (`[n, K, h, w]`) in place of theirs, the
    /// rest of each row taken from `like` (the same image's activations, `[1, len]` or `[n, len]`).
    pub fn ungrid(&self, grid: &Tensor, like: &Tensor) -> Result<Tensor> {
        match *self {
            Layout::Grid => Ok(grid.clone()),
            Layout::Packed { start, h, w, channels } => {
                let n = grid.dim(0)?;
                let len = like.dim(1)?;
                let like = like.broadcast_as((n, len))?;
                let size = h * w * channels;
                let flat = grid.permute((0, 2, 3, 1))?.reshape((n, size))?;
                let mut parts = Vec::with_capacity(3);
                if start > 0 {
                    parts.push(like.narrow(1, 0, start)?.contiguous()?);
                }
                parts.push(flat);
                if start + size < len {
                    parts.push(like.narrow(1, start + size, len - start - size)?.contiguous()?);
                }
                Ok(Tensor::cat(&parts, 1)?)
            }
        }
    }

    /// `(n, K, h, w)` of the grid of `activations`.
    pub fn dims(&self, activations: &Tensor) -> Result<(usize, usize, usize, usize)> {
        match *self {
            Layout::Grid => Ok(activations.dims4()?),
            Layout::Packed { h, w, channels, .. } => Ok((activations.dim(0)?, channels, h, w)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_packed_grid_comes_out_and_goes_back() {
        // Two prefix values, a 2x3 grid of 2 channels (token-major), one trailing value.
        let row: Vec<f32> = (0..15).map(|v| v as f32).collect();
        let a = Tensor::from_vec(row, (1, 15), &Device::Cpu).unwrap();
        let layout = Layout::Packed { start: 2, h: 2, w: 3, channels: 2 };
        let g = layout.grid(&a).unwrap();
        assert_eq!(g.dims(), [1, 2, 2, 3]);
        // Channel 0 is every other value from 2; channel 1 from 3.
        assert_eq!(g.get(0).unwrap().get(0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        assert_eq!(g.get(0).unwrap().get(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), [3.0, 5.0, 7.0, 9.0, 11.0, 13.0]);
        let back = layout.ungrid(&(g * 2.0).unwrap(), &a).unwrap();
        let v = back.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&v[..2], [0.0, 1.0]);
        assert_eq!(v[2], 4.0);
        assert_eq!(v[14], 14.0);
        assert_eq!(layout.dims(&a).unwrap(), (1, 2, 2, 3));
    }
}
