"""Users of the library that plug it into other frameworks; each submodule is imported on demand.

- :mod:`xentkit.integrations.transformers`: ``patch(model)`` makes a Hugging Face causal language
  model train through :func:`xentkit.torch.linear_cross_entropy`, never building its logits.

Nothing in the library imports this package.
"""
