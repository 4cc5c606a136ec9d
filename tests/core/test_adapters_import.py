"""Each adapter names what to install when its framework is missing. Each environment
checks the adapter whose framework it lacks (Composer is absent from the main one,
Lightning from the Composer one)."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

ADAPTERS = {"lightning_adam": ("lightning", "lightning"), "composer_adam": ("composer", "composer")}


@pytest.mark.bad_input
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_an_adapter_without_its_framework_names_the_extra_to_install(adapter: str) -> None:
    """It failed with a bare "No module named 'composer'", deep in its own imports."""
    framework, extra = ADAPTERS[adapter]
    if importlib.util.find_spec(framework) is not None:
        pytest.skip(f"{framework} is installed here; the other environment checks this")
    with pytest.raises(
        ModuleNotFoundError, match=rf"{adapter} needs .*pip install 'adamkit\[{extra}\]'"
    ) as raised:
        importlib.import_module(adapter)
    assert raised.value.name == framework
