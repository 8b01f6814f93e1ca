"""The NumPy oracle: every formula of xentkit written for clarity, with its gradient.

Slow is fine here; wrong is not. Everything else in xentkit is tested against these functions.
They assume validated input (the public api in :mod:`xentkit` checks it).
"""

from .activations import (
    log_sigmoid,
    log_softmax,
    log_softmax_backward,
    logsumexp,
    sigmoid,
    softmax,
    softmax_backward,
)
from .cross_entropy import cross_entropy_and_grad
from .log_probs import log_probs_and_entropy, log_probs_backward
from .losses import (
    binary_cross_entropy_and_grad,
    binary_cross_entropy_with_logits_and_grad,
    entropy_and_grad,
    kl_divergence_and_grad,
    nll_loss_and_grad,
    quadratic_cost_and_grad,
)

__all__ = [
    "binary_cross_entropy_and_grad",
    "binary_cross_entropy_with_logits_and_grad",
    "cross_entropy_and_grad",
    "entropy_and_grad",
    "kl_divergence_and_grad",
    "log_probs_and_entropy",
    "log_probs_backward",
    "log_sigmoid",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "nll_loss_and_grad",
    "quadratic_cost_and_grad",
    "sigmoid",
    "softmax",
    "softmax_backward",
]
