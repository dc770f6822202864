"""Reading Hugging Face models and texts: ``save_pretrained`` directories and ``.txt`` files.

A directory is loaded with ``from_pretrained`` (local files only, ``trust_remote_code``
off, so no code from the directory runs): the class its ``config.json`` names in
``architectures`` (a class of the installed transformers), with the saved tokenizer when
the directory has one. A single ``.safetensors`` file with ``--model transformers:Class``
is loaded the same way, with the ``config.json`` beside it; transformers then maps the
file's key names to the class's (transformers 5 renamed many, ViT's attention among them).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cvcore.errors import InputError, UntrustedFileError
from cvcore.imports import require
from cvcore.protocols import LoadedModel, LoadOptions

#: Files a saved tokenizer leaves in its directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
#: The ``--model`` prefix that names a transformers class.
PREFIX = "transformers:"
#: Config keys that hold sizes and counts (``hidden_size``, ``num_hidden_layers``, ``n_embd``).
SIZE_KEY = re.compile(r"(^num_|^n_|_size$|_dim$|_layers$|_heads$|_positions$|^d_model$|^d_ff$)")



def _quiet(transformers: Any) -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def read_config(directory: Path) -> dict[str, Any]:
    """The directory's ``config.json`` as a dict."""
    path = directory / "config.json"
    if not path.is_file():
        raise InputError(f"{directory}: expected a Hugging Face config.json beside the weights, "
                         "got none; pass the save_pretrained directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: expected a JSON config, got {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object (a transformers config), got a JSON "
                         f"{type(config).__name__}")
    if "model_type" not in config:
        raise InputError(f"{path}: expected a transformers config with 'model_type', got "
                         f"keys {list(config)[:8]}")
    for key, value in config.items():
        if SIZE_KEY.search(key) and not _is_size(value):
            raise InputError(f"{path}: expected a non-negative integer for {key!r}, got "
                             f"{value!r:.60}")
    return config


def _is_size(value: Any) -> bool:
    """An integer size (or ``None``, or a list of them: ``image_size: [224, 224]``)."""
    if isinstance(value, (list, tuple)):
        return all(_is_size(v) for v in value)
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _load_errors() -> tuple[type[BaseException], ...]:
    """What ``from_pretrained`` raises for a malformed directory (one line each)."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, RuntimeError, TypeError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:
        pass
    return tuple(errors)


def _unsafe_pickle(directory: Path, exc: pickle.UnpicklingError) -> UntrustedFileError:
    """The refusal of a ``.bin`` weights file that names code (no advice to unpickle it)."""
    names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
    what = f"a pickle naming {', '.join(names)}" if names else "a pickle that is not weights only"
    return UntrustedFileError(
        f"{directory}: expected PyTorch .bin weights loadable without running code, got {what}; "
        "nothing was run. Convert the weights to safetensors (save_pretrained writes "
        "model.safetensors), or if you made this file yourself pass --trust to load it"
    )


def model_class(transformers: Any, name: str, where: str) -> Any:
    """The transformers class ``name``; never code from the checkpoint's directory."""
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise InputError(f"{where}: expected a PyTorch model class of transformers "
                         f"{transformers.__version__}, got {name!r} (remote code is never run)")
    return cls


def load_pretrained(directory: Path, cls_name: str | None, weights: Path | None = None,
                    trust: bool = False) -> Any:
    """``cls.from_pretrained(directory)`` offline, without remote code; with ``weights``,
    the tensors of that safetensors file instead of the directory's own. PyTorch ``.bin``
    weights are read with ``weights_only=True`` (by transformers), or, with ``trust``, by
    an unrestricted ``torch.load``."""
    transformers = require("transformers", "adapters")
    _quiet(transformers)
    config = read_config(directory)
    if cls_name is None:
        names = config.get("architectures") or []
        cls_name = names[0] if names else "AutoModel"
    cls = model_class(transformers, cls_name, str(directory)) if cls_name != "AutoModel" \
        else transformers.AutoModel
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    bin_weights = directory / "pytorch_model.bin"
    try:
        if weights is not None or (trust and bin_weights.is_file()
                                   and not (directory / "model.safetensors").is_file()):
            cfg = transformers.AutoConfig.from_pretrained(str(directory), **kwargs)
            if weights is not None:
                from safetensors.torch import load_file

                state = load_file(str(weights))
            else:  # the user vouched for the file
                state = require("torch").load(bin_weights, map_location="cpu", weights_only=False)
            return cls.from_pretrained(None, config=cfg, state_dict=state, local_files_only=True)
        return cls.from_pretrained(str(directory), **kwargs)
    except pickle.UnpicklingError as exc:
        raise _unsafe_pickle(directory, exc) from None
    except _load_errors() as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "ignore_mismatched_sizes" in str(exc):  # it points to a report that is not shown
            from cvcore.adapters.huggingface import mismatched_shapes

            first = mismatched_shapes(cls, directory, weights) or first
        raise InputError(f"{directory}: expected a save_pretrained directory {cls_name} can "
                         f"load, got {first}") from None


def load_tokenizer(directory: Path) -> Any | None:
    """The tokenizer saved in ``directory``, or ``None`` when there is none."""
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    transformers = require("transformers", "adapters")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                          trust_remote_code=False)
    except _load_errors() as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{directory}: expected a loadable saved tokenizer, got {first}") from None


@dataclass(frozen=True)
class HuggingFaceLoader:
    """``save_pretrained`` directories (config + safetensors), and safetensors files with
    ``--model transformers:Class``."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "huggingface"
    extra: str = "adapters"
    extensions: tuple[str, ...] = ()

    def available(self) -> bool:
        return importlib.util.find_spec("transformers") is not None

    def sniff(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file()

    def prefers(self, path: Path, options: LoadOptions) -> bool:
        """Ahead of the plain safetensors loader: a file with ``--model transformers:...``."""
        return path.is_file() and (options.model_factory or "").startswith(PREFIX)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        from cvcore.adapters.huggingface import attach_tokenizer

        factory = options.model_factory
        cls_name = factory[len(PREFIX):] if factory and factory.startswith(PREFIX) else None
        if path.is_dir():
            model = load_pretrained(path, cls_name, trust=options.trust)
            directory = path
        else:
            if path.suffix != ".safetensors":
                raise InputError(f"{path}: expected a save_pretrained directory or a "
                                 f".safetensors file with --model {PREFIX}Class, got "
                                 f"a {path.suffix or 'no-extension'} file")
            directory = path.parent
            if not (directory / "config.json").is_file():
                raise InputError(
                    f"{path}: expected a config.json beside the weights for --model {factory} "
                    "(a transformers class is built from its config), got none; pass the "
                    "save_pretrained directory, or a factory that builds the model from its config")
            model = load_pretrained(directory, cls_name, weights=path)
        tokenizer = load_tokenizer(directory)
        if tokenizer is not None:
            attach_tokenizer(model, tokenizer, options.max_length)
        info = {"tokenizer": tokenizer is not None, "class": type(model).__name__}
        return LoadedModel(model=model.eval(), backend="torch", info=info)


@dataclass(frozen=True)
class TextDataLoader:
    """Texts, one per line (``.txt``); blank lines are skipped. They are tokenized by the
    model's saved tokenizer when the model is measured."""

    kind: Literal["data"] = "data"
    name: str = "text"

    def claims(self, spec: str) -> bool:
        return Path(spec).suffix.lower() == ".txt"

    def load(self, spec: str, key: str | None) -> Any:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"{spec}: expected a text file, one text per line, got no such file")
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as exc:
            raise InputError(f"{spec}: expected UTF-8 text, got {exc.reason}") from None
        texts = [ln for ln in lines if ln]
        if not texts:
            raise InputError(f"{spec}: expected at least one non-blank line, got none")
        return np.asarray(texts)
