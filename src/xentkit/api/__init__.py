"""The public NumPy functions: validate input, lay out the class axis, run kernel or reference."""

from ._config import reference_enabled, use_reference
from .activations import (
    log_sigmoid,
    log_softmax,
    log_softmax_backward,
    logsumexp,
    sigmoid,
    softmax,
    softmax_backward,
)
from .cross_entropy import (
    ProbabilitiesAsLogitsWarning,
    cross_entropy,
    cross_entropy_and_grad,
    perplexity,
)
from .log_probs import log_probs, log_probs_backward
from .losses import (
    binary_cross_entropy,
    binary_cross_entropy_and_grad,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_and_grad,
    entropy,
    entropy_and_grad,
    kl_divergence,
    kl_divergence_and_grad,
    nll_loss,
    nll_loss_and_grad,
    quadratic_cost,
    quadratic_cost_and_grad,
)

__all__ = [
    "ProbabilitiesAsLogitsWarning",
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
