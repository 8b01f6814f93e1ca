"""Hugging Face Transformers: train a causal language model without ever building its logits.

>>> from xentkit.integrations.transformers import patch   # doctest: +SKIP
>>> model = patch(AutoModelForCausalLM.from_pretrained(...))  # doctest: +SKIP

After :func:`patch`, a forward that is given ``labels`` while autograd records (a training step,
the ``Trainer``'s included) computes the loss with :func:`xentkit.torch.linear_cross_entropy` on
the last hidden states and ``lm_head.weight`` (and its bias), in chunks of rows, instead of
``lm_head(hidden_states)`` → ``[batch, sequence, vocabulary]`` logits → ``ForCausalLMLoss``.
Everything else runs as before.

How, with hooks only (the model's ``forward``, parameters and ``state_dict`` stay untouched):

1. a forward pre-hook on the model takes ``labels`` out of the call (the model's own loss is then
   skipped) and keeps them with ``shift_labels``, ``num_items_in_batch`` and ``ignore_index``;
2. a forward pre-hook on ``lm_head`` computes the loss from the hidden states it receives, then
   hands ``lm_head`` zero positions (``[batch, 0, hidden]``), so the head multiplies nothing;
3. a forward hook on the model returns the model's own output class (``CausalLMOutputWithPast``)
   with ``loss`` set and ``logits=None``, after checking, for models that do nothing to
   ``lm_head``'s output, that the model did nothing to it (Gemma's softcapping is reproduced
   from the config, not checked).

Hooks the user put on the model or on ``lm_head`` are run or refused, never bypassed in silence
(``_Patch._check_hooks``).

The loss is ``ForCausalLMLoss``'s (transformers' ``loss/loss_utils.py``): labels shifted one token
left and padded with ``ignore_index`` (-100 unless the call passes ``ignore_index``), or the
call's ``shift_labels`` as they are; the mean over the non-ignored tokens, or, when
``num_items_in_batch`` is given (the ``Trainer`` does, for gradient accumulation), the sum divided
by it; ``final_logit_softcapping`` (Gemma 2 and 3) as xentkit's ``softcap``. The one difference:
when every label is ignored the mean is 0 with zero gradients, where transformers gives NaN.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import threading
import weakref
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Literal, TypeVar, overload

from .._extras import require

require("torch", "transformers", "xentkit.integrations.transformers")  # first: one line, not a traceback

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from .._labels import LabelError, _bad_labels  # noqa: E402
from .._options import LogProbOptions, Real, check_flag, describe  # noqa: E402
from ..torch import linear_cross_entropy, linear_log_probs  # noqa: E402

__all__ = ["SUPPORTED_MODELS", "is_patched", "patch", "token_log_probs", "unpatch"]

# What each supported class does between ``lm_head`` and its loss, as its forward is written
# (transformers' models/<name>/modeling_<name>.py): "plain" hands lm_head's output to the loss,
# "softcap" first applies s·tanh(z/s) with s = config.final_logit_softcapping (None: nothing).
# Every entry is tested against the unpatched model (tests/test_transformers.py).
_PLAIN = "plain"
_SOFTCAP = "softcap"
SUPPORTED_MODELS = MappingProxyType({
    "GemmaForCausalLM": _PLAIN,
    "Gemma2ForCausalLM": _SOFTCAP,
    "Gemma3ForCausalLM": _SOFTCAP,
    "GlmForCausalLM": _PLAIN,
    "LlamaForCausalLM": _PLAIN,
    "MistralForCausalLM": _PLAIN,
    "OlmoForCausalLM": _PLAIN,
    "Olmo2ForCausalLM": _PLAIN,
    "PhiForCausalLM": _PLAIN,
    "Phi3ForCausalLM": _PLAIN,
    "Qwen2ForCausalLM": _PLAIN,
    "Qwen3ForCausalLM": _PLAIN,
    "SmolLM3ForCausalLM": _PLAIN,
    "Starcoder2ForCausalLM": _PLAIN,
})

_ATTRIBUTE = "_xentkit_linear_cross_entropy_patch"
_PURPOSE = "xentkit.integrations.transformers"
ModelT = TypeVar("ModelT", bound=nn.Module)


@dataclasses.dataclass
class _Call:
    """One patched training forward in flight: what the loss needs, and what the hooks saw."""

    labels: Tensor
    shift_labels: Tensor | None
    num_items_in_batch: Any
    ignore_index: int
    return_tuple: bool
    loss: Tensor | None = None
    head_output: Tensor | None = None  # lm_head's output as the model receives it
    raw_output: Tensor | None = None  # lm_head's output before any other forward hook
    raw_version: int = 0
    head_calls: int = 0


def _stack_depth() -> int:
    """How many frames the caller's stack holds: a forward called within another runs deeper
    than the one around it."""
    depth, frame = 0, sys._getframe(1)
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


def _gone() -> None:
    """A weak reference's answer once its object is freed (``weakref.ref(None)`` cannot be made)."""
    return None


class _InFlight(threading.local):
    """One thread's forwards in flight through a patched model: threads share the model and its
    hooks (a server's threads, ``nn.DataParallel``'s replicas, which share their hook dicts), and
    each forward's record must stay its own (a review: with one record per model, a thread's loss
    had been computed from another thread's labels)."""

    def __init__(self) -> None:
        self.call: _Call | None = None  # the record of the innermost forward in flight
        # (stack depth of a forward's pre-hook, the record of the forward around it) per forward
        # in flight, innermost last
        self.outer: list[tuple[int, _Call | None]] = []


class _Patch:
    """The hooks of one patched model and the call they share."""

    def __init__(self, model: nn.Module, head: nn.Linear, rule: str, loss: Callable[..., Any]) -> None:
        # weak references: the hooks (held by the model and its head) hold this object, so strong
        # ones would make a cycle that only the cyclic garbage collector frees, and loops that
        # switch it off would keep every dropped patched model
        self._model = weakref.ref(model)
        self._head = weakref.ref(head)
        self.rule = rule
        self.loss_function = loss
        # older transformers versions ignore a shift_labels argument: so does the patch then
        self.takes_shift_labels = "shift_labels" in inspect.signature(loss).parameters
        self.name = type(model).__name__
        parameters = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
        self.positions = {name: parameters.index(name) for name in ("labels", "return_dict") if name in parameters}
        self._in_flight = _InFlight()  # this thread's: call and _outer below
        # the pre-hook last (it must see the labels every other pre-hook hands on, and is checked to
        # stay last), the output hook first (later hooks see the patched output)
        self.handles = [
            model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
            model.register_forward_hook(self._model_hook, with_kwargs=True, always_call=True, prepend=True),
        ]
        self.head_handles = self._hook_head(head)

    @property
    def call(self) -> _Call | None:
        """The record of this thread's innermost forward in flight."""
        return self._in_flight.call

    @call.setter
    def call(self, value: _Call | None) -> None:
        self._in_flight.call = value

    @property
    def _outer(self) -> list[tuple[int, _Call | None]]:
        return self._in_flight.outer

    def __getstate__(self) -> dict[str, Any]:
        """For copy.deepcopy and pickling (torch.save of a patched model): the model and head
        themselves, so that a copy's patch refers to the copied model (weak references would be
        shared by the copy, and cannot be pickled)."""
        state = dict(vars(self))
        state["_model"], state["_head"] = self._model(), self._head()
        del state["_in_flight"]  # (a copy has no forward in flight)
        if state["_head"] is None:  # a head replaced and freed before the next step re-hooked the
            state["head_handles"] = []  # new one: its handles point at freed hook dicts (torch
        return state  # cannot copy them); the next step hooks the model's head (_follow_model)

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._in_flight = _InFlight()
        head = state["_head"]
        self._model = weakref.ref(state["_model"])
        self._head = _gone if head is None else weakref.ref(head)

    @property
    def model(self) -> nn.Module:
        """The patched model (its hooks, the only callers, run while it lives)."""
        model = self._model()
        if model is None:  # pragma: no cover - a hook of a freed model never runs
            raise RuntimeError("the patched model no longer exists")
        return model

    @property
    def head(self) -> nn.Module | None:
        """The hooked output layer, None once it is freed (a head replaced and dropped)."""
        return self._head()

    def _hook_head(self, head: nn.Module) -> list[Any]:
        """The head's three hooks: the loss (a pre-hook), lm_head's own output (the first forward
        hook) and what the model receives (the last); :meth:`_check_hooks` keeps them there."""
        return [
            head.register_forward_pre_hook(self._head_pre_hook),
            head.register_forward_hook(self._head_raw_hook, prepend=True),
            head.register_forward_hook(self._head_hook),
        ]

    def remove(self) -> None:
        for handle in self.handles + self.head_handles:
            handle.remove()

    def _follow_model(self) -> None:
        """Keep up with changes made after the patch: a new ``lm_head`` (``resize_token_embeddings``
        of an untied model installs one) is hooked in the old one's place when it is a plain
        ``nn.Linear``; another head, or another ``loss_function``, is an error (the patch would
        otherwise compute a loss the model no longer has)."""
        model = self.model
        if model.loss_function is not self.loss_function:
            raise RuntimeError(
                f"{self.name}'s loss_function was changed after xentkit patched the model "
                f"(now {getattr(model.loss_function, '__name__', model.loss_function)!r}); the patch "
                "computes transformers' ForCausalLMLoss only: unpatch the model "
                "(xentkit.integrations.transformers.unpatch) to use another loss"
            )
        head = model.get_output_embeddings()
        if head is self.head:
            return
        if type(head) is not nn.Linear:
            raise RuntimeError(
                f"{self.name}'s lm_head was replaced after xentkit patched the model by a "
                f"{_class_path(head)}, not a torch.nn.Linear; quantized or wrapped heads are not "
                "supported: unpatch the model (xentkit.integrations.transformers.unpatch)"
            )
        for handle in self.head_handles:
            handle.remove()
        self._head, self.head_handles = weakref.ref(head), self._hook_head(head)

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        position = self.positions.get(name)
        if position is not None and position < len(args):
            return args[position]
        return kwargs.get(name)

    def _replace(self, name: str, value: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        position = self.positions.get(name)
        if position is not None and position < len(args):
            return (*args[:position], value, *args[position + 1 :]), kwargs
        return args, {**kwargs, name: value}

    def _check_hooks(self, model: nn.Module, head: nn.Module) -> None:
        """Hooks that would change the loss are seen to, never bypassed in silence.

        - A forward pre-hook on the model that runs after the patch's (registered later) would
          not see the labels: refused.
        - On ``lm_head``, the patch's pre-hook is moved after every other pre-hook (it computes
          the loss from the input they hand on, as lm_head would receive it), its first forward
          hook before every other and its last after: a hook that changes lm_head's output (a new
          tensor, or the same written in place) makes the step raise, since under the patch
          lm_head runs on zero positions and no hook sees the logits the loss is computed from.
          Hooks that only read the output run (on zero positions).
        - The patch's forward hook on the model is moved before every other, so each sees the
          output with its loss (a hook registered later with ``prepend=True`` saw ``loss=None``).
        """
        later = list(model._forward_pre_hooks.values())
        later = later[list(model._forward_pre_hooks).index(self.handles[0].id) + 1 :]
        if later:
            raise RuntimeError(
                f"{self.name} has a forward pre-hook registered after xentkit patched it "
                f"({_hook_names(later)}), which would run after the patch took the labels out of "
                "the call: register it before patch(), or unpatch the model "
                "(xentkit.integrations.transformers.unpatch) and patch it again"
            )
        # the output hook first again: one registered later with prepend=True would see the
        # output before the patch set its loss (None)
        model._forward_hooks.move_to_end(self.handles[1].id, last=False)
        loss_hook, raw_hook, final_hook = (handle.id for handle in self.head_handles)
        head._forward_pre_hooks.move_to_end(loss_hook)
        head._forward_hooks.move_to_end(final_hook)
        head._forward_hooks.move_to_end(raw_hook, last=False)

    # 1. model pre-hook: take the labels out, so the model skips its own loss
    def _model_pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        depth = _stack_depth()
        # a forward cut short by KeyboardInterrupt skipped the model hook (torch runs always_call
        # hooks on Exception alone): its entry, at this call's depth or deeper, is dropped, and
        # with no live forward around this one a record left behind must not reach this lm_head
        while self._outer and self._outer[-1][0] >= depth:
            self._outer.pop()
        if not self._outer:
            self.call = None
        recorded = self._record(model, args, kwargs)  # (what raises here leaves the state as it was)
        # the model hook restores the record of a forward around this one (a model that calls
        # itself, after its lm_head or before)
        self._outer.append((depth, self.call))
        if recorded is None:
            self.call = None
            return None
        self.call, args, kwargs = recorded
        return args, kwargs

    def _record(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[_Call, tuple, dict] | None:
        """This forward's record and its arguments without the labels, or None for a logits
        request."""
        labels = self._argument("labels", args, kwargs)
        if labels is None or not torch.is_grad_enabled():
            return None  # a logits request (generation, evaluation): unchanged
        if isinstance(labels, Tensor) and (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):
            # (linear_cross_entropy would read floating labels as class probabilities, and say so)
            raise TypeError(
                f"labels must hold token ids (an integer tensor, -100 where ignored), got dtype "
                f"{str(labels.dtype).removeprefix('torch.')}"
            )
        self._follow_model()
        self._check_hooks(model, self.head)
        return_dict = self._argument("return_dict", args, kwargs)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        call = _Call(
            labels=labels,
            shift_labels=kwargs.get("shift_labels") if self.takes_shift_labels else None,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            ignore_index=kwargs.get("ignore_index", -100),
            return_tuple=not return_dict,
        )
        args, kwargs = self._replace("labels", None, args, kwargs)
        if not return_dict:  # the output is rebuilt from the output object, then made a tuple
            args, kwargs = self._replace("return_dict", True, args, kwargs)
        return call, args, kwargs

    # 2. lm_head pre-hook: the loss from the hidden states, then zero positions for the head
    def _head_pre_hook(self, head: nn.Module, args: tuple) -> tuple | None:
        call = self.call
        if call is None:
            return None
        call.head_calls += 1
        if call.head_calls > 1:
            raise RuntimeError(
                f"{self.name} called lm_head more than once in one forward; "
                "xentkit.integrations.transformers handles models that call it once"
            )
        (hidden,) = args
        call.loss = self._loss(head, _head_input(self.name, head, hidden), call)
        return (hidden.narrow(-2, 0, 0),)

    def _head_raw_hook(self, head: nn.Module, args: tuple, output: Tensor) -> None:
        if self.call is not None:
            self.call.raw_output, self.call.raw_version = output, output._version

    def _head_hook(self, head: nn.Module, args: tuple, output: Tensor) -> None:
        call = self.call
        if call is None:
            return
        if output is not call.raw_output or output._version != call.raw_version:
            raise RuntimeError(
                f"{self.name}'s lm_head has a forward hook that changes its output "
                f"({_hook_names(list(head._forward_hooks.values())[1:-1])}); under the patch "
                "lm_head runs on zero positions, so the hook would change none of the logits the "
                "loss is computed from: remove it, or unpatch the model "
                "(xentkit.integrations.transformers.unpatch)"
            )
        call.head_output = output

    # 3. model hook: the model's own output class, with the loss and without logits
    def _model_hook(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        depth, own = _stack_depth(), None
        # this forward's entry (torch calls this hook one frame up when forward raised), and any
        # left above it by forwards within it cut short; a live forward around it sits lower
        while self._outer and self._outer[-1][0] >= depth - 1:
            own = self._outer.pop()
        if own is None:  # this forward's pre-hook refused it before recording anything
            return None
        call, self.call = self.call, own[1]
        if call is None or output is None:  # not a patched call, or forward raised
            return None
        if call.loss is None:
            raise RuntimeError(
                f"{self.name}'s forward never called lm_head, so xentkit computed no loss; "
                "unpatch the model (xentkit.integrations.transformers.unpatch)"
            )
        logits = getattr(output, "logits", None)
        if self.rule == _PLAIN and not _same_or_cast(logits, call.head_output):
            raise RuntimeError(
                f"{self.name}'s forward changed lm_head's output before its loss (expected it "
                "unchanged in this transformers version); xentkit would compute another loss: "
                "unpatch the model (xentkit.integrations.transformers.unpatch)"
            )
        fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
        result = type(output)(loss=call.loss, **fields)
        return result.to_tuple() if call.return_tuple else result

    def _loss(self, head: nn.Module, hidden: Tensor, call: _Call) -> Tensor:
        """``ForCausalLMLoss(head(hidden), labels, ...)`` by linear_cross_entropy (``head`` the
        model's ``lm_head``, whose hook calls this)."""
        shift_labels = call.shift_labels
        if shift_labels is None:  # tokens < n predict n; the last position has no target
            shift_labels = F.pad(call.labels, (0, 1), value=call.ignore_index)[..., 1:]
        target = shift_labels.reshape(-1).to(hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] != target.shape[0]:
            raise ValueError(
                f"{self.name}: the labels give {target.shape[0]} targets (shift_labels of shape "
                f"{tuple(shift_labels.shape)}) but lm_head received {rows.shape[0]} positions "
                f"(hidden states of shape {tuple(hidden.shape)}); with logits_to_keep, pass "
                "shift_labels for the kept positions"
            )
        softcap = self.model.config.final_logit_softcapping if self.rule == _SOFTCAP else None
        summed = call.num_items_in_batch is not None
        try:
            loss = linear_cross_entropy(
                rows,
                head.weight,
                target,
                linear_bias=head.bias,
                reduction="sum" if summed else "mean",
                ignore_index=call.ignore_index,
                softcap=softcap,
            ).float()  # transformers computes its loss in float32 whatever the model's dtype
        except LabelError:  # said in the caller's terms: its labels' position, the vocabulary
            raise self._label_error(shift_labels, call, head.weight.shape[0]) from None
        if summed:
            count = call.num_items_in_batch
            loss = loss / (count.to(loss.device) if torch.is_tensor(count) else count)
        return loss


    def _label_error(self, shift_labels: Tensor, call: _Call, vocabulary: int) -> LabelError:
        """The first bad label as the caller gave it: its position in ``labels`` (or in
        ``shift_labels`` when the call passed them), against the model's vocabulary."""
        bad = _bad_labels(shift_labels, vocabulary, call.ignore_index)
        index = tuple(int(i) for i in bad.nonzero()[0])
        label = int(shift_labels[index])
        if call.shift_labels is None:  # shift_labels[..., t] is labels[..., t + 1]
            name, index = "labels", (*index[:-1], index[-1] + 1)
        else:
            name = "shift_labels"
        return LabelError(
            f"{self.name}: {name} has token id {label} at position {index}, outside the model's "
            f"vocabulary of {vocabulary} (lm_head's rows); labels must be in [0, {vocabulary}) or "
            f"equal ignore_index={call.ignore_index}"
        )


def _transformers() -> Any:
    return require("transformers", "transformers", _PURPOSE)


def patch(model: ModelT) -> ModelT:
    """Make ``model`` compute its training loss with :func:`xentkit.torch.linear_cross_entropy`.

    ``model``: a loaded transformers causal language model of a class in :data:`SUPPORTED_MODELS`
    (Llama, Mistral, Qwen2/3, Phi/Phi-3, Gemma 1/2/3, OLMo 1/2, GLM, SmolLM3, StarCoder2), whose
    ``lm_head`` is a plain ``torch.nn.Linear`` and whose loss is transformers' ``ForCausalLMLoss``.
    Returns the same object, patched in place (patching twice changes nothing).

    A forward with ``labels`` while autograd records returns the model's own output class with
    the same ``loss`` (and gradients) as before, to float rounding, and ``logits=None``: they are
    never built. A tuple output (``return_dict=False``) leaves out the ``None`` logits, as
    transformers' ``to_tuple`` does. Without ``labels`` (generation), or under
    ``torch.no_grad()`` (the ``Trainer``'s evaluation), the model runs exactly as unpatched and
    returns its logits. :func:`unpatch` undoes the patch.

    A PEFT model (``peft.get_peft_model``, LoRA and the like) may be given: its base model is
    patched (so may the model be patched before it is wrapped). Tested with PEFT 0.21, whose
    wrappers call the base model as a module, so that its hooks run.

    Raises ``TypeError`` when ``model`` is not a transformers model, ``ValueError`` naming the
    class when it is one this function cannot reproduce the loss of (another architecture,
    another loss, a quantized or wrapped ``lm_head``).
    """
    wrapper, model = model, _base_model(model)
    if is_patched(model):
        return wrapper
    name, rule, head = _check_model(model)
    from transformers.loss.loss_utils import LOSS_MAPPING

    loss = LOSS_MAPPING["ForCausalLM"]
    if model.loss_function is not loss:
        raise ValueError(
            f"{name}'s loss_function must be transformers' ForCausalLMLoss, got "
            f"{getattr(model.loss_function, '__name__', model.loss_function)!r}"
        )
    setattr(model, _ATTRIBUTE, _Patch(model, head, rule, loss))
    return wrapper


def _not_a_model(model: object) -> TypeError:
    return TypeError(f"model must be a transformers PreTrainedModel (a *ForCausalLM), got {type(model).__name__}")


def _base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (its ``get_base_model()``), else ``model``;
    anything but a module is a TypeError naming ``model``."""
    if not isinstance(model, nn.Module):
        raise _not_a_model(model)
    get_base_model = getattr(type(model), "get_base_model", None)  # (PEFT forwards attributes)
    if callable(get_base_model) and isinstance(model, nn.Module):
        inner = model.get_base_model()
        if isinstance(inner, nn.Module) and inner is not model:
            return inner
    return model


def _check_model(model: nn.Module) -> tuple[str, str, nn.Linear]:
    """``(class name, rule, lm_head)`` of a supported causal language model; raises otherwise."""
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise _not_a_model(model)
    name = type(model).__name__
    rule = SUPPORTED_MODELS.get(name)
    if rule is None or not type(model).__module__.startswith("transformers."):
        raise ValueError(
            f"model must be one of transformers' {', '.join(SUPPORTED_MODELS)}, got {name} "
            f"(from {type(model).__module__}); xentkit.integrations.transformers reproduces only "
            "the losses of these classes"
        )
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(
            f"{name}'s lm_head must be a torch.nn.Linear, got {_class_path(head)}; "
            "quantized or wrapped heads (PEFT's LoRA on lm_head, or modules_to_save) are not supported"
        )
    return name, rule, head


# Arguments of a causal LM's forward that token_log_probs' decoder call cannot use.
_NOT_FOR_THE_DECODER = frozenset(
    {"labels", "shift_labels", "logits_to_keep", "num_logits_to_keep", "num_items_in_batch", "return_dict"}
)


# The result's type follows return_entropy (a type checker picks the overload from a literal).
@overload
def token_log_probs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = ..., *, temperature: Real = ...,
    return_entropy: Literal[False] = ..., chunk_size: int | None = ..., **model_kwargs: Any,
) -> Tensor: ...
@overload
def token_log_probs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = ..., *, temperature: Real = ...,
    return_entropy: Literal[True], chunk_size: int | None = ..., **model_kwargs: Any,
) -> tuple[Tensor, Tensor]: ...
@overload
def token_log_probs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = ..., *, temperature: Real = ...,
    return_entropy: bool = ..., chunk_size: int | None = ..., **model_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]: ...


def token_log_probs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    temperature: Real = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    **model_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Each next token's log-probability under ``model`` (and the entropy of its distribution),
    from the last hidden states, without building the logits: what RL trainers (PPO, GRPO) need.

    Runs the model's decoder (``model.model``) on ``input_ids`` ``[B, T]`` (with
    ``attention_mask`` and any ``model_kwargs``: the decoder's own, such as ``position_ids``;
    ``labels``, ``shift_labels``, ``logits_to_keep``, ``num_items_in_batch`` and ``return_dict``
    are a ``TypeError``), then
    :func:`xentkit.torch.linear_log_probs` on its hidden states and ``lm_head``: entry ``[b, t]``
    of the ``[B, T − 1]`` result (float32, float64 for a float64 model, as
    :func:`~xentkit.torch.linear_log_probs`) is log p(input_ids[b, t + 1] | input_ids[b, :t + 1])
    at ``temperature``, i.e. ``log_softmax(model(input_ids).logits[:, :-1] / T)`` gathered at
    ``input_ids[:, 1:]``. Positions whose next token is padding (``attention_mask`` 0 there) give
    0 and no gradient. Differentiable with respect to every parameter; with
    ``return_entropy=True`` returns ``(log_probs, entropy)``.

    ``model``: a class of :data:`SUPPORTED_MODELS` that does not soft-cap its logits (Gemma 2 and
    3 with ``final_logit_softcapping`` raise ``ValueError``), or a PEFT model of one (its base
    model runs, adapters included; prompt-learning methods, whose wrapper adds virtual tokens,
    raise ``ValueError``); the model need not be patched. Forward pre-hooks on ``lm_head`` run on
    the hidden states; a forward hook on ``lm_head`` raises ``RuntimeError`` (its output is never
    built); hooks on the model itself do not run (its decoder is called). The options and
    ``input_ids`` are checked before the decoder runs: ``input_ids`` int64 or int32, with at least
    one position; a token id outside the model's vocabulary (its input embedding's rows) is a
    ``ValueError`` (an ``IndexError`` too, as torch's) naming its position (reading the ids'
    extremes: one wait for the device), never a device-side assert.
    ``chunk_size``: rows per chunk, passed to :func:`~xentkit.torch.linear_log_probs` (default:
    its choice, by the device and the logits' size).
    """
    # (checked before the decoder runs: a bad option costs no forward)
    options = LogProbOptions(temperature=temperature, chunk_size=chunk_size)
    return_entropy = check_flag(return_entropy, "return_entropy")
    _refuse_prompt_learning(model)
    patched = vars(_base_model(model)).get(_ATTRIBUTE)
    model = _base_model(model)  # a PEFT model's base model, its adapters inside
    name, rule, head = _check_model(model)
    softcap = getattr(model.config, "final_logit_softcapping", None) if rule == _SOFTCAP else None
    if softcap is not None:
        raise ValueError(
            f"{name} soft-caps its logits (final_logit_softcapping={softcap}); token_log_probs has "
            "no softcap: use log_softmax on the model's logits for this model"
        )
    _check_token_inputs(model, input_ids, attention_mask)
    unused = sorted(set(model_kwargs) & _NOT_FOR_THE_DECODER)
    if unused:  # (the decoder's **kwargs would take them and drop them, or break on return_dict)
        raise TypeError(
            f"token_log_probs takes no {', '.join(unused)}: it scores every next token of input_ids "
            "from the decoder's hidden states (labels, logits and the model's output are not used)"
        )
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).last_hidden_state
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:].to(hidden.device) == 0, -100)
    rows = _head_pre_hooks(name, head, hidden[:, :-1], patched)
    rows = _head_input(name, head, rows).reshape(-1, rows.shape[-1])
    results = linear_log_probs(
        rows, head.weight, targets.reshape(-1).to(hidden.device), linear_bias=head.bias,
        temperature=options.temperature, return_entropy=return_entropy, chunk_size=options.chunk_size,
    )
    if return_entropy:
        return tuple(result.reshape(targets.shape) for result in results)
    return results.reshape(targets.shape)


def _check_token_inputs(model: nn.Module, input_ids: Any, attention_mask: Any) -> None:
    """``input_ids`` and ``attention_mask`` of :func:`token_log_probs`, checked before the decoder
    runs: what its embedding would refuse from deep inside torch (an id outside the vocabulary is
    an ``IndexError`` there on the CPU and a device-side assert, which ends the CUDA context, on
    a GPU) is said here in the caller's terms. Reads the ids' smallest and largest values (one
    wait for the device)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a [batch, sequence] tensor of token ids, got {describe(input_ids)}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a [batch, sequence] tensor with at least one position, got shape {tuple(input_ids.shape)}"
        )
    dtype = str(input_ids.dtype).removeprefix("torch.")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {dtype}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32 token ids (what the model's embedding takes), got dtype {dtype}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a tensor or None, got {describe(attention_mask)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        if attention_mask.is_complex():
            raise TypeError(
                f"attention_mask must hold 1 (a token) and 0 (padding), got dtype {str(attention_mask.dtype).removeprefix('torch.')}"
            )
    for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if value is not None and value.is_meta:
            raise ValueError(f"{name} is a meta tensor: token_log_probs runs the model on the token ids' values")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocabulary = getattr(embedding, "num_embeddings", None)
    if isinstance(vocabulary, int) and input_ids.numel():
        low, high = torch.aminmax(input_ids)
        if int(low) < 0 or int(high) >= vocabulary:
            index = tuple(int(i) for i in ((input_ids < 0) | (input_ids >= vocabulary)).nonzero()[0])
            raise LabelError(
                f"input_ids has token id {int(input_ids[index])} at position {index}, outside the "
                f"model's vocabulary of {vocabulary} (its input embedding's rows); token ids must be "
                f"in [0, {vocabulary})"
            )


def unpatch(model: ModelT) -> ModelT:
    """Undo :func:`patch`: remove its hooks, so ``model`` builds its logits again. Returns ``model``;
    a model that is not patched is returned unchanged (a PEFT model: its base model unpatched)."""
    base = _base_model(model)
    patched: _Patch | None = vars(base).get(_ATTRIBUTE)
    if patched is not None:
        patched.remove()
        delattr(base, _ATTRIBUTE)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` applies to ``model`` now (a PEFT model: to its base model)."""
    return isinstance(vars(_base_model(model)).get(_ATTRIBUTE), _Patch)


def _refuse_prompt_learning(model: nn.Module) -> None:
    """A PEFT model of a prompt-learning method (prompt tuning, prefix tuning, P-tuning) is a
    ValueError: its wrapper's forward adds virtual tokens (or a key-value prefix) that running
    the base model's decoder, as :func:`token_log_probs` does, would skip in silence."""
    config = getattr(model, "active_peft_config", None) if hasattr(type(model), "get_base_model") else None
    if getattr(config, "is_prompt_learning", False) is True:
        method = getattr(getattr(config, "peft_type", None), "value", type(config).__name__)
        raise ValueError(
            f"model is a PEFT model of the prompt-learning method {method}, whose forward adds "
            "virtual tokens that token_log_probs (which runs the base model's decoder) would skip: "
            "not supported; take log-probabilities of model(...).logits with "
            "xentkit.torch.log_probs, or train with patch(model)"
        )


def _head_pre_hooks(name: str, head: nn.Module, rows: Tensor, patched: Any) -> Tensor:
    """lm_head's input after its forward pre-hooks, for what reads lm_head's weight without
    calling it (:func:`token_log_probs`; the patch's loss hook runs after them as a pre-hook
    itself). ``patched``: the model's patch, whose own hooks are skipped. A forward hook (on the
    output, which is never built) is refused: it would change nothing in silence."""
    own = set() if patched is None else {handle.id for handle in patched.head_handles}
    with_kwargs = getattr(head, "_forward_pre_hooks_with_kwargs", {})
    for hook_id, hook in list(head._forward_pre_hooks.items()):
        if hook_id in own:
            continue
        if hook_id in with_kwargs:
            result = hook(head, (rows,), {})
            if result is not None:
                args, kwargs = result
                if kwargs:
                    raise RuntimeError(
                        f"{name}'s lm_head has a forward pre-hook ({_hook_names([hook])}) that adds "
                        f"keyword arguments ({', '.join(kwargs)}); xentkit reads lm_head's weight "
                        "without calling its forward, so they would change nothing: remove it"
                    )
                rows = args[0]
        else:
            result = hook(head, (rows,))
            if result is not None:
                rows = result[0] if isinstance(result, tuple) else result
    others = [hook for hook_id, hook in head._forward_hooks.items() if hook_id not in own]
    if others:
        raise RuntimeError(
            f"{name}'s lm_head has a forward hook ({_hook_names(others)}); token_log_probs reads "
            "lm_head's weight without building its output, so the hook would change none of the "
            "log-probabilities: remove it, or take them from model(...).logits with "
            "xentkit.torch.log_probs"
        )
    return rows


def _head_input(name: str, head: nn.Module, hidden: Tensor) -> Tensor:
    """lm_head's input as its forward would use it, for what reads lm_head's weight without
    calling its forward (the patch's loss hook, :func:`token_log_probs`). A ``forward`` replaced
    on the head itself (accelerate's ``add_hook_to_module``, which ``dispatch_model`` uses for a
    ``device_map``) would be bypassed: accelerate's ``AlignDevicesHook`` that only moves the
    input to its execution device (no offload, no ``no_grad``) is reproduced here; any other is
    refused, and so is a weight still on the meta device (an offloaded model)."""
    if head.weight.is_meta:
        raise RuntimeError(
            f"{name}'s lm_head.weight is on the meta device when lm_head is called: an "
            "offloaded model (accelerate's cpu_offload, a device_map with offload) loads it "
            "inside lm_head's forward, which xentkit does not call (it reads the weight); such "
            "models are not supported: unpatch the model (xentkit.integrations.transformers.unpatch)"
        )
    if "forward" not in vars(head):
        return hidden
    hook = getattr(head, "_hf_hook", None)
    if _moves_input_only(hook):
        device = hook.execution_device
        return hidden if device is None else hidden.to(device)
    wrapper = type(hook).__name__ if hook is not None else getattr(vars(head)["forward"], "__qualname__", "a function")
    raise RuntimeError(
        f"{name}'s lm_head has its forward replaced ({wrapper}, e.g. by accelerate's "
        "add_hook_to_module); xentkit reads lm_head's weight without calling that forward, so it "
        "would change none of the result: remove it (or, for training, unpatch the model: "
        "xentkit.integrations.transformers.unpatch)"
    )


def _moves_input_only(hook: object) -> bool:
    """Whether ``hook`` is accelerate's ``AlignDevicesHook`` (the exact class) doing nothing to
    lm_head's input but moving it to its execution device: no offloaded weights, with gradients."""
    if hook is None or type(hook).__name__ != "AlignDevicesHook":
        return False
    from accelerate.hooks import AlignDevicesHook

    return type(hook) is AlignDevicesHook and not hook.offload and not hook.no_grad


def _class_path(value: object) -> str:
    """``value``'s class with its module (a PEFT ``Linear`` is not torch's)."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _hook_names(hooks: list[Any]) -> str:
    return ", ".join(getattr(hook, "__qualname__", type(hook).__name__) for hook in hooks)


def _same_or_cast(logits: object, head_output: Tensor | None) -> bool:
    """Whether the model's ``logits`` are lm_head's output unchanged, or only cast to another
    dtype (mixed-precision wrappers such as accelerate's ``convert_outputs_to_fp32`` turn the
    half-precision logits into float32 inside the model call): that changes no loss. Anything
    else (a scale, a softcap) would: the caller refuses it."""
    if logits is head_output:
        return True
    if not isinstance(logits, Tensor) or head_output is None or logits.shape != head_output.shape:
        return False
    if logits.grad_fn is None:  # no graph to follow (no_grad): a change of dtype alone
        return head_output.grad_fn is None and logits.dtype != head_output.dtype
    node = logits.grad_fn
    return type(node).__name__ == "ToCopyBackward0" and node.next_functions[0][0] is head_output.grad_fn
