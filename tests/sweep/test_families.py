"""Choosing a family's adapter (by type or by name) and listing adapters in `cv backends`."""

from __future__ import annotations

from typing import Any

import pytest
from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore import plugins
from cvcore.errors import InputError, MissingFrameworkError
from cvcore.hookspecs import hookimpl


class MissingLibraryAdapter:
    name = "needs-missing"
    family = "imaginary"
    library = "no_such_library_for_cvcore"
    extra = "adapters"

    def available(self) -> bool:
        return False

    def accepts(self, model: object) -> bool:
        return False

    def adapt(self, model: Any, inputs: Any, output: Any) -> Any:
        return model, inputs, output


class Plugin:
    @hookimpl
    def cvcore_register_adapters(self, register: Any) -> None:
        register(MissingLibraryAdapter())


@pytest.fixture
def registered():
    plugin = Plugin()
    plugins.register(plugin, name="missing-library-adapter")
    yield
    plugins.unregister(plugin)


def test_backends_lists_each_adapter_with_its_library_and_install(registered) -> None:
    result = CliRunner().invoke(make_app(), ["backends"])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[2].strip(): line for line in result.stdout.splitlines()
             if line.count("│") > 5}
    assert "graph" in lines["torch-geometric"] and "torch_geometric" in lines["torch-geometric"]
    assert "rl" in lines["stable-baselines3"] and "autoencoder" in lines["autoencoder"]
    missing = lines["needs-missing"]
    assert "no_such_library_for_cvcore" in missing and " no " in missing
    # printed verbatim: rich would otherwise read "[adapters]" as markup and drop it
    assert "pip install 'cvcore[adapters]'" in missing


def test_named_family_with_its_library_missing_names_the_install(registered) -> None:
    with pytest.raises(MissingFrameworkError, match=r"pip install 'cvcore\[adapters\]'"):
        plugins.select_adapter(object(), family="imaginary")


def test_family_none_turns_adapters_off() -> None:
    torch = pytest.importorskip("torch")

    class AE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = torch.nn.Linear(3, 2), torch.nn.Linear(2, 3)

        def forward(self, x):
            return self.decoder(self.encoder(x))

    model = AE()
    assert plugins.family_of(plugins.select_adapter(model)) == "autoencoder"
    assert plugins.select_adapter(model, family="none") is None
    with pytest.raises(InputError, match=r"expected a family among \[.*'autoencoder'.*'none'"):
        plugins.select_adapter(model, family="vision")


def test_cli_family_option(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "mlp.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 3)), path)
    runner = CliRunner()
    bad = runner.invoke(make_app(), ["measure", str(path), "--data", "digits", "--samples", "4",
                                     "--family", "vision"])
    assert bad.exit_code == 2 and bad.stdout == ""
    assert "expected a family among" in bad.stderr and "got 'vision'" in bad.stderr
    wrong = runner.invoke(make_app(), ["measure", str(path), "--data", "digits", "--samples",
                                       "4", "--family", "autoencoder"])
    assert wrong.exit_code == 2
    assert "forward returns (reconstruction, latent, ...), got a forward returning Tensor" \
        in wrong.stderr
    plain = runner.invoke(make_app(), ["measure", str(path), "--data", "digits", "--samples",
                                       "4", "--family", "none", "--json"])
    assert plain.exit_code == 0, plain.output
    assert '"family": null' in plain.stdout
