"""Training-loop integrations: one file per library, each a thin layer over the Recorder.

``lightning`` (PyTorch Lightning ``Callback``), ``keras`` (Keras 3 ``Callback``, any
backend), ``huggingface`` (transformers ``TrainerCallback``), ``sb3`` (Stable-Baselines3
``BaseCallback``, actor and critic), ``jax`` (an Optax / Flax NNX loop) and
``tensorboard`` (scalars for loops without a trainer). Each module imports its library
only when a callback is built; a missing library is one line naming the install command.
These are training loops, not model families: those are ``cvcore.adapters``. Every
callback records the final model at the end of training; ``recording.record_final`` does it
for a plain loop.
"""
