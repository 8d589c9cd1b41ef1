//! ShapeScenes: small RGB scenes of 1 to 3 coloured shapes on a noisy, shaded background, with a
//! mask per object, captions that name every object, and questions whose answers follow from
//! the objects alone. Everything is a pure function of (seed, scene id).

use image::{Rgb, RgbImage};

use crate::rle::Mask;

pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const COLORS: [&str; 5] = ["red", "green", "blue", "yellow", "purple"];
pub const SIZES: [&str; 2] = ["small", "large"];
const RGB: [[u8; 3]; 5] = [[215, 35, 35], [35, 170, 55], [40, 75, 215], [235, 205, 30], [145, 50, 195]];

/// A small deterministic generator (splitmix64), so that files do not depend on a crate's RNG.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// One object of a scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLORS`].
    pub color: usize,
    /// Index into [`SIZES`].
    pub size: usize,
    /// Centre of the mask's bounding box: what spatial relations are judged by, so that they can
    /// be recomputed from a COCO instances file alone.
    pub center: (f32, f32),
    pub mask: Mask,
}

impl Object {
    pub fn shape_name(&self) -> &'static str {
        SHAPES[self.shape]
    }
    pub fn color_name(&self) -> &'static str {
        COLORS[self.color]
    }
    pub fn size_name(&self) -> &'static str {
        SIZES[self.size]
    }
}

/// Where `a` lies relative to `b`: along the axis of the larger centre offset.
pub fn relation(a: &Object, b: &Object) -> &'static str {
    let (dx, dy) = (a.center.0 - b.center.0, a.center.1 - b.center.1);
    if dx.abs() >= dy.abs() {
        if dx < 0.0 {
            "left of"
        } else {
            "right of"
        }
    } else if dy < 0.0 {
        "above"
    } else {
        "below"
    }
}

/// A question with its answer and the objects the answer depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Qa {
    pub question: String,
    pub answer: String,
    /// VQA v2's answer type: `yes/no`, `number` or `other`.
    pub answer_type: &'static str,
    /// Ours: `color`, `shape`, `exist`, `count` or `spatial`.
    pub question_type: &'static str,
    /// Indices into the scene's objects.
    pub evidence: Vec<usize>,
}

/// A generated scene.
#[derive(Debug, Clone)]
pub struct Scene {
    pub id: u64,
    pub image: RgbImage,
    pub objects: Vec<Object>,
    pub captions: Vec<String>,
    pub questions: Vec<Qa>,
    /// The spurious cue of a classification scene ([`generate_biased`]).
    pub cue: Option<Cue>,
}

/// Spurious cues the classification variant can add (`gradcam scenes --bias CUE:P`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CueKind {
    /// A plus-shaped mark, 9 x 9 px, in a random corner; its colour goes with a shape.
    Mark,
}

impl CueKind {
    pub const ALL: [CueKind; 1] = [CueKind::Mark];

    pub fn name(self) -> &'static str {
        match self {
            CueKind::Mark => "mark",
        }
    }
}

/// The bias of a classification dataset: in train and val, the cue carries the colour of the
/// image's own class with probability `p` (else the colour of another class, uniformly); in test
/// with probability 0.5. `p` = 1/3 makes the cue independent of the class (a balanced set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bias {
    pub cue: CueKind,
    pub p: f64,
}

impl Bias {
    /// The cue probability of the test split.
    pub const TEST_P: f64 = 0.5;

    /// The probability that makes the cue independent of the class.
    pub fn balanced_p() -> f64 {
        1.0 / SHAPES.len() as f64
    }
}

/// Why a [`Bias`] could not be read from text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BiasError {
    #[error("{given:?}: give CUE:P, e.g. mark:0.95 (cues: {})", cue_names())]
    Form { given: String },
    #[error("unknown cue {cue:?}; known cues: {}", cue_names())]
    UnknownCue { cue: String },
    #[error("{0:?} is not a probability")]
    NotANumber(String),
    #[error("probability {0} is outside [0, 1]")]
    OutOfRange(f64),
}

fn cue_names() -> String {
    CueKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

impl std::str::FromStr for Bias {
    type Err = BiasError;
    /// `CUE:P`, e.g. `mark:0.95`, or `mark:balanced` (P = 1/3).
    fn from_str(s: &str) -> Result<Self, BiasError> {
        let (cue, p) = s.split_once(':').ok_or_else(|| BiasError::Form { given: s.into() })?;
        let cue = CueKind::ALL.into_iter().find(|k| k.name() == cue).ok_or_else(|| BiasError::UnknownCue { cue: cue.into() })?;
        let p = if p == "balanced" { Bias::balanced_p() } else { p.parse::<f64>().map_err(|_| BiasError::NotANumber(p.into()))? };
        if !(0.0..=1.0).contains(&p) {
            return Err(BiasError::OutOfRange(p));
        }
        Ok(Bias { cue, p })
    }
}

/// Names and colours of the cue marks, one per shape class (none of them an object colour).
pub const CUE_COLORS: [&str; 3] = ["cyan", "orange", "pink"];
pub const CUE_RGB: [[u8; 3]; 3] = [[0, 215, 215], [250, 135, 0], [255, 80, 200]];
/// Side of the cue mark and its distance from the image border, in pixels.
pub const CUE_SIDE: usize = 9;
const CUE_MARGIN: usize = 2;

/// The spurious cue drawn in a classification scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Cue {
    /// The shape class whose colour the mark has (index into [`SHAPES`] and [`CUE_COLORS`]).
    pub class: usize,
    /// Exactly the pixels drawn.
    pub mask: Mask,
}

impl Cue {
    pub fn color_name(&self) -> &'static str {
        CUE_COLORS[self.class]
    }
}

/// Scene `id` of the dataset with this seed, `size` pixels square (64 to 128).
pub fn generate(seed: u64, id: u64, size: u32) -> Scene {
    let mut rng = Rng::new(seed ^ id.wrapping_mul(0xd134_2543_de82_ef95));
    let mut image = background(&mut rng, size);
    let objects = place_objects(&mut rng, size);
    for o in &objects {
        let base = RGB[o.color];
        let tint: [i32; 3] = std::array::from_fn(|_| rng.range(-14.0, 14.0) as i32);
        for (i, &inside) in o.mask.data.iter().enumerate() {
            if inside {
                let noise = rng.range(-6.0, 6.0) as i32;
                let px = Rgb(std::array::from_fn(|c| (base[c] as i32 + tint[c] + noise).clamp(0, 255) as u8));
                image.put_pixel((i % size as usize) as u32, (i / size as usize) as u32, px);
            }
        }
    }
    let captions = captions(&mut rng, &objects);
    let questions = questions(&mut rng, &objects);
    Scene { id, image, objects, captions, questions, cue: None }
}

/// Scene `id` of a classification dataset: one object, whose shape is the image's class, away
/// from the four corners, and a cue mark in one corner whose colour is the class's with
/// probability `p` (else another class's, uniformly).
pub fn generate_biased(seed: u64, id: u64, size: u32, cue: CueKind, p: f64) -> Scene {
    let mut rng = Rng::new(seed ^ id.wrapping_mul(0xd134_2543_de82_ef95) ^ 0x5bd1_e995);
    let mut image = background(&mut rng, size);
    let n = size as usize;
    let corner_box = |c: usize| -> [f32; 4] {
        let x0 = if c % 2 == 0 { CUE_MARGIN } else { n - CUE_MARGIN - CUE_SIDE };
        let y0 = if c < 2 { CUE_MARGIN } else { n - CUE_MARGIN - CUE_SIDE };
        [x0 as f32, y0 as f32, (x0 + CUE_SIDE) as f32, (y0 + CUE_SIDE) as f32]
    };
    let s = size as f32;
    let object = loop {
        let (shape, color, sz) = (rng.below(SHAPES.len()), rng.below(COLORS.len()), rng.below(SIZES.len()));
        let r = s * if sz == 0 { 0.1 } else { 0.16 } * rng.range(0.95, 1.05);
        let center = (rng.range(r + 1.0, s - r - 1.0), rng.range(r + 1.0, s - r - 1.0));
        let b = [center.0 - r - 2.0, center.1 - r - 2.0, center.0 + r + 2.0, center.1 + r + 2.0];
        if (0..4).map(corner_box).any(|o| b[0] < o[2] && o[0] < b[2] && b[1] < o[3] && o[1] < b[3]) {
            continue;
        }
        let mask = rasterize(shape, center, r, size);
        let [x, y, w, h] = mask.bbox();
        break Object { shape, color, size: sz, center: ((x + w / 2.0) as f32, (y + h / 2.0) as f32), mask };
    };
    let base = RGB[object.color];
    let tint: [i32; 3] = std::array::from_fn(|_| rng.range(-14.0, 14.0) as i32);
    for (i, &inside) in object.mask.data.iter().enumerate() {
        if inside {
            let noise = rng.range(-6.0, 6.0) as i32;
            image.put_pixel((i % n) as u32, (i / n) as u32, Rgb(std::array::from_fn(|c| (base[c] as i32 + tint[c] + noise).clamp(0, 255) as u8)));
        }
    }
    let class = if (rng.unit() as f64) < p { object.shape } else { (object.shape + 1 + rng.below(SHAPES.len() - 1)) % SHAPES.len() };
    let [x0, y0, _, _] = corner_box(rng.below(4));
    let mut mask = Mask::new(n, n);
    match cue {
        CueKind::Mark => {
            let half = CUE_SIDE / 2;
            for dy in 0..CUE_SIDE {
                for dx in 0..CUE_SIDE {
                    if dx.abs_diff(half) <= 1 || dy.abs_diff(half) <= 1 {
                        let (x, y) = (x0 as usize + dx, y0 as usize + dy);
                        mask.set(y, x);
                        image.put_pixel(x as u32, y as u32, Rgb(CUE_RGB[class]));
                    }
                }
            }
        }
    }
    let objects = vec![object];
    let captions = captions(&mut rng, &objects);
    let questions = questions(&mut rng, &objects);
    Scene { id, image, objects, captions, questions, cue: Some(Cue { class, mask }) }
}

/// A grey-ish shaded background with pixel noise and faint stripes: never flat, never as
/// saturated as the objects.
fn background(rng: &mut Rng, size: u32) -> RgbImage {
    let grey = rng.range(70.0, 185.0);
    let tint: [f32; 3] = std::array::from_fn(|_| rng.range(-18.0, 18.0));
    let angle = rng.range(0.0, std::f32::consts::TAU);
    let (gx, gy) = (angle.cos(), angle.sin());
    let slope = rng.range(10.0, 35.0);
    let stripe_period = rng.range(5.0, 14.0);
    let stripe_amp = rng.range(0.0, 10.0);
    RgbImage::from_fn(size, size, |x, y| {
        let (u, v) = (x as f32 / size as f32 - 0.5, y as f32 / size as f32 - 0.5);
        let shade = slope * (u * gx + v * gy) + stripe_amp * ((x as f32 * gy - y as f32 * gx) / stripe_period).sin();
        let noise = rng.range(-18.0, 18.0);
        Rgb(std::array::from_fn(|c| (grey + tint[c] + shade + noise).clamp(0.0, 255.0) as u8))
    })
}

fn rasterize(shape: usize, center: (f32, f32), r: f32, size: u32) -> Mask {
    let n = size as usize;
    let mut mask = Mask::new(n, n);
    let (cx, cy) = center;
    // Triangle pointing up, its centroid at the centre.
    let tri = [(cx, cy - r), (cx - 0.95 * r, cy + 0.75 * r), (cx + 0.95 * r, cy + 0.75 * r)];
    let edge = |(ax, ay): (f32, f32), (bx, by): (f32, f32), px: f32, py: f32| (bx - ax) * (py - ay) - (by - ay) * (px - ax);
    for y in 0..n {
        for x in 0..n {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let inside = match shape {
                0 => (px - cx).powi(2) + (py - cy).powi(2) <= r * r,
                1 => (px - cx).abs() <= 0.85 * r && (py - cy).abs() <= 0.85 * r,
                _ => {
                    let e = [edge(tri[0], tri[1], px, py), edge(tri[1], tri[2], px, py), edge(tri[2], tri[0], px, py)];
                    e.iter().all(|&v| v <= 0.0) || e.iter().all(|&v| v >= 0.0)
                }
            };
            if inside {
                mask.set(y, x);
            }
        }
    }
    mask
}

/// 1 to 3 objects, distinct in (colour, shape), whose boxes are at least 2 px apart.
fn place_objects(rng: &mut Rng, size: u32) -> Vec<Object> {
    let count = 1 + rng.below(3);
    let s = size as f32;
    let mut objects: Vec<Object> = Vec::new();
    let mut boxes: Vec<[f32; 4]> = Vec::new();
    let mut attempts = 0;
    while objects.len() < count && attempts < 200 {
        attempts += 1;
        let (shape, color, sz) = (rng.below(SHAPES.len()), rng.below(COLORS.len()), rng.below(SIZES.len()));
        if objects.iter().any(|o| o.shape == shape && o.color == color) {
            continue;
        }
        let r = s * if sz == 0 { 0.1 } else { 0.16 } * rng.range(0.95, 1.05);
        let center = (rng.range(r + 1.0, s - r - 1.0), rng.range(r + 1.0, s - r - 1.0));
        let b = [center.0 - r - 2.0, center.1 - r - 2.0, center.0 + r + 2.0, center.1 + r + 2.0];
        if boxes.iter().any(|o| b[0] < o[2] && o[0] < b[2] && b[1] < o[3] && o[1] < b[3]) {
            continue;
        }
        boxes.push(b);
        let mask = rasterize(shape, center, r, size);
        let [x, y, w, h] = mask.bbox();
        let center = ((x + w / 2.0) as f32, (y + h / 2.0) as f32);
        objects.push(Object { shape, color, size: sz, center, mask });
    }
    objects
}

/// "a [size] colour shape", the size word half of the time.
fn phrase(rng: &mut Rng, o: &Object) -> String {
    if rng.unit() < 0.5 {
        format!("a {} {} {}", o.size_name(), o.color_name(), o.shape_name())
    } else {
        format!("a {} {}", o.color_name(), o.shape_name())
    }
}

/// Five captions, each naming every object exactly once by colour and shape.
fn captions(rng: &mut Rng, objects: &[Object]) -> Vec<String> {
    (0..5)
        .map(|_| {
            let mut order: Vec<usize> = (0..objects.len()).collect();
            rng.shuffle(&mut order);
            let p: Vec<String> = order.iter().map(|&i| phrase(rng, &objects[i])).collect();
            let rel = |i: usize, j: usize| relation(&objects[order[i]], &objects[order[j]]);
            match p.len() {
                1 => match rng.below(5) {
                    0 => p[0].clone(),
                    1 => format!("there is {}", p[0]),
                    2 => format!("{} on a noisy background", p[0]),
                    3 => format!("an image with {}", p[0]),
                    _ => format!("a picture of {}", p[0]),
                },
                2 => match rng.below(4) {
                    0 | 1 => format!("{} {} {}", p[0], rel(0, 1), p[1]),
                    2 => format!("{} and {}", p[0], p[1]),
                    _ => format!("there is {} and {}", p[0], p[1]),
                },
                _ => match rng.below(4) {
                    0 | 1 => format!("{} {} {} and {}", p[0], rel(0, 1), p[1], p[2]),
                    2 => format!("{} and {} and {}", p[0], p[1], p[2]),
                    _ => format!("{} {} {} {} {}", p[0], rel(0, 1), p[1], rel(1, 2), p[2]),
                },
            }
        })
        .collect()
}

fn qa(question: String, answer: &str, answer_type: &'static str, question_type: &'static str, evidence: Vec<usize>) -> Qa {
    Qa { question, answer: answer.to_string(), answer_type, question_type, evidence }
}

/// Up to five questions: colour of a named shape, shape of a named colour, existence (yes or no),
/// counting and a spatial question, each asked only where its answer is unambiguous.
fn questions(rng: &mut Rng, objects: &[Object]) -> Vec<Qa> {
    let mut out = Vec::new();
    let unique_shape: Vec<usize> = (0..objects.len()).filter(|&i| objects.iter().filter(|o| o.shape == objects[i].shape).count() == 1).collect();
    if !unique_shape.is_empty() {
        let i = *rng.pick(&unique_shape);
        out.push(qa(format!("what color is the {}?", objects[i].shape_name()), objects[i].color_name(), "other", "color", vec![i]));
    }
    let unique_color: Vec<usize> = (0..objects.len()).filter(|&i| objects.iter().filter(|o| o.color == objects[i].color).count() == 1).collect();
    if !unique_color.is_empty() {
        let i = *rng.pick(&unique_color);
        out.push(qa(format!("what shape is the {} object?", objects[i].color_name()), objects[i].shape_name(), "other", "shape", vec![i]));
    }
    if rng.unit() < 0.5 {
        let i = rng.below(objects.len());
        let o = &objects[i];
        out.push(qa(format!("is there a {} {}?", o.color_name(), o.shape_name()), "yes", "yes/no", "exist", vec![i]));
    } else {
        loop {
            let (shape, color) = (rng.below(SHAPES.len()), rng.below(COLORS.len()));
            if !objects.iter().any(|o| o.shape == shape && o.color == color) {
                out.push(qa(format!("is there a {} {}?", COLORS[color], SHAPES[shape]), "no", "yes/no", "exist", vec![]));
                break;
            }
        }
    }
    let (question, counted): (String, Vec<usize>) = if rng.unit() < 0.5 {
        let shape = rng.below(SHAPES.len());
        (format!("how many {}s are there?", SHAPES[shape]), (0..objects.len()).filter(|&i| objects[i].shape == shape).collect())
    } else {
        let color = rng.below(COLORS.len());
        (format!("how many {} objects are there?", COLORS[color]), (0..objects.len()).filter(|&i| objects[i].color == color).collect())
    };
    out.push(qa(question, &counted.len().to_string(), "number", "count", counted));
    // "what is left of the green triangle?": only where exactly one object stands in that relation.
    let mut spatial = Vec::new();
    for r in 0..objects.len() {
        for rel in ["left of", "right of", "above", "below"] {
            let hits: Vec<usize> = (0..objects.len()).filter(|&o| o != r && relation(&objects[o], &objects[r]) == rel).collect();
            if hits.len() == 1 {
                spatial.push((hits[0], rel, r));
            }
        }
    }
    if !spatial.is_empty() {
        let (o, rel, r) = *rng.pick(&spatial);
        let (obj, reference) = (&objects[o], &objects[r]);
        out.push(qa(
            format!("what is {rel} the {} {}?", reference.color_name(), reference.shape_name()),
            &format!("{} {}", obj.color_name(), obj.shape_name()),
            "other",
            "spatial",
            vec![o, r],
        ));
    }
    out
}

#[cfg(test)]
mod bias_tests {
    use super::{Bias, BiasError};

    #[test]
    fn a_bias_reads_cue_and_probability() {
        assert_eq!("mark:0.25".parse::<Bias>().map(|b| b.p), Ok(0.25));
        assert_eq!("mark:balanced".parse::<Bias>().map(|b| b.p), Ok(Bias::balanced_p()));
        assert_eq!("mark".parse::<Bias>().unwrap_err(), BiasError::Form { given: "mark".into() });
        assert_eq!("texture:0.9".parse::<Bias>().unwrap_err().to_string(), "unknown cue \"texture\"; known cues: mark");
        assert_eq!("mark:x".parse::<Bias>().unwrap_err(), BiasError::NotANumber("x".into()));
        assert_eq!("mark:1.5".parse::<Bias>().unwrap_err().to_string(), "probability 1.5 is outside [0, 1]");
    }
}
