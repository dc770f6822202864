"""pytest configuration: the atheris harness under fuzz/ is a script, not a test module."""

collect_ignore = ["fuzz"]
