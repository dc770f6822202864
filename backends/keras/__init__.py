"""The TensorFlow / Keras backend, one job per module (as ``backends/torch_*`` and
``backends/jax/``):

* ``backend``: :class:`KerasBackend`, the class the plugin registers;
* ``setup``: frameworks, model kinds, inputs, outputs, devices, the float64 scope;
* ``recast``: a Keras model re-created in another dtype;
* ``jacobian``: per-sample Jacobians (GradientTape, ``torch.func``) and the kernel;
* ``module``: ``tf.Module`` and SavedModel engines;
* ``diagonal``: ``K_ii`` without the kernel;
* ``structured``: Keras on JAX through the JAX backend's engines;
* ``quiet``: TensorFlow's log noise silenced during a measurement;
* ``loaders``: ``.keras``, SavedModel and ``.h5`` checkpoint loaders.

Importing this package imports neither TensorFlow nor Keras; the plugin's hooks are in
``cvcore.backends.tf_plugin`` (the ``tensorflow`` entry point).
"""
