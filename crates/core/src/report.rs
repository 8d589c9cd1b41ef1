//! The textual explanation of one decision: the units with the 5 largest and the 5 smallest
//! alpha_k, named, and a sentence.

use serde::Serialize;

/// A table of unit names with a score each, such as network dissection's (`gradcam_neurons::
/// Dissection`): the concept whose masks a unit's activations overlap best, with that IoU.
pub trait UnitTable {
    /// The unit's name and its IoU, or `None` when it is unnamed.
    fn unit_name(&self, unit: usize) -> Option<(&str, f32)>;
}

/// Where unit names come from.
pub enum UnitNames<'a> {
    /// Network dissection against concept masks: names with IoUs.
    Dissection(&'a dyn UnitTable),
    /// For classifiers without concept masks: each unit's name lists the classes it most
    /// supports through the classifier (`classes_of(unit)`), with no IoU.
    Classes(&'a dyn Fn(usize) -> Option<String>),
    /// No names.
    None,
}

impl UnitNames<'_> {
    /// What kind of names these are, for the JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            UnitNames::Dissection(_) => "dissection",
            UnitNames::Classes(_) => "classifier-weights",
            UnitNames::None => "none",
        }
    }

    fn name(&self, unit: usize) -> (Option<String>, Option<f32>) {
        match self {
            UnitNames::Dissection(d) => match d.unit_name(unit) {
                Some((c, iou)) => (Some(c.to_string()), Some(iou)),
                None => (None, None),
            },
            UnitNames::Classes(f) => (f(unit), None),
            UnitNames::None => (None, None),
        }
    }
}

/// One reported unit of the explained layer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Neuron {
    /// The unit's (channel's) index k.
    pub unit: usize,
    /// Its importance weight alpha_k in the explanation.
    pub alpha: f32,
    /// Its name, when the names know one.
    pub name: Option<String>,
    /// The IoU behind a dissection name.
    pub iou: Option<f32>,
}

/// The textual explanation of one decision (the paper's section 7).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NeuronReport {
    /// The units with the largest alpha_k, largest first.
    pub top: Vec<Neuron>,
    /// The units with the smallest alpha_k, smallest first.
    pub bottom: Vec<Neuron>,
    /// `dissection`, `classifier-weights` or `none`.
    pub names: &'static str,
    /// The sentence: which named units support the subject and which argue against it.
    pub text: String,
}

impl NeuronReport {
    /// Whether `concept` names one of the top (or, with `bottom`, bottom) units.
    pub fn mentions(&self, concept: &str, bottom: bool) -> bool {
        let list = if bottom { &self.bottom } else { &self.top };
        list.iter().any(|n| n.name.as_deref() == Some(concept))
    }
}

/// The report for the weights `alpha` (one per unit) of an explanation of `subject` (a class, a
/// word, an answer), naming `n` units each way.
pub fn report(alpha: &[f32], names: &UnitNames, subject: &str, n: usize) -> NeuronReport {
    let mut order: Vec<usize> = (0..alpha.len()).collect();
    // Largest first; ties by unit index so that the report is deterministic.
    order.sort_by(|&a, &b| alpha[b].total_cmp(&alpha[a]).then(a.cmp(&b)));
    let neuron = |u: usize| {
        let (name, iou) = names.name(u);
        Neuron { unit: u, alpha: alpha[u], name, iou }
    };
    let top: Vec<Neuron> = order.iter().take(n).map(|&u| neuron(u)).collect();
    let bottom: Vec<Neuron> = order.iter().rev().take(n.min(alpha.len() - top.len())).map(|&u| neuron(u)).collect();
    let describe = |list: &[Neuron]| -> String {
        list.iter()
            .map(|nr| {
                let what = match (&nr.name, nr.iou) {
                    (Some(name), Some(iou)) => format!("{name}, IoU {iou:.2}"),
                    (Some(name), None) => name.clone(),
                    (None, _) => "unnamed".to_string(),
                };
                format!("unit {} ({what}, alpha {:+.3e})", nr.unit, nr.alpha)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The sentence names only units that really push each way.
    let support: Vec<Neuron> = top.iter().filter(|n| n.alpha > 0.0).cloned().collect();
    let against: Vec<Neuron> = bottom.iter().filter(|n| n.alpha < 0.0).cloned().collect();
    let text = match (support.is_empty(), against.is_empty()) {
        (true, true) => format!("\"{subject}\": no unit of the layer pushes either way"),
        (false, true) => format!("\"{subject}\" is supported by {}; no unit argues against it", describe(&support)),
        (true, false) => format!("no unit supports \"{subject}\"; most against it: {}", describe(&against)),
        (false, false) => format!("\"{subject}\" is supported by {}; most against it: {}", describe(&support), describe(&against)),
    };
    NeuronReport { top, bottom, names: names.kind(), text }
}

/// The report of a classifier's explanation, each reported unit named by the 3 classes whose
/// scores rise most when only that unit is on (1.0 at every position) rather than all units off:
/// for a global-average-pool + linear head these are exactly the unit's largest classifier
/// weights. `activations` (`[1, K, h, w]`, or the model's [`crate::Explainable::layout`]) give the probe's shape and what else the head reads; `class_name` names a class.
pub fn class_named_report<M: crate::Explainable + ?Sized>(
    model: &M,
    activations: &candle_core::Tensor,
    alpha: &[f32],
    subject: &str,
    class_name: &dyn Fn(usize) -> String,
) -> crate::Result<NeuronReport> {
    let plain = report(alpha, &UnitNames::None, subject, 5);
    let units: Vec<usize> = plain.top.iter().chain(&plain.bottom).map(|n| n.unit).collect();
    let layout = model.layout();
    let (_, k, h, w) = layout.dims(activations)?;
    let mut probe = vec![0f32; (units.len() + 1) * k * h * w];
    for (i, &u) in units.iter().enumerate() {
        let start = ((i + 1) * k + u) * h * w;
        probe[start..start + h * w].fill(1.0);
    }
    let probe = candle_core::Tensor::from_vec(probe, (units.len() + 1, k, h, w), activations.device())?;
    let scores = model.head(&layout.ungrid(&probe, &activations.narrow(0, 0, 1)?)?)?.flatten_from(1)?.to_vec2::<f32>()?; // row 0: all units off
    let mut names = std::collections::HashMap::new();
    for (i, &u) in units.iter().enumerate() {
        let rise: Vec<f32> = scores[i + 1].iter().zip(&scores[0]).map(|(a, b)| a - b).collect();
        let mut order: Vec<usize> = (0..rise.len()).collect();
        order.sort_by(|&a, &b| rise[b].total_cmp(&rise[a]));
        let classes: Vec<String> = order.iter().take(3).map(|&c| class_name(c)).collect();
        names.insert(u, format!("raises {}", classes.join(" / ")));
    }
    let lookup = |u: usize| names.get(&u).cloned();
    Ok(report(alpha, &UnitNames::Classes(&lookup), subject, 5))
}
