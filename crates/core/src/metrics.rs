//! Tallies for the paper's evaluations.

/// Pointing game (Zhang et al., as in the paper's section 4.3): how often the map's peak hits the
/// target object, beside the centre-point baseline.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Pointing {
    pub count: usize,
    pub hits: usize,
    pub centre_hits: usize,
}

impl Pointing {
    pub fn add(&mut self, hit: bool, centre_hit: bool) {
        self.count += 1;
        self.hits += hit as usize;
        self.centre_hits += centre_hit as usize;
    }

    pub fn accuracy(&self) -> f64 {
        self.hits as f64 / self.count.max(1) as f64
    }

    pub fn centre_accuracy(&self) -> f64 {
        self.centre_hits as f64 / self.count.max(1) as f64
    }
}
