"""Stable-Baselines3: a ``BaseCallback`` recording the actor's and the critic's kernels
(or a DQN's Q-network).

>>> from cvcore.integrations.sb3 import RecorderCallback   # doctest: +SKIP
>>> agent.learn(50_000, callback=RecorderCallback(obs_probe, sink="ppo.db"))  # doctest: +SKIP

The two heads of an on-policy actor-critic (PPO, A2C) are measured side by side as two
runs of the same store, ``"<name> actor"`` (action logits or means) and ``"<name> critic"``
(the value), tagged ``head``; a DQN's online Q-network is one run, ``"<name> q"``. Records
are taken after each rollout, before the update it feeds (step = policy updates so far,
``timesteps`` kept with the record) and once at the end of training; ``every`` counts
updates. Each record keeps what SB3's logger shows of the updates so far: the loss
(``train/loss``) as the record's loss, and in its extras the mean episode reward of the
last 100 episodes (``episode_reward``) and every other ``train/...`` value
(``policy_gradient_loss``, ``value_loss``, ``entropy_loss`` ...). The values also go to
the agent's logger (``cv/<head>/<probe set>/<variable>``), hence its TensorBoard and CSV
outputs.

Graph networks are not SB3 policies: a graph probe (PyTorch Geometric ``Data``) is
refused when the callback is made.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

import numpy as np

from cvcore.errors import InputError
from cvcore.integrations.common import PREFIX, is_graph_probe, require, scalars
from cvcore.record.probes import Part, ProbeSets
from cvcore.record.recorder import Recorder

INSTALL = "stable-baselines3"
HEADS = ("actor", "critic", "q")
#: The heads of each kind of agent (:func:`cvcore.adapters.policies.sb3_policy`).
AGENT_HEADS = {"actor-critic": ("actor", "critic"), "q": ("q",)}
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
            heads: which heads to record (default: the agent's own, ``("actor",
                "critic")`` for PPO / A2C, ``("q",)`` for DQN; checked against the agent
                before the first step).
            name: the base name of the two runs (default: the time it started).
            prefix: the logged keys' prefix.
            **recorder_options: those of :class:`cvcore.Recorder` (``every``, ``sink``,
                ``variables``, ``tags``, ``seed``; ``subsets`` and ``labels`` only with a
                fixed probe).
        """

        def __init__(self, observations: Any = None, *, rollout: int | None = None,
                     heads: tuple[str, ...] | None = None, name: str | None = None,
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
            unknown = sorted(set(heads or ()) - set(HEADS))
            if heads is not None and (not heads or unknown):
                raise InputError(f"expected heads among {list(HEADS)}, got {list(heads)}")
            if "output" in recorder_options:
                raise InputError("expected heads= to choose the kernels, got output=")
            if observations is not None and is_graph_probe(observations):
                raise InputError("expected observations of an SB3 policy (arrays, batch "
                                 "first), got a graph (PyTorch Geometric); SB3 policies are "
                                 "not graph networks: record those with cvcore.Recorder or "
                                 "the Lightning callback")
            if observations is not None:  # every option checked now; nothing is written
                dry = {k: v for k, v in recorder_options.items()
                       if k not in ("sink", "tensorboard", "resume", "name")}
                Recorder(observations, **dry).close()
            self.heads = None if heads is None else tuple(heads)
            self.rollout, self.prefix = rollout, prefix
            self._probe = observations  # the runs are opened when learn() starts
            self.rng = np.random.default_rng(recorder_options.get("seed", 0))
            self.name = name or time.strftime("run %Y-%m-%d %H:%M:%S")
            self.options = recorder_options
            self.recorders: dict[str, Recorder] = {}
            self._updates = 0

        def _init_callback(self) -> None:
            """Called by ``learn`` before the first step: the heads against the agent."""
            from cvcore.adapters.policies import sb3_policy

            found = sb3_policy(self.model)
            if found is None:
                raise InputError(f"expected a PPO, A2C or DQN agent, got "
                                 f"{type(self.model).__name__}")
            own = AGENT_HEADS[found[1]]
            if self.heads is None:
                self.heads = own
            elif not set(self.heads) <= set(own):
                raise InputError(f"expected heads among {list(own)} for a "
                                 f"{type(self.model).__name__} agent, got {list(self.heads)}")
            if self.rollout is not None and getattr(self.model, "rollout_buffer", None) is None:
                raise InputError(f"expected fixed observations for "
                                 f"{type(self.model).__name__} (an off-policy agent keeps a "
                                 f"replay buffer, not a rollout buffer), got rollout={self.rollout}")
            if self._probe is not None and not self.recorders:
                self._open(self._probe)

        def _open(self, probe: Any) -> None:
            tags = dict(self.options.pop("tags", None) or {})
            if self.rollout is not None:
                tags["probe"] = f"{self.rollout} observations of each rollout"
            assert self.heads is not None
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
            loss, signals = training_signals(self.model)
            for head, rec in self.recorders.items():
                record = rec.record(step, self.model.policy, loss=loss,
                                    timesteps=int(self.num_timesteps), **signals)
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


def training_signals(agent: Any) -> tuple[float | None, dict[str, float]]:
    """What SB3's logger holds of the updates so far: ``train/loss`` (the loss), and the
    mean episode reward of the agent's episode buffer with every other ``train/...`` value
    (extras, named without the ``train/`` prefix)."""
    values = dict(getattr(agent.logger, "name_to_value", {}) or {})
    signals: dict[str, float] = {}
    for key, value in values.items():
        if key.startswith("train/") and key != "train/loss" and _number(value):
            signals[key[len("train/"):]] = float(value)
    episodes = list(getattr(agent, "ep_info_buffer", None) or [])
    if episodes:
        signals["episode_reward"] = float(np.mean([e["r"] for e in episodes]))
        signals["episode_length"] = float(np.mean([e["l"] for e in episodes]))
    loss: Any = values.get("train/loss")
    return (float(loss) if _number(loss) else None), signals


def _number(value: Any) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
