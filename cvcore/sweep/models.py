"""The sweep's models (PyTorch): the paper's dense network, a small conv net, or a user's
factory; and the two initialisations (the framework's default, the paper's Flax-style)."""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any

from cvcore.errors import InputError, ModelError

#: Flax's truncated-normal correction: the std of a standard normal truncated to [-2, 2].
TRUNCATED_STD = 0.87962566103423978


def activation(name: str) -> Any:
    from torch import nn

    table = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
             "silu": nn.SiLU, "elu": nn.ELU, "softplus": nn.Softplus, "identity": nn.Identity}
    return table[name]()


def dense(*, in_features: int, out_features: int, width: int, depth: int,
          activation_name: str = "relu", bias: bool = True) -> Any:
    """``depth`` × [Linear(width) → activation] → Linear(out): the paper's dense network."""
    from torch import nn

    layers: list[Any] = []
    fan_in = in_features
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width, bias=bias), activation(activation_name)]
        fan_in = width
    layers.append(nn.Linear(fan_in, out_features, bias=bias))
    return nn.Sequential(*layers)


def conv(*, in_features: int, out_features: int, width: int, depth: int,
         activation_name: str = "relu", kernel_size: int = 3,
         image_shape: list[int] | None = None) -> Any:
    """``depth`` × [Conv2d(width, k, same padding) → activation] → global mean → Linear(out).

    Flat inputs are reshaped to ``image_shape`` (default: one square channel, as digits'
    64 features are an 8×8 image).
    """
    from torch import nn

    if image_shape is None:
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise InputError(f"[model] image_shape: expected [channels, height, width] for "
                             f"{in_features} features that are not a square image, got nothing")
        image_shape = [1, side, side]
    if len(image_shape) != 3 or math.prod(image_shape) != in_features:
        raise InputError(f"[model] image_shape: expected [channels, height, width] with "
                         f"{in_features} values in all, got {image_shape!r}")
    layers: list[Any] = [nn.Unflatten(1, tuple(image_shape))]
    channels = image_shape[0]
    for _ in range(depth):
        layers += [nn.Conv2d(channels, width, kernel_size, padding="same"),
                   activation(activation_name)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_features)]
    return nn.Sequential(*layers)


def build_model(family: str, params: dict[str, Any], *, in_features: int,
                out_features: int) -> Any:
    """The cell's model: a built-in family or ``package.module:function`` called with the
    cell's parameters (and ``in_features`` / ``out_features`` when it takes them)."""
    if family in ("dense", "conv"):
        kw = dict(params)
        kw["activation_name"] = kw.pop("activation", "relu")
        maker = dense if family == "dense" else conv
        return maker(in_features=in_features, out_features=out_features, **kw)
    module_name, _, attr = family.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"[model] family: expected an importable factory "
                         f"'package.module:function', got {family!r} ({exc})") from None
    kwargs = dict(params)
    try:
        sig = inspect.signature(factory)
        takes_all = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        for key, value in (("in_features", in_features), ("out_features", out_features)):
            if takes_all or key in sig.parameters:
                kwargs.setdefault(key, value)
    except (TypeError, ValueError):
        pass
    model = factory(**kwargs)
    if not hasattr(model, "parameters"):
        raise ModelError(f"expected {family} to return a torch.nn.Module, got "
                         f"{type(model).__name__}")
    return model


def initialise(model: Any, scheme: str) -> None:
    """Re-draw every Linear and Conv weight (biases set to zero), from torch's global
    generator (seeded per cell); ``default`` leaves the framework's (or the family's own)
    initialisation.

    - ``flax``: Flax's default, LeCun normal (truncated normal on ±2σ, variance 1/fan_in);
    - ``xavier``: Glorot uniform (variance 2/(fan_in + fan_out));
    - ``kaiming``: He normal (variance 2/fan_in);
    - ``orthogonal``: an orthogonal matrix (rows or columns orthonormal, gain 1).
    """
    if scheme == "default":
        return
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if scheme == "flax":
                    fan_in = m.weight[0].numel()
                    std = math.sqrt(1.0 / fan_in) / TRUNCATED_STD
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
                elif scheme == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                elif scheme == "kaiming":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif scheme == "orthogonal":
                    nn.init.orthogonal_(m.weight)
                else:
                    raise InputError(f"[train] init: expected default, flax, xavier, kaiming "
                                     f"or orthogonal, got {scheme!r}")
                if m.bias is not None:
                    m.bias.zero_()
