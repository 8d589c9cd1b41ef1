//! COCO run-length encoding of binary masks, as pycocotools' `maskApi.c` writes and reads it:
//! runs over the mask in column-major order, starting with a run of zeros, and the compressed
//! `counts` string (5 bits a character, offset 48, each count after the second stored as the
//! difference to the count two before).

/// A binary mask, row-major `height x width`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub height: usize,
    pub width: usize,
    pub data: Vec<bool>,
}

impl Mask {
    pub fn new(height: usize, width: usize) -> Self {
        Self { height, width, data: vec![false; height * width] }
    }

    pub fn get(&self, y: usize, x: usize) -> bool {
        self.data[y * self.width + x]
    }

    pub fn set(&mut self, y: usize, x: usize) {
        self.data[y * self.width + x] = true;
    }

    /// Whether pixel (y, x) lies on the mask or within `tolerance` pixels (Euclidean) of it: the
    /// pointing game's hit.
    /// Whether a set pixel lies within `tolerance` pixels of (y, x); only the part of the disc
    /// inside the mask is visited, so any tolerance costs at most the mask's size.
    pub fn near(&self, y: usize, x: usize, tolerance: f32) -> bool {
        let t = tolerance.max(0.0).ceil().min((self.height + self.width) as f32) as usize;
        let (y0, y1) = (y.saturating_sub(t), y.saturating_add(t).min(self.height.saturating_sub(1)));
        let (x0, x1) = (x.saturating_sub(t), x.saturating_add(t).min(self.width.saturating_sub(1)));
        (y0..=y1).any(|yy| {
            (x0..=x1).any(|xx| {
                let (dy, dx) = (yy as isize - y as isize, xx as isize - x as isize);
                yy < self.height && xx < self.width && ((dy * dy + dx * dx) as f32).sqrt() <= tolerance && self.get(yy, xx)
            })
        })
    }

    pub fn area(&self) -> usize {
        self.data.iter().filter(|&&v| v).count()
    }

    /// COCO bbox `[x, y, width, height]` of the set pixels (zeros for an empty mask).
    pub fn bbox(&self) -> [f64; 4] {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..self.height {
            for x in 0..self.width {
                if self.get(y, x) {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x + 1);
                    y1 = y1.max(y + 1);
                }
            }
        }
        if x0 == usize::MAX {
            return [0.0; 4];
        }
        [x0 as f64, y0 as f64, (x1 - x0) as f64, (y1 - y0) as f64]
    }

    /// Run lengths in column-major order, the first run counting zeros.
    pub fn to_counts(&self) -> Vec<u64> {
        let mut counts = Vec::new();
        let (mut current, mut run) = (false, 0u64);
        for x in 0..self.width {
            for y in 0..self.height {
                let v = self.get(y, x);
                if v != current {
                    counts.push(run);
                    current = v;
                    run = 0;
                }
                run += 1;
            }
        }
        counts.push(run);
        counts
    }

    /// The mask from column-major run lengths; errors if they do not cover exactly h x w pixels.
    pub fn from_counts(height: usize, width: usize, counts: &[u64]) -> Result<Self, String> {
        let total: u64 = counts.iter().sum();
        if total != (height * width) as u64 {
            return Err(format!("run lengths cover {total} pixels, the mask has {height} x {width} = {}", height * width));
        }
        let mut mask = Mask::new(height, width);
        let mut pos = 0usize;
        for (i, &c) in counts.iter().enumerate() {
            if i % 2 == 1 {
                for p in pos..pos + c as usize {
                    let (x, y) = (p / height, p % height);
                    mask.set(y, x);
                }
            }
            pos += c as usize;
        }
        Ok(mask)
    }
}

/// pycocotools' compressed counts string.
pub fn encode_counts(counts: &[u64]) -> String {
    let mut s = String::new();
    for i in 0..counts.len() {
        let mut x = counts[i] as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        let mut more = true;
        while more {
            let mut c = (x & 0x1f) as u8;
            x >>= 5;
            more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            s.push((c + 48) as char);
        }
    }
    s
}

/// Inverse of [`encode_counts`]; errors on characters outside the alphabet, truncated numbers
/// and negative run lengths.
pub fn decode_counts(s: &str) -> Result<Vec<u64>, String> {
    let bytes = s.as_bytes();
    let mut counts: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let (mut x, mut k, mut more) = (0i64, 0u32, true);
        while more {
            let Some(&b) = bytes.get(p) else {
                return Err("the counts string ends inside a number".into());
            };
            if !(48..48 + 64).contains(&b) || k >= 12 {
                return Err(format!("invalid character {:?} at {p} of the counts string", b as char));
            }
            let c = (b - 48) as i64;
            x |= (c & 0x1f) << (5 * k);
            more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more && c & 0x10 != 0 {
                x |= -1i64 << (5 * k);
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2];
        }
        if x < 0 {
            return Err(format!("negative run length {x} in the counts string"));
        }
        counts.push(x);
    }
    Ok(counts.into_iter().map(|c| c as u64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_of_a_small_mask() {
        let mut m = Mask::new(3, 4);
        m.set(0, 1);
        m.set(1, 1);
        m.set(2, 3);
        // Column-major: col0 = 000, col1 = 110, col2 = 000, col3 = 001.
        assert_eq!(m.to_counts(), vec![3, 2, 6, 1]);
        let s = encode_counts(&m.to_counts());
        assert_eq!(decode_counts(&s).unwrap(), vec![3, 2, 6, 1]);
        assert_eq!(Mask::from_counts(3, 4, &[3, 2, 6, 1]).unwrap(), m);
        assert_eq!(m.bbox(), [1.0, 0.0, 3.0, 3.0]);
        assert!(Mask::from_counts(3, 4, &[3, 2, 6]).is_err());
        assert!(decode_counts("\u{7f}").is_err());
    }
}
