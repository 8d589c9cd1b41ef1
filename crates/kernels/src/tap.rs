//! A gradient tap: the identity, whose backward keeps the gradient that reaches it. candle's
//! backward keeps gradients for variables only; a tap on an intermediate value (a transformer's
//! attention probabilities) reads its total derivative without cutting the graph there.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// The identity on `x`, whose backward stores the gradient it passes in the returned slot.
pub fn tap(x: &Tensor) -> candle_core::Result<(Tensor, Arc<Mutex<Option<Tensor>>>)> {
    let slot = Arc::new(Mutex::new(None));
    let y = x.contiguous()?.apply_op1(Tap(slot.clone()))?;
    Ok((y, slot))
}

struct Tap(Arc<Mutex<Option<Tensor>>>);

impl CustomOp1 for Tap {
    fn name(&self) -> &'static str {
        "gradient-tap"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else { return Err(candle_core::Error::Msg("gradient tap on a non-contiguous tensor".into())) };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            _ => return Err(candle_core::Error::Msg("gradient tap on a non-f32 tensor".into())),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(match slot.take() {
            Some(g) => (g + grad_res)?,
            None => grad_res.clone(),
        });
        Ok(Some(grad_res.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn a_tap_reads_the_total_derivative_and_passes_it_on() {
        let x = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let a = (x.as_tensor() * 2.0).unwrap();
        let (t, slot) = super::tap(&a).unwrap();
        // y = sum(t^2) + sum(3 t): dy/dt = 2t + 3 (two paths), dy/dx = 2 dy/dt.
        let y = (t.sqr().unwrap().sum_all().unwrap() + (&t * 3.0).unwrap().sum_all().unwrap()).unwrap();
        let grads = y.backward().unwrap();
        let dt = slot.lock().unwrap().clone().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dt, [7.0, 11.0, 15.0]);
        assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), [14.0, 22.0, 30.0]);
        assert_eq!(t.to_vec1::<f32>().unwrap(), [2.0, 4.0, 6.0]);
    }
}
