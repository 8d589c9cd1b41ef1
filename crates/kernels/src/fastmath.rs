//! exp and erfc in f32 arithmetic only (no libm call), so that the loops over a transformer's
//! activations (GELU, softmax) vectorise: Cephes' `expf` (range reduction by ln 2, a degree-6
//! polynomial, relative error about 1e-7) and Numerical Recipes' `erfcc` on it.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x (0 below -87.3, saturated above 88.7).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by the 1.5 * 2^23 trick (no libm `round`).
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// erfc(x), fractional error below about 2e-7 (Numerical Recipes 6.2's Chebyshev fit).
#[inline(always)]
pub(crate) fn erfc(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7 + t * (0.374_091_96 + t * (0.096_784_18 + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_203_98 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * exp(poly);
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_and_erfc_are_within_their_error_bounds() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.04;
            let (ours, std) = (super::exp(x), x.exp());
            assert!((ours - std).abs() <= 3e-7 * std, "exp({x}) = {ours}, std {std}");
        }
        // erfc against a long series at a few points (erf(x) = 2/sqrt(pi) sum (-1)^n x^(2n+1) / (n! (2n+1))).
        for &x in &[-2.5f64, -1.0, -0.3, 0.0, 0.2, 0.9, 1.7, 3.0] {
            let mut erf = 0f64;
            let mut term = x;
            for n in 0..200 {
                erf += term / (2 * n + 1) as f64;
                term *= -x * x / (n + 1) as f64;
            }
            let erfc = 1.0 - erf * 2.0 / std::f64::consts::PI.sqrt();
            let ours = super::erfc(x as f32) as f64;
            assert!((ours - erfc).abs() <= 3e-7 * erfc.max(1e-3), "erfc({x}) = {ours}, series {erfc}");
        }
    }
}
