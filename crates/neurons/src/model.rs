//! Dissecting a trained scene-CNN model (`gradcam dissect`): its explained layer's activations
//! over a COCO-instances dataset, against the concept masks of that dataset.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use gradcam_encoders::scene_cnn::{self, SceneCnn};
use gradcam_scenes::coco::Instances;

use crate::{concepts, dissect, image_concepts, Dissection, Error, Options, Result};

/// The split folder of a dataset argument: itself when it has `instances.json`, else its `val/`.
pub fn split_dir(data: &Path) -> PathBuf {
    if data.join("instances.json").exists() || !data.join("val").join("instances.json").exists() {
        data.to_path_buf()
    } else {
        data.join("val")
    }
}

/// Dissects the encoder of the model folder `model` (a captioner's or VQA model's) on the first
/// `limit` images of `data` ([`split_dir`]). `progress` hears the images done in each batch and
/// the images to do.
pub fn dissect_model(model: &Path, data: &Path, limit: usize, options: Options, progress: &dyn Fn(usize, usize)) -> Result<Dissection> {
    if !(options.quantile > 0.0 && options.quantile < 1.0) || !(0.0..=1.0).contains(&options.iou_threshold) {
        let requirement = format!("must be in (0, 1) and [0, 1] (given {} and {})", options.quantile, options.iou_threshold);
        return Err(gradcam_core::SettingError::new(vec!["quantile", "iou_threshold"], requirement).into());
    }
    if limit == 0 {
        return Err(gradcam_core::SettingError::new(vec!["limit"], "must be at least 1").into());
    }
    let encoder = |e: gradcam_encoders::Error| Error::Data(format!("{}: {e}", model.display()));
    let (cnn, size) = scene_cnn::load_encoder(model).map_err(encoder)?;
    let dir = split_dir(data);
    let instances = Instances::read(&dir.join("instances.json"))?;
    let concepts = concepts(&instances);
    if concepts.is_empty() {
        return Err(Error::Data(format!("{}: no categories, colours or sizes to dissect against", dir.join("instances.json").display())));
    }
    let mut by_image: std::collections::HashMap<u64, Vec<&gradcam_scenes::coco::Instance>> = Default::default();
    for a in &instances.annotations {
        by_image.entry(a.image_id).or_default().push(a);
    }
    let images: Vec<_> = instances.images.iter().take(limit).collect();
    let mut activations = Vec::with_capacity(images.len());
    let mut masks = Vec::with_capacity(images.len());
    let mut dims = (0, 0, 0);
    for chunk in images.chunks(64) {
        let mut inputs = Vec::with_capacity(chunk.len());
        for info in chunk {
            let img = gradcam_encoders::preprocess::load_image(&dir.join("images").join(&info.file_name)).map_err(encoder)?;
            inputs.push(SceneCnn::preprocess(&img, size).map_err(encoder)?);
            let objects = by_image.get(&info.id).map(Vec::as_slice).unwrap_or(&[]);
            masks.push(image_concepts(objects, &concepts, &instances, (img.height() as usize, img.width() as usize)));
        }
        let a = cnn.forward(&Tensor::stack(&inputs, 0)?).map_err(encoder)?; // [b, K, h, w]
        let (_, k, h, w) = a.dims4()?;
        dims = (k, h, w);
        activations.extend(a.flatten_from(1)?.to_vec2::<f32>()?);
        progress(chunk.len(), images.len());
    }
    let units = dissect(&activations, dims, &masks, &concepts, options)?;
    Ok(Dissection { layer: scene_cnn::LAYER.into(), data: dir.display().to_string(), images: images.len(), options, concepts, units })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::dissect::{Concept, Dissection, Options, UnitName};

    #[test]
    fn options_are_refused_by_their_names_before_any_file_is_read() {
        let run = |quantile, limit| super::dissect_model(Path::new("/nonexistent"), Path::new("/nonexistent"), limit, Options { quantile, iou_threshold: 0.04 }, &|_, _| ());
        let err = run(1.5, 10).unwrap_err();
        assert_eq!(err.setting().map(|s| s.settings.clone()), Some(vec!["quantile", "iou_threshold"]));
        assert!(err.to_string().contains("must be in (0, 1)"), "{err}");
        assert_eq!(run(0.005, 0).unwrap_err().to_string(), "limit must be at least 1");
    }

    #[test]
    fn a_table_prints_its_concepts_and_units() {
        let unit = |unit, concept: Option<&str>, named| UnitName { unit, concept: concept.map(Into::into), category: concept.map(|_| "shape".into()), iou: 0.25, threshold: 1.0, named };
        let units = vec![unit(0, Some("circle"), true), unit(1, Some("circle"), true), unit(2, None, false)];
        let t = Dissection { layer: "conv4".into(), data: "d".into(), images: 3, options: Options { quantile: 0.005, iou_threshold: 0.04 }, concepts: vec![Concept { name: "circle".into(), category: "shape".into() }], units };
        let text = t.to_string();
        assert!(text.starts_with("  shape   circle     2 units\nunit  concept     category  IoU\n"), "{text}");
        assert!(text.ends_with("   2  -           -         0.250  (below threshold)\n"), "{text}");
    }
}
