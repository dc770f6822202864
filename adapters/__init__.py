"""Adapters for model families (installed as ``cvcore.adapters``)."""
