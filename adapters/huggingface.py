"""Hugging Face transformers: measure the ``logits`` field of the model's output."""

from __future__ import annotations

import sys
from typing import Any

from cvcore.protocols import OutputSelector


class HuggingFaceAdapter:
    """For ``transformers.PreTrainedModel``: inputs are the tokenizer's dict
    (``input_ids``, ``attention_mask``, ...), batch first; the output defaults to
    ``logits`` (for a causal LM that is every position × vocabulary: pass
    ``output=lambda out: out.logits[:, -1]`` for the last position only)."""

    name = "huggingface"
    family = "language"

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("transformers") is not None

    def accepts(self, model: object) -> bool:
        transformers = sys.modules.get("transformers")
        return transformers is not None and isinstance(model, transformers.PreTrainedModel)

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        return model, inputs, "logits" if output is None else output
