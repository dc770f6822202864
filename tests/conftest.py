"""Shared pytest configuration and fixtures for the suite.

The atheris harness under ``fuzz/`` is a script, not a test module, so it is not collected.
"""

from __future__ import annotations

import pytest

collect_ignore = ["fuzz"]

#: The built-in backends by their registry name, each with the library it needs. The
#: ``tensorflow`` backend runs Keras 3 models, whichever engine Keras itself runs on.
BACKEND_LIBRARIES = {"torch": "torch", "jax": "jax", "tensorflow": "keras"}


@pytest.fixture(params=list(BACKEND_LIBRARIES), ids=list(BACKEND_LIBRARIES))
def backend_name(request: pytest.FixtureRequest) -> str:
    """The registry name of one built-in backend; skipped where its library is missing.

    A test runs once per backend (ids ``torch``, ``jax``, ``tensorflow``); to run it on a
    few only, parametrize the fixture indirectly::

        @pytest.mark.parametrize("backend_name", ["torch", "jax"], indirect=True)
    """
    name: str = request.param
    pytest.importorskip(BACKEND_LIBRARIES[name])
    return name
