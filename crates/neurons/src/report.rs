//! The textual explanation of one decision: the units with the 5 largest and the 5 smallest
//! alpha_k, named, and a sentence.

use serde::Serialize;

use crate::Dissection;

/// Where unit names come from.
pub enum UnitNames<'a> {
    /// Network dissection against concept masks: names with IoUs.
    Dissection(&'a Dissection),
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
            UnitNames::Dissection(d) => match d.name(unit) {
                Some((c, iou)) => (Some(c.to_string()), Some(iou)),
                None => (None, None),
            },
            UnitNames::Classes(f) => (f(unit), None),
            UnitNames::None => (None, None),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Neuron {
    pub unit: usize,
    pub alpha: f32,
    pub name: Option<String>,
    pub iou: Option<f32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NeuronReport {
    /// The units with the largest alpha_k, largest first.
    pub top: Vec<Neuron>,
    /// The units with the smallest alpha_k, smallest first.
    pub bottom: Vec<Neuron>,
    /// `dissection`, `classifier-weights` or `none`.
    pub names: &'static str,
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
