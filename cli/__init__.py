"""The ``cv`` command line (installed as ``cvcore.cli``)."""
