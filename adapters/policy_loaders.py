"""Reading RL agents and their observations: SB3 ``.zip`` archives, Gymnasium roll-outs.

An SB3 archive is read with SB3's own ``load``. Its ``data`` entry is JSON in which the
policy class, the observation and action spaces, the learning-rate and clip-range
schedules (and any other object that is not plain JSON) are cloudpickled: unpickling
them imports modules and can run arbitrary code, so the loader refuses the file without
``--trust`` (``LoadOptions.trust``), and nothing from it is unpickled before that check.
Its ``.pth`` entries (weights, optimizer state) are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cvcore.errors import InputError, ModelError, UntrustedFileError
from cvcore.imports import require
from cvcore.protocols import LoadedModel, LoadOptions

#: Algorithms the loader picks from the saved hyper-parameters (keys of ``data``).
ALGORITHMS = ("PPO", "A2C", "DQN")
#: Observations rolled out when ``--samples`` is not given.
DEFAULT_ROLLOUT = 256


def _names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return []


def algorithm_of(path: Path) -> str:
    """The SB3 algorithm that saved ``path``, read from the plain-JSON keys of its
    ``data`` entry (nothing is unpickled)."""
    try:
        with zipfile.ZipFile(path) as zf:
            data = json.loads(zf.read("data").decode("utf-8"))
    except (KeyError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{path}: expected a Stable-Baselines3 archive with a JSON 'data' "
                         f"entry, got {exc}") from None
    if "clip_range" in data:
        return "PPO"
    if "exploration_initial_eps" in data or "target_update_interval" in data:
        return "DQN"
    if "gae_lambda" in data and "n_steps" in data:
        return "A2C"
    policy = data.get("policy_class", {})
    module = policy.get("__module__", "?") if isinstance(policy, dict) else "?"
    raise InputError(f"{path}: expected an archive of one of {list(ALGORITHMS)}, got one "
                     f"saved with a policy from {module}")


@dataclass(frozen=True)
class StableBaselinesLoader:
    """Stable-Baselines3 ``.zip`` archives (PPO, A2C, DQN), read with SB3's own loader;
    needs ``--trust`` (see the module's docstring for what that loader executes)."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "stable-baselines3"
    extra: str = "adapters"
    library: str = "stable_baselines3"
    extensions: tuple[str, ...] = (".zip",)

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("stable_baselines3") is not None

    def sniff(self, path: Path) -> bool:
        names = _names(path) if path.is_file() else []
        return "_stable_baselines3_version" in names or {"data", "policy.pth"} <= set(names)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        if not self.sniff(path):
            raise InputError(f"{path}: expected a Stable-Baselines3 .zip archive, got other content")
        algorithm = algorithm_of(path)
        if not options.trust:
            raise UntrustedFileError(
                f"{path}: expected --trust to read a Stable-Baselines3 archive, got none; SB3's "
                "loader unpickles the saved policy class, spaces and schedules, which can run "
                "code: pass --trust only for a file you made yourself")
        stable_baselines3 = require("stable_baselines3", "adapters", name="stable-baselines3")
        cls = getattr(stable_baselines3, algorithm)
        try:
            agent = cls.load(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any broken archive becomes one line
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{path}: expected a readable {algorithm} archive, got {first}") from None
        return LoadedModel(model=agent, backend="torch", info={"algorithm": algorithm})


def _env_id(spec: str) -> str:
    return spec.split(":", 1)[1]


def _actor(model: Any) -> Any:
    """``obs (one, unbatched) -> action``: SB3's deterministic ``predict``, or for a module
    returning ``(logits, value)``, the most likely action (discrete) or the mean
    (continuous, clipped to the action space)."""
    from cvcore.adapters.policies import sb3_policy

    if sb3_policy(model) is not None:
        return lambda obs, space: model.predict(obs, deterministic=True)[0]
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"expected an SB3 agent or a torch.nn.Module to roll out, got "
                         f"{type(model).__name__}")
    ref = next(iter(model.parameters()))

    def act(obs: Any, space: Any) -> Any:
        from gymnasium import spaces

        x = torch.as_tensor(np.asarray(obs)[None], dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            out = model(x)
        logits = (out[0] if isinstance(out, (tuple, list)) else out)[0].cpu().numpy()
        if isinstance(space, spaces.Discrete):
            return int(np.argmax(logits))
        return np.clip(logits, space.low, space.high).astype(space.dtype)

    return act


@dataclass(frozen=True)
class EnvRolloutLoader:
    """``env:ID``: observations rolled out by the measured policy in the Gymnasium
    environment ``ID``, deterministic actions, the environment seeded with ``seed``
    (episodes restart until ``samples`` observations, default 256, are collected)."""

    kind: Literal["data"] = "data"
    name: str = "gymnasium-env"
    library: str = "gymnasium"
    extra: str = "adapters"
    needs_model: bool = True

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("gymnasium") is not None

    def claims(self, spec: str) -> bool:
        return spec.startswith("env:") and not Path(spec).exists()

    def load(self, spec: str, key: str | None) -> Any:
        raise InputError(f"{spec}: expected a policy to roll out, got none")

    def load_from_model(self, spec: str, model: Any, *, samples: int | None, seed: int,
                        family: str | None = None) -> Any:
        gymnasium = require("gymnasium", "adapters")

        n = DEFAULT_ROLLOUT if samples is None else samples
        if n < 1:
            raise InputError(f"expected --samples of at least 1, got {n}")
        try:
            env = gymnasium.make(_env_id(spec))
        except Exception as exc:  # noqa: BLE001 - unknown ids, missing extras: one line
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{spec}: expected a Gymnasium environment id such as "
                             f"'env:CartPole-v1', got {first}") from None
        space = getattr(getattr(model, "policy", model), "observation_space", None)
        want, got = getattr(space, "shape", None), env.observation_space.shape
        if want is not None and got is not None and tuple(want) != tuple(got):
            env.close()
            raise InputError(f"{spec}: expected an environment with observations of shape "
                             f"{tuple(want)} (the policy's), got {tuple(got)}")
        act = _actor(model)
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        seen: list[Any] = []
        try:
            while len(seen) < n:
                seen.append(np.asarray(obs))
                obs, _, terminated, truncated, _ = env.step(act(obs, env.action_space))
                if terminated or truncated:
                    obs, _ = env.reset()
        finally:
            env.close()
        out = np.stack(seen)
        return out.astype(np.float32) if np.issubdtype(out.dtype, np.floating) else out
