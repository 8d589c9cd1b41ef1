//! [`Method`]: every CAM method by name, the one dispatcher that the CLI, the examples and the
//! library share.

use std::fmt;
use std::str::FromStr;

use crate::cam::Explainer;
use crate::guided::Guided;
use crate::methods::{AugSmooth, EigenCam, EigenSmooth, GradCamPlusPlus, HiResCam, LayerCam, XGradCam};
use crate::perturbation::{AblationCam, ScoreCam};
use crate::{CamMethod, Error, GradCam, Result};

/// A way of explaining a target, named as pytorch-grad-cam names it.
///
/// The gradient-based methods turn (A, dy/dA) into a map ([`Method::cam_method`]); Ablation-CAM
/// and Score-CAM perturb the activations or the input and run the model again; the guided methods
/// also give an image at the input's resolution (Guided Backpropagation, and its product with the
/// Grad-CAM map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Method {
    /// Grad-CAM (Selvaraju et al.): alpha_k is the spatial mean of dy/dA^k.
    #[default]
    GradCam,
    /// Grad-CAM++ (Chattopadhay et al. 2018).
    GradCamPlusPlus,
    /// HiResCAM (Draelos & Carin 2020): element-wise gradient times activation.
    HiResCam,
    /// XGrad-CAM (Fu et al. 2020).
    XGradCam,
    /// LayerCAM (Jiang et al. 2021).
    LayerCam,
    /// EigenCAM (Muhammad & Yeasin 2020): first principal component of the activations, no
    /// gradient.
    EigenCam,
    /// Ablation-CAM (Desai & Ramaswamy 2020): the score's drop when each channel is ablated.
    AblationCam,
    /// Score-CAM (Wang et al. 2020): the score of the input masked by each channel's map (one
    /// forward pass per channel).
    ScoreCam,
    /// Guided Backpropagation (Springenberg et al. 2015): the input gradient through ReLUs that
    /// pass only positive gradients. Its map is Grad-CAM's.
    GuidedBackprop,
    /// Guided Grad-CAM (the paper's section 3.2): Guided Backpropagation times the upsampled
    /// Grad-CAM map.
    GuidedGradCam,
    /// Attention rollout (Abnar & Zuidema 2020), transformers only: the product over blocks of
    /// (I + the heads' mean attention) / 2, read from the class token's row.
    Rollout,
    /// Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021), transformers only:
    /// R += mean_heads(relu(dA * A)) @ R over the blocks, the class token's row.
    Relevance,
}

impl Method {
    /// The methods of a transformer's attention ([`crate::Explainable::attention`]).
    pub const TRANSFORMER: [Method; 2] = [Method::Rollout, Method::Relevance];

    /// Every method that explains any layer (CNN or transformer), in the order the CLI lists
    /// them; the transformers' own are [`Method::TRANSFORMER`].
    pub const ALL: [Method; 10] = [
        Method::GradCam,
        Method::GradCamPlusPlus,
        Method::HiResCam,
        Method::XGradCam,
        Method::LayerCam,
        Method::EigenCam,
        Method::AblationCam,
        Method::ScoreCam,
        Method::GuidedBackprop,
        Method::GuidedGradCam,
    ];

    /// The name the CLI takes and `--json` reports (`gradcam`, `gradcam++`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Method::GradCam => "gradcam",
            Method::GradCamPlusPlus => "gradcam++",
            Method::HiResCam => "hirescam",
            Method::XGradCam => "xgradcam",
            Method::LayerCam => "layercam",
            Method::EigenCam => "eigencam",
            Method::AblationCam => "ablationcam",
            Method::ScoreCam => "scorecam",
            Method::GuidedBackprop => "guided-backprop",
            Method::GuidedGradCam => "guided-gradcam",
            Method::Rollout => "rollout",
            Method::Relevance => "relevance",
        }
    }

    /// The part of an output file name that tells the method apart (empty for Grad-CAM):
    /// `_gradcampp`, `_scorecam`, ...
    pub fn file_tag(self) -> String {
        match self {
            Method::GradCam => String::new(),
            m => format!("_{}", m.name().replace("++", "pp")),
        }
    }

    /// Whether the method gives a Guided Backpropagation image as well as a map.
    pub fn is_guided(self) -> bool {
        matches!(self, Method::GuidedBackprop | Method::GuidedGradCam)
    }

    /// Whether the method perturbs and reruns the model (Ablation-CAM, Score-CAM) instead of
    /// reading one backward pass.
    pub fn is_perturbation(self) -> bool {
        matches!(self, Method::AblationCam | Method::ScoreCam)
    }

    /// Whether the method reads a transformer's attention instead of the explained layer.
    pub fn is_attention(self) -> bool {
        matches!(self, Method::Rollout | Method::Relevance)
    }

    /// The map of a method computed from (A, dy/dA) alone: the gradient-based methods, and
    /// Grad-CAM for the guided ones. `None` for Ablation-CAM and Score-CAM.
    pub fn cam_method(self) -> Option<Box<dyn CamMethod>> {
        Some(match self {
            Method::GradCam | Method::GuidedBackprop | Method::GuidedGradCam => Box::new(GradCam),
            Method::GradCamPlusPlus => Box::new(GradCamPlusPlus),
            Method::HiResCam => Box::new(HiResCam),
            Method::XGradCam => Box::new(XGradCam),
            Method::LayerCam => Box::new(LayerCam),
            Method::EigenCam => Box::new(EigenCam),
            Method::AblationCam | Method::ScoreCam | Method::Rollout | Method::Relevance => return None,
        })
    }

    /// The method as an [`Explainer`], with pytorch-grad-cam's smoothings (for the
    /// gradient-based methods and the Grad-CAM map of the guided ones; an error for the others).
    pub fn explainer(self, eigen_smooth: bool, aug_smooth: bool) -> Result<Box<dyn Explainer>> {
        let Some(mut m) = self.cam_method() else {
            if eigen_smooth || aug_smooth {
                return Err(Error::Unsupported(format!("eigen- and augmentation smoothing work with the gradient-based methods, not {self}")));
            }
            return Ok(match self {
                Method::AblationCam => Box::new(AblationCam { chunk: 128 }),
                Method::Rollout => Box::new(crate::Rollout),
                Method::Relevance => Box::new(crate::Relevance),
                _ => Box::new(ScoreCam { chunk: 2 }),
            });
        };
        if eigen_smooth {
            m = Box::new(EigenSmooth(m));
        }
        let map: Box<dyn Explainer> = if aug_smooth { Box::new(AugSmooth(m)) } else { Box::new(m) };
        Ok(match self {
            Method::GuidedBackprop | Method::GuidedGradCam => Box::new(Guided { map, product: self == Method::GuidedGradCam }),
            _ => map,
        })
    }

    /// The methods whose map comes from (A, dy/dA) alone ([`Method::cam_method`] without the
    /// guided images): those that `--eval` and the evaluations score.
    pub fn is_gradient_map(self) -> bool {
        !self.is_guided() && !self.is_perturbation() && !self.is_attention()
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown method name; its message lists the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown method {name:?}; one of {}, or for transformers {}", Method::ALL.map(Method::name).join(", "), Method::TRANSFORMER.map(Method::name).join(", "))]
pub struct UnknownMethod {
    /// The name that was given.
    pub name: String,
}

impl FromStr for Method {
    type Err = UnknownMethod;

    /// The CLI's names; `gradcampp` is taken for `gradcam++` (it is how file names spell it).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim();
        Method::ALL
            .into_iter()
            .chain(Method::TRANSFORMER)
            .find(|m| m.name() == s || (m.name().contains("++") && m.name().replace("++", "pp") == s))
            .ok_or_else(|| UnknownMethod { name: s.to_string() })
    }
}

/// A name that is not one of the gradient-based methods ([`Method::parse_gradient`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotGradientMethod {
    /// Not a method at all.
    #[error(transparent)]
    Unknown(#[from] UnknownMethod),
    /// A method whose map does not come from the gradients alone.
    #[error("{0} is not one of the gradient-based methods (gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam)")]
    NotGradient(Method),
}

impl Method {
    /// A gradient-based method by its name (for what scores maps, see [`Method::is_gradient_map`]).
    pub fn parse_gradient(s: &str) -> std::result::Result<Method, NotGradientMethod> {
        let m: Method = s.parse()?;
        if m.is_gradient_map() { Ok(m) } else { Err(NotGradientMethod::NotGradient(m)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gradient_methods_score_maps() {
        assert_eq!(Method::parse_gradient("hirescam"), Ok(Method::HiResCam));
        assert_eq!(Method::parse_gradient("scorecam"), Err(NotGradientMethod::NotGradient(Method::ScoreCam)));
        assert!(matches!(Method::parse_gradient("magic"), Err(NotGradientMethod::Unknown(_))));
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>(), Ok(m));
            assert_eq!(m.to_string(), m.name());
        }
        assert_eq!("gradcampp".parse::<Method>(), Ok(Method::GradCamPlusPlus));
        let err = "gradcam+".parse::<Method>().unwrap_err();
        assert!(err.to_string().contains("guided-gradcam"), "{err}");
    }
}
