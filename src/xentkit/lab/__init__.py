"""The xentkit lab: the experiments of note 003, reproduced with xentkit's own NumPy API.

Note 003 is one of the blog notes xentkit reproduces (see the README).

- :mod:`xentkit.lab.neuron`: the single sigmoid neuron, quadratic cost vs cross-entropy;
- :mod:`xentkit.lab.mnist`: softmax regression on MNIST under three losses;
- :mod:`xentkit.lab.datasets` / :mod:`xentkit.lab.download`: IDX / ``.npz`` loaders, the
  embedded MNIST sample, and checksum-verified downloads;
- :mod:`xentkit.lab.report` / :mod:`xentkit.lab.console`: plots, ``report.html``, tables;
- :mod:`xentkit.lab.runner`: the experiments end to end, as ``xentkit lab`` runs them.

Nothing in the library imports the lab; matplotlib, rich, pooch and mlxtend are imported only
inside the functions that need them.
"""
