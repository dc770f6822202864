"""Built-in framework backends (installed as ``cvcore.backends``)."""
