"""``check_labels=False``: no label check where it would wait for the device; a bad label makes its
row NaN (loss and gradient) on the Triton and torch-ops paths, never an out-of-bounds read, while
the CPU kernels keep checking (issue "GPU", bad input). Triton runs under its interpreter here."""

from __future__ import annotations

import pytest
import torch

import xentkit.torch as xt

BACKENDS = ("triton", "torch")


def _case(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels with two bad ones (one past C, one negative) and one ignored, and a mask of
    the bad positions."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator)  # float32: the Triton kernels' dtypes
    classes = shape[1]
    sample_shape = (shape[0], *shape[2:])
    labels = torch.randint(0, classes, sample_shape, generator=generator)
    flat = labels.view(-1)
    flat[1], flat[3], flat[4] = classes + 2, -7, -100
    bad = torch.zeros(sample_shape, dtype=torch.bool)
    bad.view(-1)[[1, 3]] = True
    return logits, labels, bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3)])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 3.0}])
def test_unchecked_bad_labels_make_their_rows_nan_and_leave_the_others_exact(backend, shape, options):
    logits, labels, bad = _case(shape)
    leaf = logits.clone().requires_grad_()
    loss = xt.cross_entropy(leaf, labels, reduction="none", backend=backend, check_labels=False, **options)
    loss.sum().backward()
    # the good rows: the values of a checked call where the bad labels are some class in range
    fixed = torch.where(bad, 0, labels)
    reference_leaf = logits.clone().requires_grad_()
    expected = xt.cross_entropy(reference_leaf, fixed, reduction="none", backend="torch", **options)
    expected.sum().backward()
    assert torch.isnan(loss[bad]).all()
    torch.testing.assert_close(loss[~bad], expected[~bad].detach(), rtol=2e-6, atol=2e-6)
    row_grad = leaf.grad.movedim(1, -1)  # classes last: one row per sample
    expected_grad = reference_leaf.grad.movedim(1, -1)
    assert torch.isnan(row_grad[bad]).all()
    torch.testing.assert_close(row_grad[~bad], expected_grad[~bad], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_mean_is_nan_and_counts_the_bad_rows_as_rows(backend):
    logits, labels, bad = _case((8, 4), seed=1)
    leaf = logits.clone().requires_grad_()
    loss = xt.cross_entropy(leaf, labels, backend=backend, check_labels=False)
    loss.backward()
    assert torch.isnan(loss)
    # the good rows' gradient: that of a mean over every non-ignored row, the bad ones included
    reference_leaf = logits.clone().requires_grad_()
    xt.cross_entropy(reference_leaf, torch.where(bad, 0, labels), backend="torch").backward()
    torch.testing.assert_close(leaf.grad[~bad], reference_leaf.grad[~bad], rtol=2e-6, atol=2e-6)
    assert torch.isnan(leaf.grad[bad]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_checked_labels_still_raise_on_every_path(backend):
    logits, labels, _ = _case((6, 5))
    with pytest.raises(ValueError, match=r"target has label 7 at position \(1,\)"):
        xt.cross_entropy(logits, labels, backend=backend)


def test_the_cpu_kernels_check_even_unchecked_labels():
    # the Numba kernels read by label: they check whatever check_labels says (no wait to save);
    # so does the small-problem path on torch's own kernel
    for rows in (3000, 6):
        logits = torch.randn(rows, 40)
        labels = torch.zeros(rows, dtype=torch.long)
        labels[2] = 40
        with pytest.raises(ValueError, match=r"target has label 40 at position \(2,\)"):
            xt.cross_entropy(logits, labels, check_labels=False)


def test_the_module_keeps_and_shows_check_labels():
    criterion = xt.CrossEntropyLoss(check_labels=False, backend="torch")
    assert "check_labels=False" in repr(criterion)
    logits, labels, _ = _case((6, 5))
    assert torch.isnan(criterion(logits, labels))
    with pytest.raises(TypeError, match="check_labels must be a bool, got int 0"):
        xt.cross_entropy(logits, labels, check_labels=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_linear_cross_entropy_makes_bad_rows_nan(backend):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=generator, requires_grad=True)
    w = torch.randn(5, 4, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 9, 3, -100, 4, 1])
    loss = xt.linear_cross_entropy(x, w, labels, reduction="none", backend=backend, check_labels=False)
    loss.sum().backward()
    assert torch.isnan(loss[1]) and not torch.isnan(loss[[0, 2, 3, 4, 5]]).any()
    expected = xt.cross_entropy(x.detach() @ w.detach().T, torch.where(labels == 9, 0, labels), reduction="none")
    torch.testing.assert_close(loss[[0, 2, 3, 4, 5]], expected[[0, 2, 3, 4, 5]], rtol=2e-6, atol=2e-6)
    assert torch.isnan(x.grad[1]).all() and not torch.isnan(x.grad[[0, 2, 3, 4, 5]]).any()
    with pytest.raises(ValueError, match=r"target has label 9 at position \(1,\) but linear_weight has 5 rows"):
        xt.linear_cross_entropy(x, w, labels, backend=backend)
    head = xt.LinearCrossEntropyLoss(4, 5, check_labels=False, backend=backend)
    assert "check_labels=False" in repr(head)
    assert torch.isnan(head(x.detach(), labels))


def test_unchecked_weighted_mean_counts_bad_rows_alike_on_both_paths():
    # with class weights a bad row's class (so its weight) is unknown: it counts nowhere, on the
    # torch-ops path as on the Triton path (the good rows' gradients are the same)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=generator)
    labels = torch.tensor([0, 9, 2, 1, -3, 3])
    weight = torch.tensor([1.0, 2.0, 3.0, 0.5])
    grads = []
    for backend in BACKENDS:
        leaf = logits.clone().requires_grad_()
        loss = xt.cross_entropy(leaf, labels, weight, backend=backend, check_labels=False)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(leaf.grad[[1, 4]]).all()
        grads.append(leaf.grad[[0, 2, 3, 5]])
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-6, atol=2e-6)
    # and both are the mean over the good rows' weights
    good = torch.tensor([0, 2, 3, 5])
    leaf = logits[good].clone().requires_grad_()
    xt.cross_entropy(leaf, labels[good], weight, backend="torch").backward()
    torch.testing.assert_close(grads[0], leaf.grad, rtol=2e-6, atol=2e-6)


def test_one_class_with_ignore_index_zero_has_no_stand_in_and_is_checked():
    with pytest.raises(ValueError, match=r"target has label 5 at position \(1,\)"):
        xt.cross_entropy(torch.randn(3, 1), torch.tensor([0, 5, 0]), ignore_index=0, backend="torch", check_labels=False)
