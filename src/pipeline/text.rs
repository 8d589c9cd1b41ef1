//! The records as text (what `gradcam classify`, `caption`, `vqa` and `attack` print without
//! `--json`): a header line, then a line per prediction, word or answer and per map (with its
//! neuron report, when there is one).

use std::fmt::{Display, Formatter, Result};

use gradcam_eval::attack::Goal;

use super::{attack, caption, classify, matching, vqa, MapRecord};

/// A map's lines: `  {kind} {subject}: {overlay}{note}`, then its neuron report.
fn map_lines(f: &mut Formatter<'_>, map: &MapRecord, subject: &str, note: &str, indent: &str) -> Result {
    writeln!(f, "  {} {subject}: {}{note}", map.kind(), map.overlay)?;
    match &map.text {
        Some(text) => writeln!(f, "{indent}{text}"),
        None => Ok(()),
    }
}

impl Display for classify::Record {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        writeln!(f, "{} ({}, layer {}, input {}x{})", self.image, self.model, self.layer, self.input_size[1], self.input_size[0])?;
        for (i, p) in self.predictions.iter().enumerate() {
            writeln!(f, "  {}. {:>4} {:<30} logit {:>7.3}  p {:.4}", i + 1, p.class, p.label.escape_debug().to_string(), p.logit, p.prob)?;
        }
        for e in &self.explanations {
            let note = if e.map.nonzero { "" } else { " (map is zero everywhere: nothing in this layer supports it)" };
            map_lines(f, &e.map, &format!("{} {}", e.class, e.label.escape_debug()), note, "    ")?;
        }
        Ok(())
    }
}

impl Display for caption::Record {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        writeln!(f, "{}: {}", self.image, self.caption.escape_debug())?;
        for w in &self.words {
            writeln!(f, "  {:>2} {:<10} log p {:>7.3}  {}", w.t, w.word.escape_debug().to_string(), w.logprob, w.map.overlay)?;
            if let Some(text) = &w.map.text {
                writeln!(f, "     {text}")?;
            }
        }
        writeln!(f, "  strip: {}", self.strip)
    }
}

impl Display for vqa::Record {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        writeln!(f, "{}: {}", self.image, self.question.escape_debug())?;
        if !self.unknown_words.is_empty() {
            writeln!(f, "  note: unknown words read as <unk>: {}", self.unknown_words.join(", ").escape_debug())?;
        }
        if self.truncated {
            writeln!(f, "  note: the question was cut to the model's maximum length")?;
        }
        for a in &self.answers {
            writeln!(f, "  {:<16} p {:.4}", a.answer.escape_debug().to_string(), a.prob)?;
        }
        self.explanations.iter().try_for_each(|e| map_lines(f, &e.map, &format!("{:?}", e.answer), "", "    "))
    }
}

impl Display for attack::Record {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        let what = match self.goal {
            Goal::Untargeted { until, .. } => format!("untargeted, until p < {until}"),
            Goal::Targeted { target, until, .. } => format!("targeted at {target}, until p > {until}"),
        };
        let (label, outcome) = (self.original_label.escape_debug(), if self.success { "succeeded" } else { "FAILED" });
        writeln!(f, "{}: attacked {} {label} ({what}): {outcome} after {} steps; L-inf {:.4} ({:.1}/255), L2 {:.3}", self.image, self.original_class, self.steps, self.linf, self.linf * 255.0, self.l2)?;
        for (name, list) in [("before", &self.before), ("after", &self.after)] {
            let items: Vec<String> = list.iter().map(|c| format!("{} {} {:.4}", c.class, c.label.escape_debug(), c.prob)).collect();
            writeln!(f, "  {name}: {}", items.join(", "))?;
        }
        let p = |v: &[classify::ClassMap]| v.first().map(|e| e.map.overlay.clone()).unwrap_or_default();
        writeln!(f, "  adversarial image: {}", self.adversarial)?;
        writeln!(f, "  Grad-CAM for {label} on it: {} (clean: {}); strip {}", p(&self.explanations), p(&self.clean_explanations), self.strip)
    }
}

impl Display for matching::Record {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        writeln!(f, "{} (layer {})", self.image, self.layer)?;
        for t in &self.texts {
            let p = t.probability.map(|p| format!("  p {p:.4}")).unwrap_or_default();
            writeln!(f, "  {:<32} similarity {:>7.4}{p}", format!("{:?}", t.text), t.similarity)?;
            if t.truncated {
                writeln!(f, "    note: cut to the model's context length")?;
            }
            if !t.unknown_words.is_empty() {
                writeln!(f, "    note: unknown words read as <unk>: {}", t.unknown_words.join(", ").escape_debug())?;
            }
            for e in &t.explanations {
                let note = if e.nonzero { "" } else { " (map is zero everywhere)" };
                map_lines(f, e, &format!("{:?}", t.text), note, "    ")?;
            }
        }
        Ok(())
    }
}
