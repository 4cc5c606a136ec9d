"""The plain-PyTorch examples users copy from run as the README shows them: quietly and
with the numbers it quotes (their timings and memory are not asserted)."""

from __future__ import annotations

import importlib.util
import re
import warnings
from types import ModuleType

from tests.processes import ROOT


def _example(name: str) -> ModuleType:
    """examples/<name>.py imported as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_release_accumulation_example_follows_the_documented_loop() -> None:
    """examples/gradient_release.py's optimizer-accumulation comparison left out
    optimizer.step() under release, so every run warned that two backward passes made two
    steps: the example taught the pattern the warning exists to catch."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = _example("gradient_release").accumulation_gap(windows=20)
    ordinary, folded = (
        float(value) for value in re.findall(r"\| (?:ordinary|release)[^|]*\| ([0-9.]+) \|", report)
    )
    # Folding noisy micro-batches into v makes steps somewhat smaller (README: +2.6% at 300
    # windows); a step lost or doubled per window moves the loss far more.
    assert abs(folded / ordinary - 1) < 0.1, report
