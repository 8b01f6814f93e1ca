"""xentkit: exact, fast softmax and cross-entropy losses with their gradients.

Layers, one way down: ``xentkit.reference`` (the NumPy oracle) → ``xentkit.kernels`` (fused
Numba kernels, compiled on first use) → the functions here → ``xentkit.torch`` (PyTorch losses,
imported on demand) → ``xentkit.lab`` and the ``xentkit`` command line.
"""

from . import _tbb

_tbb.preload()  # (before anything can start Numba's threads: see xentkit._tbb)

from .api import (  # noqa: E402
    ProbabilitiesAsLogitsWarning,
    binary_cross_entropy,
    binary_cross_entropy_and_grad,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_and_grad,
    cross_entropy,
    cross_entropy_and_grad,
    entropy,
    entropy_and_grad,
    kl_divergence,
    kl_divergence_and_grad,
    log_probs,
    log_probs_backward,
    log_sigmoid,
    log_softmax,
    log_softmax_backward,
    logsumexp,
    nll_loss,
    nll_loss_and_grad,
    perplexity,
    quadratic_cost,
    quadratic_cost_and_grad,
    reference_enabled,
    sigmoid,
    softmax,
    softmax_backward,
    use_reference,
)

__version__ = "0.1.0"

__all__ = [
    "ProbabilitiesAsLogitsWarning",
    "__version__",
    "binary_cross_entropy",
    "binary_cross_entropy_and_grad",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_and_grad",
    "cross_entropy",
    "cross_entropy_and_grad",
    "entropy",
    "entropy_and_grad",
    "kl_divergence",
    "kl_divergence_and_grad",
    "log_probs",
    "log_probs_backward",
    "log_sigmoid",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "nll_loss",
    "nll_loss_and_grad",
    "perplexity",
    "quadratic_cost",
    "quadratic_cost_and_grad",
    "reference_enabled",
    "sigmoid",
    "softmax",
    "softmax_backward",
    "use_reference",
]
