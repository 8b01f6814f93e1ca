"""The public signatures give the numeric options the types their checks take (``xentkit._options``:
``Real``, ``Integer``), so that type checkers accept a NumPy scalar or a one-value tensor where
the call works: ``label_smoothing=np.float32(0.1)`` was an error under mypy against ``float``."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest

import xentkit
from xentkit._options import Integer, Real

torch = pytest.importorskip("torch")
import xentkit.torch  # noqa: E402
import xentkit.torch.distributed  # noqa: E402

_OPTIONS = {"label_smoothing": "Real", "z_loss": "Real", "softcap": "Real | None", "temperature": "Real",
            "ignore_index": ("Integer", "Integer | None")}


def _public_signatures():
    modules = [xentkit, xentkit.torch, xentkit.torch.distributed]
    try:
        import xentkit.integrations.transformers as transformers_integration

        modules.append(transformers_integration)
    except ImportError:
        pass
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            function = obj.__init__ if inspect.isclass(obj) else obj
            if not callable(function):
                continue
            try:
                signature = inspect.signature(function)
            except (TypeError, ValueError):
                continue
            yield f"{module.__name__}.{name}", function, signature


def test_every_public_option_is_annotated_with_the_types_its_check_takes():
    checked = 0
    for qualified, _function, signature in _public_signatures():
        for parameter in signature.parameters.values():
            if parameter.name not in _OPTIONS or parameter.annotation is inspect.Parameter.empty:
                continue
            if qualified.endswith("BCEWithLogitsLoss"):  # torch's own class
                continue
            expected = _OPTIONS[parameter.name]
            assert parameter.annotation in (expected if isinstance(expected, tuple) else (expected,)), (
                qualified, parameter.name, parameter.annotation
            )
            checked += 1
    assert checked >= 50  # every loss, module and distributed form was seen (57 on 2026-12-06)


def test_the_annotations_resolve_and_take_numpy_scalars_and_one_value_tensors():
    hints = typing.get_type_hints(xentkit.cross_entropy)
    assert hints["label_smoothing"] == Real and hints["ignore_index"] == Integer
    assert all(isinstance(value, typing.SupportsFloat) for value in (0.1, np.float32(0.1), torch.tensor(0.1), 1))
    assert all(isinstance(value, typing.SupportsIndex) for value in (-100, np.int64(-100), torch.tensor(-100)))
    assert not isinstance("0.1", typing.SupportsFloat)
    # and the calls take them
    x = np.array([[2.0, 0.5, -1.0]], np.float32)
    expected = xentkit.cross_entropy(x, [0], label_smoothing=0.25, ignore_index=-1)
    got = xentkit.cross_entropy(x, [0], label_smoothing=np.float32(0.25), ignore_index=np.int64(-1))
    assert got == expected
    t = torch.from_numpy(x)
    got = xentkit.torch.cross_entropy(t, torch.tensor([0]), label_smoothing=torch.tensor(0.25), ignore_index=torch.tensor(-1))
    assert abs(float(got) - float(expected)) < 1e-6



@pytest.mark.parametrize("name", ["label_smoothing", "temperature"])
def test_a_float_option_given_as_a_tensor_that_requires_grad_says_it_gets_no_gradient(name):
    logits, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    call = xentkit.torch.cross_entropy if name == "label_smoothing" else xentkit.torch.log_probs
    option = torch.tensor(0.75, requires_grad=True)  # (float32's 0.7 is not the float 0.7: the results differed by an ulp at times)
    with pytest.raises(TypeError, match=rf"^{name} must be .*, got a 0-d tensor that requires grad: {name} is an option "
                       r"and gets no gradient here \(detach it, or pass a float\)$"):  # fmt: skip
        call(logits, target, **{name: option})
    assert torch.equal(call(logits, target, **{name: option.detach()}), call(logits, target, **{name: 0.75}))
