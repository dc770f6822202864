"""Hugging Face transformers (PyTorch): which output, which samples, and text as input.

The adapter (family ``"language"``) takes a ``transformers.PreTrainedModel`` and inputs as
the tokenizer's dict (``input_ids``, ``attention_mask``, ...), token ids (an integer
array, every position real), or texts (a NumPy array of strings, tokenized with the
tokenizer a loader attached, see :func:`attach_tokenizer`). It hands the backend a
:class:`cvcore.adapters.huggingface_head.LanguageHead` that reduces the model's output
with each sample's attention mask, so padding never enters the kernel.

``output=`` takes one of :data:`OUTPUTS` (defaults in :func:`default_output`), a callable
``f(raw, inputs)`` of two arguments (it gets the sample's inputs with its
``attention_mask``), or anything :func:`cvcore.outputs.select_output` takes, applied to the
raw output as is (then padding is the caller's business).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvcore.adapter_base import AdapterBase
from cvcore.errors import InputError
from cvcore.protocols import OutputSelector

#: The adapter's outputs, each with what it measures.
OUTPUTS = {
    "last": "logits at each sequence's last non-padded position",
    "positions": "logits (or hidden states) at every non-padded position, each a sample",
    "next-token": "log-probability of each sequence's last token given the ones before it",
    "sequence": "sequence log-likelihood, the sum of log p(x_t+1 | x_<=t) over the sequence",
    "pooled": "the pooler output",
    "cls": "the last hidden state at the first non-padded ([CLS]) position",
    "logits": "the head's logits",
}
#: Outputs per sample above which an exact traced kernel is slow (one backward pass each).
LARGE_OUTPUT = 1024
#: Class-name endings of heads with one logit vector per token.
TOKEN_HEADS = ("ForTokenClassification", "ForMaskedLM")


@dataclass(frozen=True)
class TextSettings:
    """How texts become inputs: the tokenizer and the longest sequence kept."""

    tokenizer: Any
    max_length: int | None = None


def attach_tokenizer(model: Any, tokenizer: Any, max_length: int | None = None) -> Any:
    """Let ``model`` take texts: ``cvcore.ntk(model, np.array(["a text", ...]))``."""
    model.cvcore_text = TextSettings(tokenizer, max_length)
    return model


def is_causal(model: Any) -> bool:
    """A decoder-only model that generates text (GPT-2, Llama, ``BertLMHeadModel``...)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def default_output(model: Any) -> str:
    """The output measured when none is named: ``last`` for causal LMs, ``positions``
    for token-level heads, ``pooled`` (or ``cls`` without a pooler) for bare encoders,
    ``logits`` for every other head (sequence and image classification, ...)."""
    if is_causal(model):
        return "last"
    name = type(model).__name__
    if name.endswith(TOKEN_HEADS):
        return "positions"
    if "For" not in name:
        return "pooled" if getattr(model, "pooler", None) is not None else "cls"
    return "logits"


def _has_lm_head(model: Any) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


def supported_outputs(model: Any) -> tuple[str, ...]:
    """The named outputs a model's head gives (in :data:`OUTPUTS` order).

    A language-model head (logits over the vocabulary at every position: ``last``,
    ``positions``, ``next-token``, ``sequence``); a token-level head (``last``,
    ``positions``); a sequence- or image-level head (``logits``, one vector per sample);
    a bare model without a head (hidden states: ``last``, ``positions``, ``cls``, and
    ``pooled`` when it has a pooler).
    """
    name = type(model).__name__
    if _has_lm_head(model):
        lm = ("last", "positions", "next-token", "sequence")
        # a sequence-to-sequence head keeps its default, the logits as they are
        return (*lm, "logits") if default_output(model) == "logits" else lm
    if name.endswith(TOKEN_HEADS):
        return ("last", "positions")
    if "For" in name:
        return ("logits",)
    pooled = ("pooled",) if getattr(model, "pooler", None) is not None else ()
    return ("last", "positions", *pooled, "cls")


def _head_kind(model: Any) -> str:
    """What a model's head returns, in the words of the refusal of an output it lacks."""
    name = type(model).__name__
    if _has_lm_head(model) or name.endswith(TOKEN_HEADS):
        return "a token-level head: its logits cover every position, padding included"
    if "For" in name:
        return "a sequence-level head: one logit vector per sample, no hidden states"
    return "a model without a head: hidden states, no logits"


def check_output(model: Any, kind: str) -> None:
    """Refuse a named output the model's head does not give, in one line naming the
    output, the head and the outputs it supports.

    Raises:
        InputError: ``kind`` is not among :func:`supported_outputs`.
    """
    supported = supported_outputs(model)
    if kind not in supported:
        raise InputError(f"expected output among {list(supported)} for {type(model).__name__} "
                         f"({_head_kind(model)}), got {kind!r}")


def describe_choice(kind: str, default: str) -> str:
    """The text echoed in every result, e.g. ``language:last (default) - logits at ...``."""
    tag = " (default)" if kind == default else ""
    return f"language:{kind}{tag} - {OUTPUTS.get(kind, 'a callable of (raw, inputs)')}"


def _vocab(model: Any) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", 0) or 0)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def tokenize(settings: TextSettings, texts: Any, model: Any) -> dict[str, np.ndarray]:
    """Texts to ``input_ids`` and ``attention_mask``, padded on the tokenizer's side.

    Sequences are cut at ``max_length`` (by default the model's position limit). The pad
    id is the tokenizer's (0 when it has none): it never enters the kernel.
    """
    tok = settings.tokenizer
    config = getattr(model, "config", None)
    limit = settings.max_length or getattr(config, "max_position_embeddings", None) \
        or getattr(config, "n_positions", None)
    lines = [str(t) for t in np.asarray(texts).reshape(-1)]
    encoded = tok(lines, truncation=limit is not None, max_length=limit, padding=False)
    seqs = [list(ids) for ids in encoded["input_ids"]]
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
        raise InputError(f"expected every text to give at least one token, got none for "
                         f"text {empty[0]} ({lines[empty[0]]!r})")
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    left = getattr(tok, "padding_side", "right") == "left"
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = s
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def model_inputs(model: Any, inputs: Any) -> Any:
    """Inputs as the model's keyword dict: texts are tokenized, token ids get a mask."""
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        inputs = np.asarray(inputs)
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO":
        settings = getattr(model, "cvcore_text", None)
        if settings is None:
            raise InputError(
                "expected token ids (an integer .npy / .pt array, or a dict with input_ids and "
                "attention_mask) for a model without a saved tokenizer, got texts"
            )
        return tokenize(settings, inputs, model)
    if isinstance(inputs, Mapping):
        out = dict(inputs)
        if "input_ids" in out and "attention_mask" not in out:
            out["attention_mask"] = np.ones(tuple(out["input_ids"].shape), dtype=np.int64)
        return out
    if hasattr(inputs, "dtype") and hasattr(inputs, "shape") and len(inputs.shape) == 2:
        if isinstance(inputs, np.ndarray):
            integer = inputs.dtype.kind in "iu"
        else:  # a torch tensor
            integer = not inputs.is_floating_point() and not inputs.is_complex()
        if integer:
            return {"input_ids": inputs, "attention_mask": np.ones(tuple(inputs.shape), np.int64)}
    return inputs


def expand_positions(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """One sample per non-padded position: each sequence repeated, with its position."""
    from cvcore.adapters.huggingface_head import POSITION_KEY

    from cvcore.data_io import take

    mask = _to_numpy(inputs["attention_mask"])
    rows, cols = np.nonzero(mask)
    out = take(dict(inputs), rows.astype(np.int64))
    out[POSITION_KEY] = cols.astype(np.int64)
    return dict(out)


def _check_lengths(inputs: Mapping[str, Any], kind: str) -> None:
    lengths = _to_numpy(inputs["attention_mask"]).sum(axis=1)
    short = np.nonzero(lengths < 2)[0]
    if short.size:
        raise InputError(f"expected sequences of at least 2 tokens for output={kind!r}, got "
                         f"{int(lengths[short[0]])} in sample {int(short[0])}")


def mismatched_shapes(cls: Any, directory: Any, weights: Any = None, shown: int = 3
                      ) -> str | None:
    """The weights whose shapes differ from what ``config.json`` describes, in words.

    transformers refuses such a directory with a message that points to a load report it
    logs (and cvcore keeps its logs quiet); this loads once more with
    ``ignore_mismatched_sizes`` to name the tensors. ``None`` when that does not say more.
    """
    kwargs: dict[str, Any] = {"local_files_only": True, "ignore_mismatched_sizes": True,
                              "output_loading_info": True}
    try:
        if weights is not None:
            import transformers
            from safetensors.torch import load_file

            config = transformers.AutoConfig.from_pretrained(str(directory),
                                                             local_files_only=True)
            _, info = cls.from_pretrained(None, config=config,
                                          state_dict=load_file(str(weights)), **kwargs)
        else:
            _, info = cls.from_pretrained(str(directory), trust_remote_code=False, **kwargs)
    except Exception:  # noqa: BLE001 - the caller keeps transformers' own message
        return None
    keys = sorted(info.get("mismatched_keys") or (), key=lambda k: str(k[0]))
    if not keys:
        return None
    listed = ", ".join(f"{key} {tuple(saved)} in the weights vs {tuple(built)} in config.json"
                       for key, saved, built in keys[:shown])
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return (f"{len(keys)} weight tensors of other shapes than config.json describes: "
            f"{listed}{more}; the weights and config.json come from different models")


class HuggingFaceAdapter(AdapterBase):
    """The ``language`` family: ``transformers.PreTrainedModel`` (PyTorch)."""

    name = "huggingface"
    family = "language"
    library = "transformers"
    extra = "adapters"

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("transformers") is not None

    def accepts(self, model: object) -> bool:
        transformers = sys.modules.get("transformers")
        return transformers is not None and isinstance(model, transformers.PreTrainedModel)

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        inputs = model_inputs(model, inputs)
        default = default_output(model)
        custom = None
        if output is None:
            kind = default
        elif isinstance(output, str) and output in OUTPUTS:
            kind = output
        elif callable(output) and _arity(output) >= 2:
            kind, custom = "custom", output
        else:
            return model, inputs, output  # applied to the raw output, as is
        causal = is_causal(model)
        if kind != "custom":
            check_output(model, kind)
        if kind in ("last", "positions", "next-token", "sequence", "cls") and (
                not isinstance(inputs, Mapping) or "input_ids" not in inputs):
            raise InputError(f"expected token inputs (input_ids) for output={kind!r}, got "
                             f"{type(inputs).__name__}")
        if kind in ("next-token", "sequence"):
            _check_lengths(inputs, kind)
        if kind == "positions":
            inputs = expand_positions(inputs)
        if kind in ("last", "positions") and _vocab(model) > LARGE_OUTPUT and \
                model.get_output_embeddings() is not None:
            warnings.warn(
                f"cvcore: {_vocab(model)} logits per sample cost {_vocab(model)} backward passes "
                "per sample for the exact traced kernel; --projections M (a sketched, unbiased "
                "estimate with its standard error) or output='next-token' are fast",
                stacklevel=3)
        from cvcore.adapters.huggingface_head import LanguageHead

        head = LanguageHead(model, kind, causal=causal, custom=custom,
                            description=describe_choice(kind, default))
        return head, inputs, None


def _arity(fn: Any) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
