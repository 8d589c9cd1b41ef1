//! COCO captions and COCO instances files: readers for any such file (ours and anyone's) with
//! checked references, and the serialisable records our writer uses.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path};

use serde::Serialize;
use serde_json::Value;

use crate::json::{read, Record};
use crate::rle::{decode_counts, Mask};
use crate::Result;

/// An entry of `images`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageInfo {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

/// An entry of a captions file's `annotations`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Caption {
    pub id: u64,
    pub image_id: u64,
    pub caption: String,
}

/// A COCO captions file.
#[derive(Debug, Clone, PartialEq)]
pub struct Captions {
    pub images: Vec<ImageInfo>,
    pub annotations: Vec<Caption>,
}

/// An entry of `categories`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Category {
    pub id: u64,
    pub name: String,
    pub supercategory: String,
}

/// An object of an instances file, its segmentation decoded to a mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    pub bbox: [f64; 4],
    pub area: f64,
    pub iscrowd: bool,
    pub mask: Mask,
    /// ShapeScenes' extra fields; absent in other datasets.
    pub color: Option<String>,
    pub size: Option<String>,
}

/// A COCO instances file.
#[derive(Debug, Clone, PartialEq)]
pub struct Instances {
    pub images: Vec<ImageInfo>,
    pub categories: Vec<Category>,
    pub annotations: Vec<Instance>,
}

/// Largest image side an annotation file may declare, and largest image: those the image decoder
/// accepts (gradcam_encoders::preprocess). Each annotation's mask is a full-image bitmap, so a
/// declared 51222222 x 512 image would otherwise allocate 26 GB for one mask.
pub const MAX_SIDE: u64 = 16384;
pub const MAX_PIXELS: u64 = 50_000_000;

fn read_images(file: &Path, root: &Value) -> Result<Vec<ImageInfo>> {
    let mut seen = HashSet::new();
    Record::list(file, root, "images")?
        .iter()
        .map(|r| {
            let id = r.u64("id")?;
            if !seen.insert(id) {
                return Err(r.err("id", format!("image id {id} appears twice")));
            }
            let side = |k: &str| -> Result<u32> {
                let v = r.u64(k)?;
                u32::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| r.err(k, format!("{v} is not a valid image side")))
            };
            let (width, height) = (side("width")?, side("height")?);
            if width as u64 > MAX_SIDE || height as u64 > MAX_SIDE || width as u64 * height as u64 > MAX_PIXELS {
                return Err(r.err("width", format!("{width}x{height} is larger than any image gradcam decodes ({MAX_SIDE} px a side, {} megapixels)", MAX_PIXELS / 1_000_000)));
            }
            Ok(ImageInfo { id, file_name: image_file_name(r)?, width, height })
        })
        .collect()
}

/// The `images` of a COCO file (instances or captions) alone, checked as every reader checks
/// them, without decoding its annotations: the inputs of a dataset run.
pub fn image_list(file: &Path) -> Result<Vec<ImageInfo>> {
    read_images(file, &read(file)?)
}

/// The record's `file_name`, a path under the dataset's `images/` folder: relative and without
/// `..`, so that an annotation file cannot make a reader open a file outside the dataset.
fn image_file_name(r: &Record) -> Result<String> {
    let name = r.str("file_name")?;
    let path = Path::new(name);
    let inside = path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) && path.components().any(|c| matches!(c, Component::Normal(_)));
    if !inside {
        return Err(r.err("file_name", format!("{name:?} is not a file inside the images folder (absolute paths and `..` are refused)")));
    }
    Ok(name.to_string())
}

impl Captions {
    pub fn read(file: &Path) -> Result<Self> {
        let root = read(file)?;
        let images = read_images(file, &root)?;
        let ids: HashSet<u64> = images.iter().map(|i| i.id).collect();
        let annotations = Record::list(file, &root, "annotations")?
            .iter()
            .map(|r| {
                let image_id = r.u64("image_id")?;
                if !ids.contains(&image_id) {
                    return Err(r.err("image_id", format!("image {image_id} is not in `images`")));
                }
                Ok(Caption { id: r.u64("id")?, image_id, caption: r.str("caption")?.to_string() })
            })
            .collect::<Result<_>>()?;
        Ok(Captions { images, annotations })
    }

    /// Captions of each image, in file order.
    pub fn by_image(&self) -> HashMap<u64, Vec<&str>> {
        let mut m: HashMap<u64, Vec<&str>> = HashMap::new();
        for a in &self.annotations {
            m.entry(a.image_id).or_default().push(&a.caption);
        }
        m
    }
}

/// Decodes a `segmentation`: RLE (compressed string or uncompressed counts) or polygons
/// (rasterised at pixel centres). A box-only annotation (no `segmentation`) gets the box as its
/// mask.
fn read_segmentation(r: &Record, image: &ImageInfo, bbox: [f64; 4]) -> Result<Mask> {
    let (h, w) = (image.height as usize, image.width as usize);
    let Some(seg) = r.opt("segmentation") else {
        // The pixels whose centres lie in the box.
        let mut mask = Mask::new(h, w);
        let inside = |v: usize, lo: f64, len: f64| v as f64 + 0.5 >= lo && (v as f64 + 0.5) < lo + len;
        for y in (0..h).filter(|&y| inside(y, bbox[1], bbox[3])) {
            for x in (0..w).filter(|&x| inside(x, bbox[0], bbox[2])) {
                mask.set(y, x);
            }
        }
        return Ok(mask);
    };
    if let Some(obj) = seg.as_object() {
        let size: Vec<u64> = obj
            .get("size")
            .and_then(Value::as_array)
            .map(|s| s.iter().filter_map(Value::as_u64).collect())
            .ok_or_else(|| r.err("segmentation", "RLE needs `size`: [height, width]"))?;
        if size != [h as u64, w as u64] {
            return Err(r.err("segmentation", format!("RLE size {size:?} differs from the image's [{h}, {w}]: the mask lies outside the image")));
        }
        let counts = match obj.get("counts") {
            Some(Value::String(s)) => decode_counts(s).map_err(|m| r.err("segmentation", m))?,
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().ok_or_else(|| r.err("segmentation", "counts must be non-negative integers"))).collect::<Result<_>>()?,
            _ => return Err(r.err("segmentation", "RLE needs `counts`: a string or a list of integers")),
        };
        return Mask::from_counts(h, w, &counts).map_err(|m| r.err("segmentation", m));
    }
    let polygons = seg.as_array().ok_or_else(|| r.err("segmentation", "must be an RLE object or a list of polygons"))?;
    let mut mask = Mask::new(h, w);
    for poly in polygons {
        let pts: Vec<f64> = poly
            .as_array()
            .ok_or_else(|| r.err("segmentation", "a polygon must be a list of numbers"))?
            .iter()
            .map(|v| v.as_f64().ok_or_else(|| r.err("segmentation", "a polygon must be a list of numbers")))
            .collect::<Result<_>>()?;
        if pts.len() < 6 || pts.len() % 2 != 0 {
            return Err(r.err("segmentation", "a polygon needs at least 3 (x, y) points"));
        }
        if pts.chunks(2).any(|p| p[0] < 0.0 || p[1] < 0.0 || p[0] > w as f64 || p[1] > h as f64) {
            return Err(r.err("segmentation", format!("a polygon point lies outside the {w}x{h} image")));
        }
        let n = pts.len() / 2;
        for y in 0..h {
            for x in 0..w {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let mut inside = false;
                for i in 0..n {
                    let (xi, yi, xj, yj) = (pts[2 * i], pts[2 * i + 1], pts[2 * ((i + n - 1) % n)], pts[2 * ((i + n - 1) % n) + 1]);
                    if (yi > py) != (yj > py) && px < (xj - xi) * (py - yi) / (yj - yi) + xi {
                        inside = !inside;
                    }
                }
                if inside {
                    mask.set(y, x);
                }
            }
        }
    }
    Ok(mask)
}

/// Most annotations on one image (COCO has at most 93, LVIS some hundreds).
pub const MAX_ANNOTATIONS_PER_IMAGE: usize = 10_000;
/// Most bytes of masks one instances file decodes to (each annotation's mask is a bitmap of its
/// whole image, one byte a pixel).
pub const MAX_MASK_BYTES: u64 = 8 << 30;

/// Refuses, before any mask is decoded, an image with more than [`MAX_ANNOTATIONS_PER_IMAGE`]
/// annotations and a file whose masks would take more than [`MAX_MASK_BYTES`].
fn check_mask_budget(records: &[Record], images: &HashMap<u64, &ImageInfo>) -> Result<()> {
    let mut per_image: HashMap<u64, usize> = HashMap::new();
    let mut bytes = 0u64;
    for r in records {
        let Some(image) = r.opt("image_id").and_then(Value::as_u64).and_then(|id| images.get(&id)) else { continue };
        let n = per_image.entry(image.id).or_default();
        *n += 1;
        if *n > MAX_ANNOTATIONS_PER_IMAGE {
            return Err(r.err("image_id", format!("image {} has more than {MAX_ANNOTATIONS_PER_IMAGE} annotations", image.id)));
        }
        bytes = bytes.saturating_add(image.width as u64 * image.height as u64);
        if bytes > MAX_MASK_BYTES {
            return Err(r.err("image_id", format!("the annotations' masks would take more than {} GiB (a full-image mask each); split the file", MAX_MASK_BYTES >> 30)));
        }
    }
    Ok(())
}

impl Instances {
    pub fn read(file: &Path) -> Result<Self> {
        let root = read(file)?;
        let images = read_images(file, &root)?;
        let by_id: HashMap<u64, &ImageInfo> = images.iter().map(|i| (i.id, i)).collect();
        let categories: Vec<Category> = Record::list(file, &root, "categories")?
            .iter()
            .map(|r| {
                Ok(Category {
                    id: r.u64("id")?,
                    name: r.str("name")?.to_string(),
                    supercategory: r.opt_str("supercategory")?.unwrap_or_default(),
                })
            })
            .collect::<Result<_>>()?;
        let category_ids: HashSet<u64> = categories.iter().map(|c| c.id).collect();
        let records = Record::list(file, &root, "annotations")?;
        check_mask_budget(&records, &by_id)?;
        let mut ids = HashSet::new();
        let annotations = records
            .iter()
            .map(|r| {
                let id = r.u64("id")?;
                if !ids.insert(id) {
                    return Err(r.err("id", format!("annotation id {id} appears twice")));
                }
                let image_id = r.u64("image_id")?;
                let image = by_id.get(&image_id).ok_or_else(|| r.err("image_id", format!("image {image_id} is not in `images`")))?;
                let category_id = r.u64("category_id")?;
                if !category_ids.contains(&category_id) {
                    return Err(r.err("category_id", format!("category {category_id} is not in `categories`")));
                }
                let b = r.f64s("bbox", 4)?;
                if b[2] < 0.0 || b[3] < 0.0 || b[0] < 0.0 || b[1] < 0.0 || b[0] + b[2] > image.width as f64 + 1e-6 || b[1] + b[3] > image.height as f64 + 1e-6 {
                    return Err(r.err("bbox", format!("{b:?} lies outside the {}x{} image", image.width, image.height)));
                }
                let mask = read_segmentation(r, image, [b[0], b[1], b[2], b[3]])?;
                let iscrowd = r.opt("iscrowd").and_then(Value::as_u64).unwrap_or(0) != 0;
                Ok(Instance {
                    id,
                    image_id,
                    category_id,
                    bbox: [b[0], b[1], b[2], b[3]],
                    area: match r.opt("area") {
                        Some(_) => r.f64("area")?,
                        None => mask.area() as f64,
                    },
                    iscrowd,
                    mask,
                    color: r.opt_str("color")?,
                    size: r.opt_str("size")?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Instances { images, categories, annotations })
    }

    pub fn category_name(&self, id: u64) -> Option<&str> {
        self.categories.iter().find(|c| c.id == id).map(|c| c.name.as_str())
    }
}
