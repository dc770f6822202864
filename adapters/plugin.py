"""Built-in adapters, registered through ``cvcore_register_adapters`` like a plugin's."""

from __future__ import annotations

from collections.abc import Callable

from cvcore.hookspecs import hookimpl
from cvcore.protocols import Adapter, CheckpointLoader, DataLoader


@hookimpl
def cvcore_register_adapters(register: Callable[[Adapter], None]) -> None:
    from cvcore.adapters.autoencoders import AutoEncoderAdapter
    from cvcore.adapters.graphs import GraphAdapter
    from cvcore.adapters.huggingface import HuggingFaceAdapter
    from cvcore.adapters.policies import ModuleActorCriticAdapter, PolicyAdapter

    register(HuggingFaceAdapter())
    register(GraphAdapter())
    register(PolicyAdapter())
    register(ModuleActorCriticAdapter())
    register(AutoEncoderAdapter())


@hookimpl
def cvcore_register_loaders(register: Callable[[CheckpointLoader | DataLoader], None]) -> None:
    from cvcore.adapters.huggingface_loaders import HuggingFaceLoader, TextDataLoader
    from cvcore.adapters.policy_loaders import EnvRolloutLoader, StableBaselinesLoader

    register(HuggingFaceLoader())
    register(TextDataLoader())
    register(StableBaselinesLoader())
    register(EnvRolloutLoader())
