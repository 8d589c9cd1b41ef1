//! Results as a Markdown table and the failure-mode page (paper section 6.1).

use std::fmt::Write as _;
use std::path::Path;

use gradcam_core::map::{overlay, Region};
use gradcam_io::write_png as write_png_atomic;
use gradcam_core::Map;
use image::RgbImage;

use crate::fold::{Mean, Summary, Tally};
use crate::{Result, Task};

fn mean(m: &Mean) -> String {
    if m.count == 0 {
        "–".into()
    } else {
        format!("{:.3} (n={})", m.mean, m.count)
    }
}

/// One Markdown table: a row per metric measured, a column for all cases and one per group.
pub fn markdown(s: &Summary) -> String {
    let mut cols: Vec<(&str, &Tally)> = vec![("all", &s.overall)];
    if s.groups.len() > 1 {
        cols.extend(s.groups.iter().map(|(k, v)| (k.as_str(), v)));
    }
    let mut out = String::new();
    let _ = writeln!(out, "| {} ({}, {} images, {} cases) | {} |", s.kind, s.method, s.images, s.cases, cols.iter().map(|c| c.0).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(cols.len()));
    let mut row = |name: String, f: &dyn Fn(&Tally) -> String| {
        let _ = writeln!(out, "| {name} | {} |", cols.iter().map(|(_, t)| f(t)).collect::<Vec<_>>().join(" | "));
    };
    let p = &s.protocol;
    let has = |t: Task| s.tasks.contains(&t);
    if has(Task::Pointing) {
        row(format!("pointing game, Grad-CAM / centre ({})", p.tolerance), &|t| {
            if t.pointing.count == 0 {
                "–".into()
            } else {
                format!("{:.3} / {:.3} (n={})", t.pointing.accuracy(), t.pointing.centre_accuracy(), t.pointing.count)
            }
        });
    }
    if has(Task::Localization) {
        row(format!("localization, box at {:.0}% of max, IoU ≥ {}", p.box_threshold * 100.0, p.iou), &|t| {
            if t.localization.count == 0 {
                "–".into()
            } else {
                format!("{:.3} (n={})", t.localization.rate(), t.localization.count)
            }
        });
    }
    if has(Task::Faithfulness) {
        row(format!("faithfulness, Spearman ρ with occlusion ({0}x{0} patch, stride {1})", p.patch, p.stride), &|t| mean(&t.faithfulness));
    }
    if has(Task::Deletion) {
        row(format!("deletion AUC, lower is better ({} steps)", p.steps), &|t| mean(&t.deletion_auc));
    }
    if has(Task::Insertion) {
        row(format!("insertion AUC, higher is better ({} steps)", p.steps), &|t| mean(&t.insertion_auc));
    }
    if has(Task::Energy) {
        row("energy in box, mean inside / outside".into(), &|t| mean(&t.energy_ratio));
        row("energy in box, share of the map's mass".into(), &|t| mean(&t.energy_fraction));
    }
    if has(Task::Segmentation) {
        let seg = |f: fn(&crate::fold::Segmentation) -> f64| move |t: &Tally| if t.segmentation.count == 0 { "–".to_string() } else { format!("{:.3} (n={})", f(&t.segmentation), t.segmentation.count) };
        row(format!("segmentation mIoU, random walker from seeds (map ≥ {} / < {} of max)", s.protocol.segment.high, s.protocol.segment.low), &seg(|g| g.miou_seeded));
        row(format!("segmentation mIoU, map thresholded at {} of max", s.protocol.segment.threshold), &seg(|g| g.miou_threshold));
        row(format!("segmentation mIoU, centre box ({:.0}% of the image)", s.protocol.segment.centre_area * 100.0), &seg(|g| g.miou_centre));
    }
    if let Some(r) = &s.ranked {
        let _ = writeln!(out);
        let _ = writeln!(out, "| per image ({} images) | |", r.images);
        let _ = writeln!(out, "|---|---|");
        let _ = writeln!(out, "| classification error, top-1 / top-5 | {:.3} / {:.3} |", r.top1_cls_error, r.top5_cls_error);
        if has(Task::Localization) {
            let _ = writeln!(out, "| localization error, top-1 / top-5 | {:.3} / {:.3} |", r.top1_loc_error, r.top5_loc_error);
        }
        if has(Task::Pointing) {
            let _ = writeln!(
                out,
                "| pointing recall over the top 5 (reject below {} of the strongest peak), Grad-CAM / centre | {:.3} / {:.3} (n={}) |",
                p.reject_below,
                r.pointing_recall.accuracy(),
                r.pointing_recall.centre_accuracy(),
                r.pointing_recall.count
            );
        }
    }
    out
}

/// One badly predicted image for the failure page.
pub struct Failure {
    pub name: String,
    pub summary: String,
    pub quality: f64,
    pub image: RgbImage,
    /// Each case's label with its raw map.
    pub maps: Vec<(String, Map)>,
}

/// Keeps `(quality, example index)` among the `k` worst of `worst` (sorted, lowest quality
/// first, ties by index): the failure page's choice made as a run goes, in memory of `k`.
pub fn keep_worst(worst: &mut Vec<(f64, usize)>, candidate: (f64, usize), k: usize) {
    let at = worst.partition_point(|w| w.0.total_cmp(&candidate.0).then(w.1.cmp(&candidate.1)).is_lt());
    if at < k {
        worst.insert(at, candidate);
        worst.truncate(k);
    }
}

/// The examples `chosen` (`(quality, example index)`, from [`keep_worst`]), each with its maps by
/// `method`, for [`write_failures`].
/// With `segment`, each case's seeded segmentation follows its map (drawn as a map that is 1
/// inside the segment).
pub fn worst<S: crate::Subject>(subject: &S, chosen: &[(f64, usize)], method: &dyn gradcam_core::Explainer, segment: Option<&crate::segment::SegmentOptions>) -> Result<Vec<Failure>> {
    chosen
        .iter()
        .map(|&(quality, i)| {
            let ex = subject.example(i)?;
            let maps = subject.maps(&ex, method)?;
            let (h, w) = (ex.image.height() as usize, ex.image.width() as usize);
            let mut pictures = Vec::new();
            for (c, m) in ex.cases.iter().zip(maps) {
                if let (Some(o), false) = (segment, c.objects.is_empty()) {
                    let up = m.resize_bilinear(h, w);
                    let seg = crate::segment::random_walker(&ex.image, &crate::segment::seeds(&up, o), o.beta, o.max_side);
                    pictures.push((c.label.clone(), m));
                    pictures.push((format!("{}: seeded segmentation", c.label), Map::new(h, w, seg.iter().map(|&v| v as u8 as f32).collect())));
                } else {
                    pictures.push((c.label.clone(), m));
                }
            }
            let maps = pictures;
            Ok(Failure { name: ex.name, summary: ex.summary, quality, image: ex.image, maps })
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// What the failure page says of one example: its name, summary and quality, and the label of
/// each of its pictures (`NNN_K.png`, after `NNN_image.png`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PageEntry {
    pub name: String,
    pub summary: String,
    pub quality: crate::fold::Exact<f64>,
    pub labels: Vec<String>,
}

impl Failure {
    pub fn entry(&self) -> PageEntry {
        PageEntry { name: self.name.clone(), summary: self.summary.clone(), quality: crate::fold::Exact(self.quality), labels: self.maps.iter().map(|m| m.0.clone()).collect() }
    }
}

/// The failure page, `index.html`, showing `entries` (the `i`-th one's pictures are
/// `{i:03}_image.png` and `{i:03}_{k}.png`).
pub fn page_html(title: &str, entries: &[PageEntry]) -> String {
    let mut html = format!(
        "<!doctype html>\n<meta charset=\"utf-8\">\n<title>{0}</title>\n<style>body{{font-family:sans-serif}} figure{{display:inline-block;margin:4px;text-align:center}} img{{width:192px;image-rendering:pixelated}} figcaption{{max-width:192px;font-size:12px}}</style>\n<h1>{0}</h1>\n",
        escape(title)
    );
    for (i, f) in entries.iter().enumerate() {
        let _ = write!(html, "<section><h2>{}. {} (quality {:.3})</h2><p>{}</p>\n", i + 1, escape(&f.name), f.quality.0, escape(&f.summary));
        let _ = write!(html, "<figure><img src=\"{i:03}_image.png\"><figcaption>image</figcaption></figure>");
        for (k, label) in f.labels.iter().enumerate() {
            let _ = write!(html, "<figure><img src=\"{i:03}_{k}.png\"><figcaption>{}</figcaption></figure>", escape(label));
        }
        html.push_str("</section>\n");
    }
    html
}

/// Writes `dir/index.html` and the overlays it shows (`dir/NNN_K.png`), every file through a
/// temporary name so that nothing is left half-written.
pub fn write_failures(dir: &Path, failures: &[Failure], title: &str) -> Result<()> {
    gradcam_io::create_dir_all(dir)?;
    for (i, f) in failures.iter().enumerate() {
        write_png_atomic(&f.image, &dir.join(format!("{i:03}_image.png")))?;
        let region = Region { x: 0, y: 0, width: f.image.width(), height: f.image.height() };
        for (k, (_, map)) in f.maps.iter().enumerate() {
            write_png_atomic(&overlay(&f.image, &map.normalized().0, region), &dir.join(format!("{i:03}_{k}.png")))?;
        }
    }
    let entries: Vec<PageEntry> = failures.iter().map(Failure::entry).collect();
    Ok(gradcam_io::write_atomic(&dir.join("index.html"), page_html(title, &entries).as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_are_kept_as_a_full_sort_would_pick_them() {
        let qualities: Vec<(f64, usize)> = (0..50).map(|i| (((i * 7919) % 13) as f64 / 4.0, i)).collect();
        for k in [0, 1, 3, 10, 60] {
            let mut kept = Vec::new();
            qualities.iter().for_each(|&q| keep_worst(&mut kept, q, k));
            let mut all = qualities.clone();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            all.truncate(k);
            assert_eq!(kept, all, "k = {k}");
        }
    }
}
