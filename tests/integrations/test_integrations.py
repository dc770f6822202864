"""What every training integration shares: importing one imports no library, a missing
library is the one install line, and the scalars handed to loggers."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from cvcore.errors import MissingFrameworkError
from cvcore.integrations.common import scalars
from cvcore.record.store import Record, Value

#: integration module -> (the library module it needs, the install command's package)
NEEDS = {"lightning": ("lightning.pytorch", "lightning"), "keras": ("keras", "keras"),
         "huggingface": ("transformers", "transformers"),
         "sb3": ("stable_baselines3.common.callbacks", "stable-baselines3")}
LIBRARIES = ["lightning", "keras", "transformers", "stable_baselines3", "tensorboardX",
             "torch", "jax", "tensorflow"]


def test_importing_the_integrations_imports_no_library():
    code = ("import sys, json\n"
            "import cvcore.integrations.lightning, cvcore.integrations.keras\n"
            "import cvcore.integrations.huggingface, cvcore.integrations.sb3\n"
            "import cvcore.integrations.jax, cvcore.integrations.tensorboard\n"
            f"print(json.dumps([m for m in {LIBRARIES!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_missing_library_is_one_install_line(name, monkeypatch):
    module_name, package = NEEDS[name]
    module = importlib.import_module(f"cvcore.integrations.{name}")
    for key in list(sys.modules):
        if key == module_name or key.startswith(module_name + "."):
            monkeypatch.delitem(sys.modules, key)
    monkeypatch.setitem(sys.modules, module_name, None)  # any import of it now fails
    with pytest.raises(MissingFrameworkError) as err:
        module._build.__wrapped__()  # past the cache of an earlier, successful build
    top = module_name.split(".")[0]
    assert str(err.value) == (f"{top} is required for this but is not installed; "
                              f"install it with: pip install {package}")


def test_jax_counter_missing_jax(monkeypatch):
    from cvcore.integrations.jax import compilations

    monkeypatch.setitem(sys.modules, "jax.monitoring", None)
    with pytest.raises(MissingFrameworkError, match="pip install jax$"), compilations():
        pass


def test_unknown_attribute_is_an_attribute_error():
    import cvcore.integrations.keras as k

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        k.Nope  # noqa: B018


def test_scalars_keys_classes_and_nan():
    record = Record(step=3, values=(
        Value("train", "trace", 4.0, label="1"), Value("train", "trace", 2.0, label="0"),
        Value("test", "entropy", float("nan")), Value("test", "trace", 1.5)))
    assert scalars(record, "x") == {"x/train/1/trace": 4.0, "x/train/0/trace": 2.0,
                                    "x/test/trace": 1.5}
