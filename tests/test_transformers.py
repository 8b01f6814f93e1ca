"""xentkit.integrations.transformers: a patched causal language model gives the unpatched model's
loss and gradients without building its logits. Tiny models built from configs with random weights
(2 layers, hidden size 32, vocabulary 1000); nothing is downloaded."""

from __future__ import annotations

import copy
import inspect
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.loss.loss_utils import LOSS_MAPPING  # noqa: E402

from xentkit._extras import MissingExtraError  # noqa: E402
from xentkit.integrations.transformers import (  # noqa: E402
    SUPPORTED_MODELS,
    is_patched,
    patch,
    token_log_probs,
    unpatch,
)

VOCABULARY = 1000
SOFTCAP = 2.0  # small beside the logits (|z| up to ~5 with these weights), so it matters
# float32: the loss and gradients are sums in another order than torch's, nothing more
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-6}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}
MODEL_TYPES = {
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "GlmForCausalLM": "glm",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "OlmoForCausalLM": "olmo",
    "Olmo2ForCausalLM": "olmo2",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "SmolLM3ForCausalLM": "smollm3",
    "Starcoder2ForCausalLM": "starcoder2",
}
THREE = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM"]
# newer transformers' ForCausalLMLoss takes shift_labels; older versions (4.46) ignore the argument
TAKES_SHIFT_LABELS = "shift_labels" in inspect.signature(LOSS_MAPPING["ForCausalLM"]).parameters


def tiny_model(name: str, seed: int = 0, **overrides):
    """A 2-layer model of class ``name`` with random weights, in eval mode (no dropout)."""
    if MODEL_TYPES[name] not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    settings = {
        "vocab_size": VOCABULARY, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "initializer_range": 0.2,  # logits of a few units, so that a softcap of 2 matters
    }
    if SUPPORTED_MODELS[name] == "softcap":
        settings |= {"final_logit_softcapping": SOFTCAP, "attn_implementation": "eager"}
    config = transformers.AutoConfig.for_model(MODEL_TYPES[name], **(settings | overrides))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert type(model).__name__ == name
    return model


def batch(rows: int = 3, length: int = 16, seed: int = 1) -> dict:
    """Token ids, an attention mask with left padding, and labels with -100 on the padding and on
    a prompt, as a data collator gives them."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCABULARY, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    input_ids[1, :5] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[2, :7] = -100  # a prompt without loss
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_gradients(model, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return output.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_training(reference, patched, **inputs) -> torch.Tensor:
    expected_loss, expected = loss_and_gradients(reference, **inputs)
    loss, gradients = loss_and_gradients(patched, **inputs)
    tolerance = TOLERANCE[torch.float32]
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    assert expected.keys() == gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    assert any(g.abs().max() > 1e-3 for g in expected.values())  # gradients that could be wrong
    return loss


def patched_copy(model):
    return patch(copy.deepcopy(model))


@pytest.mark.parametrize("name", sorted(SUPPORTED_MODELS))
def test_loss_and_every_gradient_match_unpatched(name: str) -> None:
    model = tiny_model(name)
    loss = assert_same_training(model, patched_copy(model), **batch())
    assert 5.0 < float(loss) < 12.0  # ≈ ln(1000) = 6.9 with random weights


def test_the_softcap_is_applied() -> None:
    model = tiny_model("Gemma2ForCausalLM")
    patched = patched_copy(model)
    uncapped = copy.deepcopy(model)
    uncapped.config.final_logit_softcapping = None
    inputs = batch()
    capped_loss = assert_same_training(model, patched, **inputs)
    with torch.no_grad():
        uncapped_loss = uncapped(**inputs).loss
    assert abs(float(capped_loss) - float(uncapped_loss)) > 0.05  # the softcap changes this loss


def test_the_bias_of_lm_head_gets_its_gradient() -> None:
    model = tiny_model("PhiForCausalLM")
    assert model.lm_head.bias is not None
    patched = patched_copy(model)
    assert_same_training(model, patched, **batch())
    assert patched.lm_head.bias.grad.abs().max() > 1e-3


@pytest.mark.parametrize("name", THREE)
def test_num_items_in_batch_divides_the_sum(name: str) -> None:
    model = tiny_model(name)
    patched = patched_copy(model)
    inputs = batch()
    mean = assert_same_training(model, patched, **inputs)
    counted = int((inputs["labels"][:, 1:] != -100).sum())
    num_items = torch.tensor(2 * counted)  # as if the batch were half of an accumulated step
    loss = assert_same_training(model, patched, **inputs, num_items_in_batch=num_items)
    torch.testing.assert_close(loss, mean * counted / (2 * counted), **TOLERANCE[torch.float32])
    as_int = assert_same_training(model, patched, **inputs, num_items_in_batch=2 * counted)
    torch.testing.assert_close(as_int, loss)


@pytest.mark.parametrize("name", THREE)
def test_shift_labels_and_ignore_index_from_the_call(name: str) -> None:
    model = tiny_model(name)
    patched = patched_copy(model)
    inputs = batch()
    labels = inputs["labels"]
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shift_labels[0, :4] = -100  # differs from what the labels would give: the call's wins
    shifted = assert_same_training(model, patched, **inputs, shift_labels=shift_labels)
    if TAKES_SHIFT_LABELS:
        with torch.no_grad():
            assert abs(float(shifted) - float(model(**inputs).loss)) > 1e-3
    relabelled = labels.masked_fill(labels < 200, 7)
    loss = assert_same_training(model, patched, **inputs | {"labels": relabelled}, ignore_index=7)
    with torch.no_grad():
        default_ignore = model(**inputs | {"labels": relabelled}).loss
    assert abs(float(loss) - float(default_ignore)) > 1e-3


def test_logits_to_keep_with_labels() -> None:
    model = tiny_model("LlamaForCausalLM")
    if not TAKES_SHIFT_LABELS or "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
        pytest.skip(f"transformers {transformers.__version__} has no logits_to_keep or shift_labels")
    patched = patched_copy(model)
    inputs = batch()
    kept = inputs["labels"][:, -4:].contiguous()
    assert_same_training(model, patched, **inputs, logits_to_keep=4, shift_labels=kept)
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM: the labels give 48 targets .* received 12 positions"):
        patched(**inputs, logits_to_keep=4)


def test_every_label_ignored_gives_zero_not_nan() -> None:
    model = tiny_model("LlamaForCausalLM")
    patched = patched_copy(model)
    inputs = batch() | {"labels": torch.full((3, 16), -100)}
    assert torch.isnan(model(**inputs).loss)  # transformers' mean over no token
    loss, gradients = loss_and_gradients(patched, **inputs)
    assert float(loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in gradients.values())


@pytest.mark.parametrize("name", THREE)
def test_lm_head_never_runs_on_the_sequence(name: str) -> None:
    model = tiny_model(name)
    patched = patched_copy(model)
    seen: dict[str, list[tuple[int, ...]]] = {"unpatched": [], "patched": []}
    for key, each in (("unpatched", model), ("patched", patched)):
        each.lm_head.register_forward_hook(lambda m, a, out, k=key: seen[k].append(tuple(out.shape)))
        loss_and_gradients(each, **batch())
    assert seen["unpatched"] == [(3, 16, VOCABULARY)]  # the hook sees the logits when they exist
    assert seen["patched"] == [(3, 0, VOCABULARY)]  # patched: lm_head multiplies zero positions


@pytest.mark.parametrize("name", THREE)
def test_the_output_is_transformers_own(name: str) -> None:
    model = tiny_model(name)
    patched = patched_copy(model)
    inputs = batch()
    expected = model(**inputs, use_cache=True)
    output = patched(**inputs, use_cache=True)
    assert type(output) is type(expected)
    assert output.logits is None and output.loss is not None
    assert [key for key in expected if key != "logits"] == list(output.keys())
    as_tuple = patched(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected.loss, **TOLERANCE[torch.float32])
    assert len(as_tuple) == len(model(**inputs, return_dict=False)) - 1  # no logits


@pytest.mark.parametrize("name", THREE)
def test_logits_requests_are_unchanged(name: str) -> None:
    model = tiny_model(name)
    patched = patched_copy(model)
    inputs = batch()
    without_labels = {k: v for k, v in inputs.items() if k != "labels"}
    expected = model(**without_labels).logits
    assert torch.equal(patched(**without_labels).logits, expected)
    with torch.no_grad():  # evaluation: labels and logits, as unpatched
        evaluated, reference = patched(**inputs), model(**inputs)
    assert torch.equal(evaluated.logits, reference.logits)
    assert torch.equal(evaluated.loss, reference.loss)
    prompt = inputs["input_ids"][:1, :6]
    generated = patched.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=5, do_sample=False))
    assert generated.shape == (1, 11)


def test_labels_passed_by_position() -> None:
    model = tiny_model("LlamaForCausalLM")
    patched = patched_copy(model)
    inputs = batch()
    # forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, ...)
    assert list(inspect.signature(type(model).forward).parameters)[6] == "labels"
    positional = (inputs["input_ids"], inputs["attention_mask"], None, None, None, inputs["labels"])
    output = patched(*positional)
    assert output.logits is None
    torch.testing.assert_close(output.loss, model(**inputs).loss, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("where", ["decoder", "lm_head"])
def test_a_step_cut_short_by_keyboard_interrupt_leaves_no_call_behind(where: str) -> None:
    """torch runs the model's always_call hook on Exception alone: after a KeyboardInterrupt
    in a labelled forward, the next call without labels got logits None and the old call's
    loss, generate raised, and a call after lm_head had run said it ran twice (a review,
    2026-12-07)."""
    model = tiny_model("LlamaForCausalLM")
    patched = patched_copy(model)
    inputs = batch()
    module = patched.model.layers[0] if where == "decoder" else patched.lm_head

    def interrupt(*_):
        raise KeyboardInterrupt

    # (on lm_head: a pre-hook registered after the patch's, which has counted the head's call)
    handle = module.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        patched(**inputs)
    handle.remove()
    output = patched(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert output.loss is None
    torch.testing.assert_close(output.logits, model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits)
    torch.testing.assert_close(patched(**inputs).loss, model(**inputs).loss, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_forward_called_within_a_patched_forward_leaves_the_outer_loss_whole(where: str) -> None:
    """A model that calls itself (a logits request under no_grad) before or after its lm_head:
    the inner call had taken the outer call's record (after: "called lm_head more than once";
    before, and after clearing it first for KeyboardInterrupt: the outer loss None, silently;
    a review, 2026-12-07). Each call gets its own."""
    model = tiny_model("LlamaForCausalLM")
    patched = patched_copy(model)
    inputs = batch()
    plain = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    forward, inside, inner_logits = patched.forward, [], []

    def calling_itself(*args, **kwargs):
        if inside:
            return forward(*args, **kwargs)
        inside.append(True)
        try:
            if where == "before":
                with torch.no_grad():
                    inner_logits.append(patched(**plain).logits)
            output = forward(*args, **kwargs)
            if where == "after":
                with torch.no_grad():
                    inner_logits.append(patched(**plain).logits)
            return output
        finally:
            inside.clear()

    patched.forward = calling_itself
    output = patched(**inputs)
    torch.testing.assert_close(output.loss, model(**inputs).loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(inner_logits[0], model(**plain).logits)
    # a labels dtype the pre-hook refuses leaves the next call as it would be
    with pytest.raises(TypeError, match="labels must hold token ids"):
        patched(**(inputs | {"labels": inputs["labels"].float()}))
    torch.testing.assert_close(patched(**inputs).loss, model(**inputs).loss, **TOLERANCE[torch.float32])


def test_unpatch_restores_the_model() -> None:
    model = tiny_model("Gemma2ForCausalLM")
    hooks_before = (len(model._forward_hooks), len(model._forward_pre_hooks), len(model.lm_head._forward_hooks))
    assert patch(model) is model and is_patched(model)
    assert patch(model) is model  # twice: one set of hooks
    assert len(model.lm_head._forward_pre_hooks) == 1
    assert unpatch(model) is model and not is_patched(model)
    assert (len(model._forward_hooks), len(model._forward_pre_hooks), len(model.lm_head._forward_hooks)) == hooks_before
    assert len(model.lm_head._forward_pre_hooks) == 0
    inputs = batch()
    assert model(**inputs).logits.shape == (3, 16, VOCABULARY)
    assert unpatch(model) is model  # not patched: unchanged


def test_the_patch_keeps_state_dict_and_training_copies() -> None:
    model = tiny_model("LlamaForCausalLM")
    keys = list(model.state_dict())
    patched = patched_copy(model)
    assert list(patched.state_dict()) == keys
    again = copy.deepcopy(patched)  # the copy's hooks belong to the copy
    assert is_patched(again)
    assert again(**batch()).logits is None


@pytest.mark.parametrize("name", THREE)
def test_one_trainer_step(name: str, tmp_path) -> None:
    model = tiny_model(name)
    patched = patched_copy(model)
    rows = batch(rows=4, length=16)
    dataset = [{key: value[i] for key, value in rows.items()} for i in range(4)]
    head_positions: list[int] = []
    patched.lm_head.register_forward_hook(lambda m, a, out: head_positions.append(out.shape[-2]))
    results = {}
    for key, each in (("unpatched", model), ("patched", patched)):
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path / key), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[],
            use_cpu=True, save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0,
        )
        trainer = transformers.Trainer(model=each, args=arguments, train_dataset=dataset)
        results[key] = trainer.train().training_loss
    assert head_positions == [0, 0]  # two micro-batches, lm_head never on the sequence
    assert 5.0 < results["patched"] < 12.0
    assert results["patched"] == pytest.approx(results["unpatched"], rel=1e-5)
    moved = 0.0
    original = tiny_model(name)  # the weights before the step
    for (key, value), after, before in zip(
        patched.named_parameters(), model.parameters(), original.parameters(), strict=True
    ):
        torch.testing.assert_close(value, after, **TOLERANCE[torch.float32], msg=lambda m, k=key: f"{k}: {m}")
        moved = max(moved, float((value - before).detach().abs().max()))
    assert moved > 1e-3  # the step changed the weights


def test_bfloat16_matches_to_its_precision() -> None:
    model = tiny_model("LlamaForCausalLM").to(torch.bfloat16)
    output = patched_copy(model)(**batch())
    assert output.loss.dtype == torch.float32  # as transformers' loss, computed in float32
    torch.testing.assert_close(output.loss, model(**batch()).loss, **TOLERANCE[torch.bfloat16])


class _MyLlama(transformers.LlamaForCausalLM):
    pass


def test_models_it_cannot_handle_raise_naming_the_class() -> None:
    config = tiny_model("LlamaForCausalLM").config
    with pytest.raises(ValueError, match=r"^model must be one of transformers' .*LlamaForCausalLM.*, got _MyLlama "):
        patch(_MyLlama(config))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCABULARY, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"got GPT2LMHeadModel \(from transformers\.models\.gpt2"):
        patch(gpt2)
    with pytest.raises(TypeError, match=r"^model must be a transformers PreTrainedModel .*got Linear$"):
        patch(torch.nn.Linear(2, 2))
    custom = tiny_model("LlamaForCausalLM")
    if type(custom).loss_function.fset is not None:
        custom.loss_function = LOSS_MAPPING["ForTokenClassification"]
    else:  # older transformers (4.46): the config names the loss
        custom.config.loss_type = "ForTokenClassification"
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM's loss_function must be transformers' ForCausalLMLoss, got 'ForTokenClassification'"):
        patch(custom)
    wrapped = tiny_model("LlamaForCausalLM")
    wrapped.lm_head = torch.nn.Sequential(wrapped.lm_head)
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM's lm_head must be a torch\.nn\.Linear, got torch\.nn\.modules\.container\.Sequential"):
        patch(wrapped)


def test_a_model_that_changes_its_logits_is_caught_at_the_first_step() -> None:
    patched = patch(tiny_model("LlamaForCausalLM"))
    forward = patched.forward

    def scaled(*args, **kwargs):  # a later version's forward that scales the logits
        output = forward(*args, **kwargs)
        output.logits = output.logits * 2.0
        return output

    patched.forward = scaled
    with pytest.raises(RuntimeError, match=r"^LlamaForCausalLM's forward changed lm_head's output"):
        patched(**batch())
    assert patched(**{k: v for k, v in batch().items() if k != "labels"}).logits is not None  # no leftover


def _halve(module, args, output):
    return output * 0.5


def _halve_in_place(module, args, output):
    output.mul_(0.5)


@pytest.mark.parametrize(
    ("name", "register", "before_patch"),
    [
        ("LlamaForCausalLM", lambda head: head.register_forward_hook(_halve), True),
        ("LlamaForCausalLM", lambda head: head.register_forward_hook(_halve_in_place), False),
        ("LlamaForCausalLM", lambda head: head.register_forward_hook(_halve, prepend=True), False),
        ("Gemma2ForCausalLM", lambda head: head.register_forward_hook(_halve), False),
    ],
)
def test_a_hook_that_changes_lm_heads_output_is_refused_not_bypassed(name, register, before_patch) -> None:
    """A review found each of these gave another loss than the unpatched model, silently: under
    the patch lm_head runs on zero positions, so a hook on it sees none of the logits."""
    model = tiny_model(name)
    handle = register(model.lm_head) if before_patch else None
    patch(model)
    handle = handle or register(model.lm_head)
    with pytest.raises(RuntimeError, match=rf"^{name}'s lm_head has a forward hook that changes its output \(_halve"):
        model(**batch())
    assert model(**{k: v for k, v in batch().items() if k != "labels"}).logits is not None  # logits requests run
    handle.remove()
    assert_same_training(tiny_model(name), model, **batch())


@pytest.mark.parametrize("before_patch", [True, False])
def test_a_pre_hook_on_lm_head_reaches_the_loss(before_patch: bool) -> None:
    """lm_head's input as its pre-hooks hand it on is what the loss is computed from, whenever
    they were registered (one registered after the patch was bypassed before)."""
    def scaled(module, args):
        return (args[0] * 1.5,)

    reference = tiny_model("LlamaForCausalLM")
    reference.lm_head.register_forward_pre_hook(scaled)
    model = tiny_model("LlamaForCausalLM")
    if before_patch:
        model.lm_head.register_forward_pre_hook(scaled)
    patch(model)
    if not before_patch:
        model.lm_head.register_forward_pre_hook(scaled)
    assert_same_training(reference, model, **batch())


def test_a_model_pre_hook_sees_the_labels_or_is_refused() -> None:
    def shifted_labels(module, args, kwargs):  # a hook that edits the labels of the call
        labels = kwargs["labels"].clone()
        labels[:, :4] = -100
        return args, {**kwargs, "labels": labels}

    reference = tiny_model("LlamaForCausalLM")
    reference.register_forward_pre_hook(shifted_labels, with_kwargs=True)
    before = tiny_model("LlamaForCausalLM")
    before.register_forward_pre_hook(shifted_labels, with_kwargs=True)
    assert_same_training(reference, patch(before), **batch())  # registered before: it runs first

    after = patch(tiny_model("LlamaForCausalLM"))
    after.register_forward_pre_hook(shifted_labels, with_kwargs=True)
    with pytest.raises(RuntimeError, match=r"^LlamaForCausalLM has a forward pre-hook registered after xentkit patched it \(.*shifted_labels\)"):
        after(**batch())
    assert_same_training(reference, patch(unpatch(after)), **batch())  # patched again: the hook first


def test_an_offloaded_head_is_refused_clearly() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = patch(tiny_model("LlamaForCausalLM"))
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"^LlamaForCausalLM's lm_head\.weight is on the meta device"):
        model(**batch())


@pytest.mark.parametrize("before_patch", [True, False])
def test_a_forward_replaced_by_accelerate_on_lm_head_is_reproduced_or_refused(before_patch: bool) -> None:
    """accelerate's add_hook_to_module replaces lm_head.forward on the instance, so its
    pre_forward runs after every torch hook, the patch's loss hook included. Its device hook
    (a device_map's) is reproduced; any other wrapper is refused, never bypassed (a hook doubling
    the input gave the loss 7.04 where the model's is 9.01, silently)."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Doubled(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return tuple(2 * a for a in args), kwargs

    def wrapped(model, hook):
        hooks.add_hook_to_module(model.lm_head, hook)
        return model

    for hook in (lambda: hooks.AlignDevicesHook(execution_device=torch.device("cpu")), Doubled):
        reference = wrapped(tiny_model("LlamaForCausalLM"), hook())
        model = wrapped(patch(tiny_model("LlamaForCausalLM")), hook()) if not before_patch else patch(
            wrapped(tiny_model("LlamaForCausalLM"), hook())
        )
        if hook is Doubled:
            with pytest.raises(RuntimeError, match=r"^LlamaForCausalLM's lm_head has its forward replaced \(Doubled"):
                model(**batch())
            assert_same_training(reference, unpatch(model), **batch())  # unpatched: the hook's loss
        else:
            assert_same_training(reference, model, **batch())
            assert model(**batch()).logits is None  # the patch ran

    model = patch(tiny_model("LlamaForCausalLM"))
    model.lm_head.forward = lambda hidden: 3 * torch.nn.functional.linear(hidden, model.lm_head.weight)
    with pytest.raises(RuntimeError, match=r"lm_head has its forward replaced \(.*<lambda>"):
        model(**batch())
    # token_log_probs reads lm_head's weight too: the same rule (a doubling hook gave log-probs
    # 6.9 off the model's own, silently)
    for hook in (hooks.AlignDevicesHook(execution_device=torch.device("cpu")), Doubled()):
        model = wrapped(tiny_model("LlamaForCausalLM"), hook)
        inputs = batch()
        if isinstance(hook, Doubled):
            with pytest.raises(RuntimeError, match=r"^LlamaForCausalLM's lm_head has its forward replaced \(Doubled"):
                token_log_probs(model, inputs["input_ids"])
            continue
        log_p = token_log_probs(model, inputs["input_ids"])
        logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
        want = torch.log_softmax(logits.float(), -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
        torch.testing.assert_close(log_p, want, rtol=1e-5, atol=1e-5)


def test_a_model_forward_hook_sees_the_patched_output_even_prepended() -> None:
    seen = []
    model = patch(tiny_model("LlamaForCausalLM"))
    model.register_forward_hook(lambda module, args, output: seen.append(output.loss), prepend=True)
    loss = model(**batch()).loss
    assert seen == [loss] and loss is not None


def test_changes_after_the_patch_are_followed_or_refused() -> None:
    # resize_token_embeddings of an untied model installs a new lm_head: the patch hooks it
    model = tiny_model("LlamaForCausalLM", tie_word_embeddings=False)
    patched = patched_copy(model)
    for m in (model, patched):
        torch.manual_seed(5)
        m.resize_token_embeddings(VOCABULARY + 8)
    inputs = batch()
    assert_same_training(model, patched, **inputs)
    assert patched(**inputs).logits is None  # still fused: no logits built
    assert patched(**{k: v for k, v in inputs.items() if k != "labels"}).logits.shape[-1] == VOCABULARY + 8
    # a head that is not a plain Linear any more, or another loss, cannot be reproduced: refused
    wrapped = patched_copy(tiny_model("LlamaForCausalLM"))
    wrapped.lm_head = torch.nn.Sequential(wrapped.lm_head)
    with pytest.raises(RuntimeError, match=r"^LlamaForCausalLM's lm_head was replaced .* by a torch\.nn\.modules\.container\.Sequential"):
        wrapped(**inputs)
    other = patched_copy(tiny_model("LlamaForCausalLM"))
    other.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(RuntimeError, match=r"^LlamaForCausalLM's loss_function was changed after"):
        other(**inputs)
    assert other(**{k: v for k, v in inputs.items() if k != "labels"}).logits is not None  # no leftover


def test_a_model_whose_head_was_replaced_copies_and_loads_before_its_next_step() -> None:
    """``resize_token_embeddings`` (untied) drops the hooked head; until the next step hooks the
    new one, ``copy.deepcopy`` and ``torch.load`` of a saved model raised a TypeError (a weak
    reference to the freed head, torch handles into its freed hook dicts): a review. The copies'
    patches hook their own new head on their first step, and train as the unpatched model."""
    import gc
    import io

    model = tiny_model("LlamaForCausalLM", tie_word_embeddings=False)
    patched = patched_copy(model)
    for m in (model, patched):
        torch.manual_seed(5)
        m.resize_token_embeddings(VOCABULARY + 8)
    gc.collect()
    copied = copy.deepcopy(patched)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    inputs = batch()
    for other in (copied, loaded, patched):
        assert is_patched(other) and other._xentkit_linear_cross_entropy_patch.head is None
        assert other(**inputs).logits is None  # fused: the new head hooked
        assert other._xentkit_linear_cross_entropy_patch.head is other.lm_head
        assert_same_training(model, other, **inputs)


def test_without_transformers_the_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'xentkit\[transformers\]'$"):
        patch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Qwen2ForCausalLM", "PhiForCausalLM"])
def test_token_log_probs_equal_log_softmax_of_the_logits(name):
    """RL's per-token log-probs and entropies from the hidden states equal those of the model's
    own logits, and so do every parameter's gradients; padding gives 0 and no gradient."""
    model = tiny_model(name)
    inputs = batch()
    mask = inputs["attention_mask"]
    temperature = 0.7
    log_p, entropy = token_log_probs(
        model, inputs["input_ids"], mask, temperature=temperature, return_entropy=True, chunk_size=5
    )
    weights = torch.randn(log_p.shape, generator=torch.Generator().manual_seed(2))
    (log_p * weights).sum().add(0.1 * entropy.sum()).backward()
    ours = {key: value.grad.clone() for key, value in model.named_parameters() if value.grad is not None}
    model.zero_grad()

    logits = model(input_ids=inputs["input_ids"], attention_mask=mask).logits[:, :-1] / temperature
    full = torch.log_softmax(logits.float(), dim=-1)
    scored = mask[:, 1:] == 1
    want = torch.where(scored, full.gather(-1, inputs["input_ids"][:, 1:, None])[..., 0], 0.0)
    want_entropy = torch.where(scored, -(full.exp() * full).sum(-1), 0.0)
    (want * weights).sum().add(0.1 * want_entropy.sum()).backward()
    torch.testing.assert_close(log_p, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy.detach(), rtol=1e-5, atol=1e-5)
    assert (log_p[~scored] == 0).all() and (log_p[scored] < 0).all()
    for key, value in model.named_parameters():
        if value.grad is not None:
            # gradients of up to ~100 here, summed in another order: float32 rounding of ~1e-6 of
            # the tensor's scale (a bias entry near 0 sums terms of that scale: 7e-5 off on one
            # machine's BLAS, against float64 where torch's own float32 is 2e-5 off)
            scale = value.grad.abs().max().item()
            torch.testing.assert_close(ours[key], value.grad, rtol=1e-4, atol=2e-5 + 2e-6 * scale, msg=key)


def test_token_log_probs_refuses_a_softcapping_model_and_bad_input():
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM soft-caps its logits"):
        token_log_probs(tiny_model("Gemma2ForCausalLM"), batch()["input_ids"])
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, sequence\] tensor"):
        token_log_probs(tiny_model("LlamaForCausalLM"), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids must hold integer token ids, got dtype float32"):
        token_log_probs(tiny_model("LlamaForCausalLM"), batch()["input_ids"].float())
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        token_log_probs(torch.nn.Linear(2, 2), batch()["input_ids"])


def test_token_log_probs_checks_its_options_before_the_decoder_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("LlamaForCausalLM")
    calls = []
    monkeypatch.setattr(model.model, "forward", lambda *args, **kwargs: calls.append(1))
    for options, error, message in (
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(return_entropy="yes"), TypeError, "return_entropy must be a bool"),
        (dict(attention_mask="mask"), TypeError, "attention_mask must be a tensor or None, got str"),
        (dict(attention_mask=torch.ones(3, 15)), ValueError, r"attention_mask must have input_ids' shape \(3, 16\), got \(3, 15\)"),
        (dict(attention_mask=torch.ones(3, 16, dtype=torch.complex64)), TypeError, "attention_mask must hold 1 .* got dtype complex64"),
    ):
        with pytest.raises(error, match=message):
            token_log_probs(model, batch()["input_ids"], **options)
    # token ids the embedding would refuse from inside torch (on a GPU a device-side assert, which
    # ends the CUDA context) are named here (a review)
    ids = batch()["input_ids"]
    vocabulary = model.get_input_embeddings().num_embeddings
    far, negative = ids.clone(), ids.clone()
    far[2, 5], negative[1, 0] = vocabulary, -1
    for input_ids, error, message in (
        (far, IndexError, rf"^input_ids has token id {vocabulary} at position \(2, 5\), outside the model's vocabulary of {vocabulary}"),
        (negative, ValueError, r"^input_ids has token id -1 at position \(1, 0\)"),
        (ids.to(torch.int8), TypeError, r"^input_ids must be int64 or int32 token ids .* got dtype int8$"),
        (ids.numpy(), TypeError, r"^input_ids must be a \[batch, sequence\] tensor of token ids, got an array of dtype int64"),
        (ids[:, :0], ValueError, r"at least one position, got shape \(3, 0\)$"),
        (ids.to("meta"), ValueError, "^input_ids is a meta tensor"),
    ):
        with pytest.raises(error, match=message):
            token_log_probs(model, input_ids)
    assert calls == []  # (a forward of a real model is what the early check saves)


@pytest.mark.parametrize("function", [patch, unpatch, is_patched, token_log_probs])
def test_what_is_not_a_model_is_named(function) -> None:
    arguments = (batch()["input_ids"],) if function is token_log_probs else ()
    # (a module that is not a model is not patched: unpatch returns it, is_patched says False)
    values = (None, "model") if function in (unpatch, is_patched) else (None, "model", torch.nn.Linear(2, 2))
    for value in values:
        with pytest.raises(TypeError, match=r"^model must be a transformers PreTrainedModel"):
            function(value, *arguments)


def test_token_log_probs_takes_a_peft_model() -> None:
    """GRPO and PPO with LoRA: the PEFT model itself is taken (it was a TypeError), and its
    adapters count: the log-probs differ from the base model's without them."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             init_lora_weights=False)
    torch.manual_seed(7)
    model = peft.get_peft_model(tiny_model("LlamaForCausalLM"), config)
    inputs = batch()
    log_p = token_log_probs(model, inputs["input_ids"], inputs["attention_mask"])
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    want = torch.log_softmax(logits.float(), -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    scored = inputs["attention_mask"][:, 1:] == 1
    torch.testing.assert_close(log_p[scored], want[scored], rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        plain = token_log_probs(model, inputs["input_ids"], inputs["attention_mask"])
    assert (plain[scored] - log_p[scored]).abs().max() > 1e-3
    log_p.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_mixed_precision_wrappers_that_cast_the_logits_are_no_change() -> None:
    """accelerate's bf16 mixed precision (what Trainer(bf16=True) uses) wraps forward in autocast
    and casts the logits to float32 inside the model call: a cast changes no loss, so the patched
    model trains; a change of values is still refused (test above)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    model = tiny_model("LlamaForCausalLM")
    AcceleratorState._reset_state(reset_partial_state=True)  # (an earlier Trainer set its own)
    try:
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        reference, patched = accelerator.prepare(copy.deepcopy(model), patched_copy(model))
        expected = reference(**batch()).loss
        loss = patched(**batch()).loss
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected, **TOLERANCE[torch.bfloat16])
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in patched.parameters())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_half_activations_beside_a_float32_head_under_autocast() -> None:
    """A bfloat16 body with a float32 ``lm_head`` in an autocast region trains unpatched (autocast
    casts ``F.linear``'s operands); patched it raised "must share one dtype". Now the fused loss
    takes autocast's casts too: the unpatched loss and gradients to bfloat16's precision."""
    model = tiny_model("LlamaForCausalLM").to(torch.bfloat16)
    model.lm_head.float()
    patched = patched_copy(model)
    results = []
    for each in (model, patched):
        each.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = each(**batch()).loss
        loss.backward()
        results.append((loss.detach(), each.lm_head.weight.grad, each.model.embed_tokens.weight.grad))
    (expected, *expected_grads), (loss, *grads) = results
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, **TOLERANCE[torch.bfloat16])
    assert grads[0].dtype == torch.float32  # the float32 head's gradient, through the cast
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_p = token_log_probs(patched, batch()["input_ids"])
    assert log_p.dtype == torch.float32 and bool(log_p.isfinite().all())


def test_a_dropped_patched_model_is_freed_without_the_cyclic_collector() -> None:
    """The patch's hooks (held by the model) hold the patch, which refers to the model weakly:
    dropping a patched model frees it at once, also where the cyclic garbage collector is off
    (training loops switch it off); copies and pickles still refer to their own model."""
    import gc
    import io
    import weakref

    model = patch(tiny_model("LlamaForCausalLM"))
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        state = other._xentkit_linear_cross_entropy_patch.__getstate__()
        assert state["_model"] is other and state["_head"] is other.lm_head
        assert other(**batch()).logits is None
    reference = weakref.ref(model)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model
        assert reference() is None
    finally:
        if enabled:
            gc.enable()

@pytest.mark.parametrize("explicit_shift", [False, True])
def test_a_bad_label_is_named_at_its_position_in_the_callers_labels(explicit_shift: bool) -> None:
    """A token id beyond the vocabulary: a LabelError (ValueError and IndexError, as torch's)
    naming the position in the call's labels (or shift_labels) and the vocabulary, where it named
    the flattened shifted position and linear_weight (a review); the model still trains after."""
    if explicit_shift and not TAKES_SHIFT_LABELS:
        pytest.skip("this transformers version ignores shift_labels")
    model = patch(tiny_model("LlamaForCausalLM"))
    inputs = batch()
    labels = inputs.pop("labels")
    bad = labels.clone()
    bad[1, 9] = VOCABULARY + 5
    shifted = torch.nn.functional.pad(bad, (0, 1), value=-100)[:, 1:]
    arguments = {"shift_labels": shifted, "labels": labels} if explicit_shift else {"labels": bad}
    where = "shift_labels has token id" if explicit_shift else "labels has token id"
    position = "(1, 8)" if explicit_shift else "(1, 9)"
    with pytest.raises(IndexError, match=rf"^LlamaForCausalLM: {where} {VOCABULARY + 5} at position \{position[:-1]}\), outside the model's vocabulary of {VOCABULARY} \(lm_head's rows\)"):
        model(**inputs, **arguments)
    assert torch.isfinite(model(**inputs, labels=labels).loss)


def test_token_log_probs_refuses_prompt_learning_peft_models() -> None:
    """Prompt and prefix tuning add virtual tokens in the PEFT wrapper's forward, which running the
    base model's decoder skipped: log-probs off by 2-4 and no gradient to the prompt (a review)."""
    peft = pytest.importorskip("peft")
    inputs = batch()
    for config in (
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    ):
        model = peft.get_peft_model(tiny_model("LlamaForCausalLM"), config)
        with pytest.raises(ValueError, match=r"^model is a PEFT model of the prompt-learning method (PROMPT|PREFIX)_TUNING"):
            token_log_probs(model, inputs["input_ids"], inputs["attention_mask"])


@pytest.mark.parametrize("patched", [False, True])
def test_token_log_probs_runs_lm_heads_pre_hooks_and_refuses_its_forward_hooks(patched: bool) -> None:
    """token_log_probs reads lm_head's weight without calling it: its forward pre-hooks (plain and
    with kwargs) now run on the hidden states, as the patch's loss sees them, and a forward hook
    (on an output never built) is refused; they were skipped in silence (a review: log p 2.1 off)."""
    torch.manual_seed(3)
    model = tiny_model("LlamaForCausalLM")
    model.lm_head.register_forward_pre_hook(lambda head, args: (args[0] * 1.5,))
    model.lm_head.register_forward_pre_hook(lambda head, args, kwargs: ((args[0] + 0.25,), kwargs), with_kwargs=True)
    inputs = batch()
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    want = torch.log_softmax(logits.float(), -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    if patched:
        patch(model)
    log_p = token_log_probs(model, inputs["input_ids"], inputs["attention_mask"])
    scored = inputs["attention_mask"][:, 1:] == 1
    torch.testing.assert_close(log_p[scored], want[scored], rtol=1e-5, atol=1e-5)
    model.lm_head.register_forward_hook(lambda head, args, output: output * 0.5)
    with pytest.raises(RuntimeError, match=r"lm_head has a forward hook \(\S*<lambda>\); token_log_probs reads"):
        token_log_probs(model, inputs["input_ids"], inputs["attention_mask"])



@pytest.mark.parametrize("patch_first", [True, False])
def test_a_peft_lora_model_trains_patched(patch_first: bool) -> None:
    """PEFT (LoRA) wraps the model; its wrappers call the base model as a module, so the patch's
    hooks run: the same loss and gradients as the unpatched PEFT model, without the logits.
    ``patch`` takes the PEFT model itself too (it patches the base model)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
        init_lora_weights=False,  # random B: the adapters change the loss
    )

    def wrapped(model):
        torch.manual_seed(7)  # the same adapters for both
        return peft.get_peft_model(model, config)

    reference = wrapped(tiny_model("LlamaForCausalLM"))
    if patch_first:
        model = wrapped(patch(tiny_model("LlamaForCausalLM")))
    else:
        model = wrapped(tiny_model("LlamaForCausalLM"))
        assert patch(model) is model
    assert is_patched(model) and is_patched(model.get_base_model())
    inputs = batch()
    output = model(**inputs)
    assert output.logits is None

    def adapters_step(model):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    (expected_loss, expected), (loss, gradients) = adapters_step(reference), adapters_step(model)
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE[torch.float32])
    assert gradients.keys() == expected.keys() and all("lora_" in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], **TOLERANCE[torch.float32])
    assert any(g.abs().max() > 1e-3 for g in expected.values())
    assert unpatch(model) is model and not is_patched(model)
    assert model(**inputs).logits is not None


def test_labels_that_are_not_token_ids_and_arguments_token_log_probs_cannot_use_are_named() -> None:
    """Floating or bool labels are a TypeError about labels (they reached linear_cross_entropy,
    which read floats as class probabilities and spoke of their shape); token_log_probs refuses
    the forward's arguments its decoder call would drop (logits_to_keep, labels) or break on
    (return_dict=False) (reviews)."""
    model = patch(tiny_model("LlamaForCausalLM"))
    inputs = batch()
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match=f"^labels must hold token ids .* got dtype {str(dtype).removeprefix('torch.')}$"):
            model(**(inputs | {"labels": inputs["labels"].to(dtype)}))
    for extra in ({"logits_to_keep": 1}, {"labels": inputs["labels"]}, {"return_dict": False}):
        with pytest.raises(TypeError, match=f"^token_log_probs takes no {next(iter(extra))}: "):
            token_log_probs(model, inputs["input_ids"], **extra)


def test_a_compiled_patched_model_trains_as_the_eager_one() -> None:
    """torch.compile of a patched model (its default mode; fullgraph=True cannot trace the hooks'
    handles): the same loss and gradients as eager, the logits never formed."""
    model = tiny_model("LlamaForCausalLM")
    eager = patched_copy(model)
    compiled = patched_copy(model)
    compiled.compile(backend="aot_eager")  # (nn.Module.compile: the call with its hooks)
    inputs = batch()
    expected_loss, expected = loss_and_gradients(eager, **inputs)
    compiled.zero_grad(set_to_none=True)
    output = compiled(**inputs)
    assert output.logits is None
    output.loss.backward()
    torch.testing.assert_close(output.loss.detach(), expected_loss, **TOLERANCE[torch.float32])
    for name, parameter in compiled.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], **TOLERANCE[torch.float32], msg=lambda m, n=name: f"{n}: {m}")


def test_threads_sharing_a_patched_model_keep_their_own_forwards() -> None:
    """Threads share a patched model (a server's threads; nn.DataParallel's replicas share its
    hooks): each forward's labels stay its own. A review forced this interleaving, thread B
    entering its forward while A waited in one: with one record per model A's loss had come from
    B's labels and B's was None."""
    import threading

    model = tiny_model("LlamaForCausalLM")
    patch(model)
    ids = {"A": batch(seed=1)["input_ids"], "B": batch(seed=2)["input_ids"]}
    want = {name: model(value, labels=value).loss.item() for name, value in ids.items()}
    a_inside, release_a, a_done = threading.Event(), threading.Event(), threading.Event()

    def hold(module, args):
        name = threading.current_thread().name
        if name == "A":
            a_inside.set()
            release_a.wait(10)
        elif name == "B":
            release_a.set()
            a_done.wait(10)

    handle = model.model.embed_tokens.register_forward_pre_hook(hold)
    got = {}

    def run(name, depth):  # (B from a deeper stack: the depth bookkeeping is per thread too)
        if depth:
            return run(name, depth - 1)
        got[name] = model(ids[name], labels=ids[name]).loss
        if name == "A":
            a_done.set()

    threads = [threading.Thread(target=run, args=("A", 0), name="A"), threading.Thread(target=run, args=("B", 20), name="B")]
    threads[0].start()
    assert a_inside.wait(10)
    threads[1].start()
    for thread in threads:
        thread.join(30)
    handle.remove()
    assert {name: loss.item() for name, loss in got.items()} == pytest.approx(want, rel=1e-6)
