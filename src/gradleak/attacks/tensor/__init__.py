"""The moment-tensor attack of Wang, Lee & Lei (AISTATS 2023): a whole batch from ONE gradient of a random
two-layer network, by tensor decomposition.

Paper: Zihan Wang, Jason D. Lee, Qi Lei. "Reconstructing Training Data from Model Gradient, Provably."
AISTATS 2023 (arXiv 2212.03714). The paper's body was not available to us; this is our derivation of the
approach (ALGORITHMS.md section 4), checked numerically. Setting and assumptions:

- f_k(x) = sum_j a_kj sigma(w_j^T x) on the flattened, normalised input; rows w_j ~ N(0, s^2 I) i.i.d. (known,
  random: NOT trained - Stein's identity needs Gaussian weights, and the attack checks it); a known.
- one FedSGD gradient (or one FedAvg update of a single full-batch local step); B <= d.
- What the gradient identifies: directions x_i/|x_i| always (mu_3 or mu_4 != 0); signs unless sigma is odd;
  norms unless sigma is positively homogeneous (ReLU family). What it cannot identify is fixed from the loss
  residual (known or recovered labels; exactly with a mirrored initialisation), a Gaussian first-layer bias, or
  a stated prior (image pixels in the value range); ``info['samples']`` says which, per sample.

Algorithm (``_reconstruct``):
1. Span: the top-B right singular vectors U of the first-layer gradient (randomised SVD, never a d x d matrix);
   the singular-value gap gives an estimate of B (reported; the case's batch size is used unless
   ``batch_size='gap'``), the values beyond B the noise floor (numerical rank).
2. Project: z_j = U^T w_j / s, y_j = U^T g^W_j s / a_j (K classes: weighted by a random class combination);
   the order-p Hermite moment tensor T = (1/m) sum_j y_j (x) He_{p-1}(z_j) is kept implicit (contractions
   O(m B^2)); p = 3 or 4 from mu_p. With K > B classes the class space is first rotated onto the B directions
   the output-layer gradient spans (lossless).
3. Jennrich on two random slices, several draws, each polished by CP-ALS on the implicit tensor.
4. Fit the raw gradient (both layers) from every draw: ReLU family - activation-pattern alternating least
   squares in the rank-one form rho_i (x) c_i with greedy sign flips, then patterns snapped from the observed
   gradient (exact for a noise-free gradient); smooth activations - alternating slope-fixed least squares with
   per-sample norm profiles, then Levenberg-Marquardt (variable projection of the residuals), then late sign
   flips. The draw whose fit to the observed gradient is best wins (stop early at ``fit_tol`` or when two draws
   agree).
5. Norms, signs and labels: a Hungarian assignment of the (known) label multiset to the recovered samples by
   the loss-residual misfit; ties between admissible inputs are broken by the stated prior; optional
   gradient-matching refinement (L-BFGS on the full model).

For deep networks, :func:`recover_head_features` applies the same steps to a wide random two-layer head on top
of a body, and :func:`feature_matching_term` turns the recovered features into a regulariser
1 - cos^2(phi(x), z_hat) for ``inverting-gradients`` (``regularizers=(term,)``), as in Liu, Wang, Chen, Lei
2024 ("Data Reconstruction Attacks and Defenses: A Systematic Evaluation").
Package layout (one idea per module; imports run one way, down this list):

- ``moments``: Hermite forms, the implicit moment tensor, Jennrich, CP-ALS (no model involved).
- ``hermite``: the Hermite coefficients mu_p and symmetries of an Activation (the one way to get mu_p).
- ``view``: where the two-layer part of a model lives (:func:`find_two_layer`), the observed gradient.
- ``weights``: the Gaussian-weights checks.
- ``options``: :class:`TensorOptions` and their validation.
- ``span``: the gradient's span and the problem projected onto it (:class:`SpanProblem`).
- ``fit_patterns`` / ``fit_smooth``: fitting the raw gradient (ReLU family / smooth activations).
- ``solver``: the decomposition driver over draws (:func:`solve`).
- ``samples``: norms, signs and labels.
- ``pipeline``: span + projection + checks + solver, shared by the attack and the feature recovery.
- ``attack``: :class:`TensorAttack` and :func:`recover_directions`.
- ``head``: deep networks: :func:`recover_head_features`, :func:`feature_matching_term`.
"""

from .attack import TensorAttack, prepare_run, recover_directions
from .head import HeadFeatures, feature_matching_term, recover_head_features
from .hermite import activation_properties, hermite_coefficients, hermite_order
from .moments import MomentTensor, cp_als_polish, cp_objective, direction_error, jennrich
from .options import TensorOptions
from .solver import Solution, solve
from .span import SpanProblem
from .view import TwoLayerView, find_two_layer
from .weights import normality_problem, weight_normality

__all__ = ["TensorAttack", "TensorOptions", "TwoLayerView", "find_two_layer", "recover_directions",
           "recover_head_features", "HeadFeatures", "feature_matching_term", "weight_normality",
           "normality_problem", "SpanProblem", "Solution", "solve", "hermite_coefficients", "hermite_order",
           "activation_properties", "MomentTensor", "jennrich", "cp_als_polish", "cp_objective", "direction_error",
           "prepare_run"]
