"""Stable-Baselines3: a ``BaseCallback`` recording the actor's and the critic's kernels.

>>> from cvcore.integrations.sb3 import RecorderCallback   # doctest: +SKIP
>>> agent.learn(50_000, callback=RecorderCallback(obs_probe, sink="ppo.db"))  # doctest: +SKIP

The two heads of an on-policy actor-critic (PPO, A2C) are measured side by side as two
runs of the same store, ``"<name> actor"`` (action logits or means) and ``"<name> critic"``
(the value), tagged ``head``. Records are taken after each rollout, before the update it
feeds (step = policy updates so far, ``timesteps`` kept with the record) and once at the
end of training; ``every`` counts updates. The values also go to the agent's logger
(``cv/<head>/<probe set>/<variable>``), hence its TensorBoard and CSV outputs.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

import numpy as np

from cvcore.errors import InputError
from cvcore.integrations.common import PREFIX, require, scalars
from cvcore.record.probes import Part, ProbeSets
from cvcore.record.recorder import Recorder

INSTALL = "stable-baselines3"
HEADS = ("actor", "critic")
#: The probe set's name when observations come from the rollout buffer.
ROLLOUT = "rollout"


def rollout_observations(buffer: Any, n: int, rng: np.random.Generator) -> Any:
    """``n`` observations drawn without replacement from a filled rollout buffer."""
    obs = buffer.observations
    if isinstance(obs, dict):
        raise InputError("expected a rollout buffer of array observations, got a dict "
                         "observation space; pass fixed observations instead")
    # (steps, envs, *obs_shape) while collecting; flattened once training has read it
    flat = np.asarray(obs).reshape(-1, *buffer.obs_shape)
    if n > flat.shape[0]:
        raise InputError(f"expected rollout= at most {flat.shape[0]} (the rollout buffer's "
                         f"size), got {n}")
    return flat[np.sort(rng.choice(flat.shape[0], size=n, replace=False))]


@cache
def _build() -> type:
    callbacks = require("stable_baselines3.common.callbacks", INSTALL)

    class RecorderCallback(callbacks.BaseCallback):  # type: ignore[misc, name-defined]
        """Records an actor-critic's two kernels during ``learn``.

        Args:
            observations: a fixed probe of observations (batch first), or named sets of
                them; ``None`` with ``rollout=n``.
            rollout: measure on ``n`` observations drawn from the rollout buffer at each
                record (a generator of its own, seeded with ``seed``), instead of a fixed
                probe: the kernel then follows the states the policy visits.
            heads: which heads to record.
            name: the base name of the two runs (default: the time it started).
            prefix: the logged keys' prefix.
            **recorder_options: those of :class:`cvcore.Recorder` (``every``, ``sink``,
                ``variables``, ``tags``, ``seed``; ``subsets`` and ``labels`` only with a
                fixed probe).
        """

        def __init__(self, observations: Any = None, *, rollout: int | None = None,
                     heads: tuple[str, ...] = HEADS, name: str | None = None,
                     prefix: str = PREFIX, verbose: int = 0,
                     **recorder_options: Any) -> None:
            super().__init__(verbose)
            if (observations is None) == (rollout is None):
                raise InputError("expected fixed observations or rollout=n, got "
                                 + ("both" if rollout is not None else "neither"))
            if rollout is not None and (isinstance(rollout, bool)
                                        or not isinstance(rollout, int) or rollout < 1):
                raise InputError(f"expected rollout= a positive integer, got {rollout!r}")
            if rollout is not None and ({"subsets", "labels"} & set(recorder_options)):
                raise InputError("expected no subsets= or labels= with rollout= (each "
                                 "record draws its own observations), got them")
            unknown = sorted(set(heads) - set(HEADS))
            if not heads or unknown:
                raise InputError(f"expected heads among {list(HEADS)}, got {list(heads)}")
            if "output" in recorder_options:
                raise InputError("expected heads= to choose the kernels, got output=")
            self.heads, self.rollout, self.prefix = tuple(heads), rollout, prefix
            self.rng = np.random.default_rng(recorder_options.get("seed", 0))
            self.name = name or time.strftime("run %Y-%m-%d %H:%M:%S")
            self.options = recorder_options
            self.recorders: dict[str, Recorder] = {}
            if observations is not None:
                self._open(observations)
            self._updates = 0

        def _open(self, probe: Any) -> None:
            tags = dict(self.options.pop("tags", None) or {})
            if self.rollout is not None:
                tags["probe"] = f"{self.rollout} observations of each rollout"
            for head in self.heads:
                self.recorders[head] = Recorder(probe, output=head, name=f"{self.name} {head}",
                                                tags={**tags, "head": head}, **self.options)

        def _record(self, step: int) -> None:
            if self.recorders and not next(iter(self.recorders.values())).due(step):
                return
            if self.rollout is not None:
                obs = rollout_observations(self.model.rollout_buffer, self.rollout, self.rng)
                if not self.recorders:
                    self._open(ProbeSets({ROLLOUT: obs}))
                for rec in self.recorders.values():  # a fresh probe, same size and name
                    rec.sets = {ROLLOUT: obs}
                    rec.parts = [Part(ROLLOUT, obs)]
            for head, rec in self.recorders.items():
                record = rec.record(step, self.model.policy, timesteps=int(self.num_timesteps))
                if record is not None:
                    for key, value in scalars(record, f"{self.prefix}/{head}").items():
                        self.logger.record(key, value)

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            self._record(self._updates)  # the weights that collected this rollout
            self._updates += 1

        def _on_training_end(self) -> None:
            if self._updates:
                self._record(self._updates)
                self.logger.dump(self.num_timesteps)  # the last update is never dumped else
            for rec in self.recorders.values():
                rec.close()

    return RecorderCallback


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
