"""Auto-encoders and VAEs (PyTorch): the kernel of the reconstruction or of the latent code.

A model with ``encode`` and ``decode`` methods, or ``encoder`` and ``decoder`` submodules,
is recognised by type. Its code is ``encode(x)``; when that is a distribution, a
``(mean, ...)`` tuple or a mapping with a ``mean`` / ``mu`` / ``loc`` entry, the model is
variational and the code is the posterior mean, so no sampling noise enters the kernel.
``output="reconstruction"`` (the default) measures ``decode(code)``, ``output="latent"``
the code itself. With ``family="autoencoder"`` named, any module whose ``forward``
returns ``(reconstruction, latent, ...)`` is measured too (outputs 0 and 1), provided
that forward is deterministic in eval mode.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from cvcore.adapter_base import AdapterBase
from cvcore.errors import ModelError
from cvcore.protocols import OutputSelector

RECONSTRUCTION = "reconstruction"
LATENT = "latent"
MEAN_KEYS = ("mean", "mu", "loc")


def parts(model: Any) -> tuple[str, str] | None:
    """The attribute names of the encoder and decoder: ``("encode", "decode")`` for
    methods, ``("encoder", "decoder")`` for submodules, ``None`` when there are none."""
    import torch

    if callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None)):
        return "encode", "decode"
    if all(isinstance(getattr(model, n, None), torch.nn.Module) for n in ("encoder", "decoder")):
        return "encoder", "decoder"
    return None


def posterior_mean(code: Any) -> tuple[Any, bool]:
    """The latent code as one tensor, and whether the encoder was variational (gave a
    distribution, or its parameters with the mean first)."""
    import torch

    if isinstance(code, torch.Tensor):
        return code, False
    if isinstance(code, torch.distributions.Distribution):
        return code.mean, True
    dist = getattr(code, "latent_dist", None)  # diffusers' AutoencoderKL
    if dist is not None and isinstance(getattr(dist, "mean", None), torch.Tensor):
        return dist.mean, True
    if isinstance(code, Mapping):
        for key in MEAN_KEYS:
            if isinstance(code.get(key), torch.Tensor):
                return code[key], True
    if isinstance(code, (tuple, list)) and code and isinstance(code[0], torch.Tensor):
        return code[0], len(code) > 1
    raise ModelError(f"expected the encoder to return a tensor, a distribution, a (mean, ...) "
                     f"tuple or a mapping with one of {list(MEAN_KEYS)}, got "
                     f"{type(code).__name__}")


def _first_sample(model: Any, inputs: Any) -> Any:
    """The first input, as a tensor of the model's dtype and device."""
    import torch
    from cvcore.backends.torch.setup import as_inputs

    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = str(ref.device) if ref is not None else "cpu"
    x = as_inputs(inputs, dtype, device)
    return x[:1]


def _is_variational(model: Any, inputs: Any, names: tuple[str, str]) -> bool:
    import torch
    from cvcore.backends.torch.setup import training_mode

    with torch.no_grad(), training_mode(model, False):
        return posterior_mean(getattr(model, names[0])(_first_sample(model, inputs)))[1]


def _check_deterministic(model: Any, inputs: Any) -> None:
    import torch
    from cvcore.backends.torch.setup import training_mode

    x = _first_sample(model, inputs)
    with torch.no_grad(), training_mode(model, False):
        first, second = model(x), model(x)
    if not (isinstance(first, (tuple, list)) and len(first) >= 2):
        from cvcore.outputs import output_choices

        raise ModelError(f"expected {AutoEncoderAdapter.expects}, got a forward returning "
                         f"{output_choices(first)}")
    leaves = [(a, b) for a, b in zip(first, second) if isinstance(a, torch.Tensor)] \
        if isinstance(first, (tuple, list)) else [(first, second)]
    if not all(torch.equal(a, b) for a, b in leaves):
        raise ModelError("expected a forward that is deterministic in eval mode, got one whose "
                         "outputs change from call to call (a VAE sampling its latent?); give "
                         "the model encode() and decode() methods so the posterior mean is used")


def autoencoder_model(model: Any, names: tuple[str, str], which: str) -> Any:
    """A module whose ``forward(x)`` is the reconstruction ``decode(mean code)`` or the
    (mean) code."""
    import torch

    encode, decode = names

    class AutoEncoderOutput(torch.nn.Module):
        #: per-layer rows name the user's modules: ``ae.`` is left off (torch layers.py)
        cvcore_wraps = "ae"

        def __init__(self) -> None:
            super().__init__()
            self.ae = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z, _ = posterior_mean(getattr(self.ae, encode)(x))
            return z if which == LATENT else getattr(self.ae, decode)(z)

    return AutoEncoderOutput()


class AutoEncoderAdapter(AdapterBase):
    """For auto-encoders and VAEs: ``output="reconstruction"`` (default) or ``"latent"``;
    a VAE's code is its posterior mean. Inputs are the model's inputs, batch first."""

    name = "autoencoder"
    family = "autoencoder"
    library = "torch"
    extra = "torch"
    expects = ("a torch.nn.Module with encode()/decode() or encoder/decoder submodules, or "
               "whose forward returns (reconstruction, latent, ...)")

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    def accepts(self, model: object) -> bool:
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(model, torch.nn.Module):
            return False
        if type(model).__module__.split(".")[0] in ("transformers", "diffusers"):
            return False
        return parts(model) is not None

    def accepts_family(self, model: object) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(model, torch.nn.Module)

    def adapt(self, model: Any, inputs: Any, output: OutputSelector | None
              ) -> tuple[Any, Any, OutputSelector | None]:
        which = RECONSTRUCTION if output is None else output
        if which not in (RECONSTRUCTION, LATENT):
            return model, inputs, output  # an index, key or callable on the forward's output
        names = parts(model)
        if names is None:
            _check_deterministic(model, inputs)
            return model, inputs, 0 if which == RECONSTRUCTION else 1
        return autoencoder_model(model, names, str(which)), inputs, None

    def describe(self, model: Any, inputs: Any, output: OutputSelector | None) -> str:
        from cvcore.api import output_name

        which = RECONSTRUCTION if output is None else output
        if which not in (RECONSTRUCTION, LATENT):
            return output_name(output) or "model output"
        names = parts(model)
        if names is None:
            return f"{which} (forward output {0 if which == RECONSTRUCTION else 1})"
        if _is_variational(model, inputs, names):
            return ("reconstruction (posterior mean)" if which == RECONSTRUCTION
                    else "latent (posterior mean)")
        return "reconstruction" if which == RECONSTRUCTION else "latent code"
