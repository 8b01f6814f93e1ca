"""PyTorch losses on xentkit's fused kernels: swap ``torch.nn.functional`` / ``torch.nn`` for these.

>>> import xentkit.torch as xt          # instead of torch.nn.functional / torch.nn
>>> criterion = xt.CrossEntropyLoss()   # same arguments, same numbers, plus z_loss and softcap

Importing this module imports torch; ``import xentkit`` alone does not.
"""

from . import _requires_torch  # noqa: F401  (first: a missing torch is one clear line)
from .distributed import (
    CommunicationStats,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_log_probs,
    vocab_shard_range,
)
from .functional import binary_cross_entropy_with_logits, cross_entropy, nll_loss
from .linear_cross_entropy import linear_cross_entropy
from .log_probs import linear_log_probs, log_probs
from .modules import BCEWithLogitsLoss, CrossEntropyLoss, LinearCrossEntropyLoss, NLLLoss

__all__ = [
    "BCEWithLogitsLoss",
    "CommunicationStats",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "NLLLoss",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_log_probs",
    "log_probs",
    "nll_loss",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_log_probs",
    "vocab_shard_range",
]
