"""The NTK of RL policies: a PPO actor-critic (two kernels) and a DQN Q-network.

Trains each agent for a few hundred steps on CartPole, saves it, then measures the saved
archive with the command line, on observations the policy rolls out itself:

    cv measure ppo.zip --family rl --trust --data env:CartPole-v1 --samples 64 --seed 0

(``--trust``: SB3's loader unpickles the archive's saved classes; only for files you made.)
Runs in seconds on a CPU; needs ``pip install 'cvcore[adapters]'``.

    python examples/rl_policy_kernel.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cvcore.cli.app import make_app
from stable_baselines3 import DQN, PPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="where to save the agents")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="cvcore-rl-"))
    out.mkdir(parents=True, exist_ok=True)
    small = {"net_arch": [32, 32]}
    ppo = PPO("MlpPolicy", "CartPole-v1", n_steps=128, batch_size=64, n_epochs=2, seed=0,
              device="cpu", policy_kwargs=small)
    ppo.learn(256)
    ppo.save(out / "ppo.zip")
    dqn = DQN("MlpPolicy", "CartPole-v1", learning_starts=64, buffer_size=2000, seed=0,
              device="cpu", policy_kwargs=small)
    dqn.learn(256)
    dqn.save(out / "dqn.zip")
    for name in ("ppo.zip", "dqn.zip"):
        make_app()(["measure", str(out / name), "--family", "rl", "--trust",
                    "--data", "env:CartPole-v1", "--samples", "64", "--seed", "0"],
                   prog_name="cv", standalone_mode=False)


if __name__ == "__main__":
    main()
