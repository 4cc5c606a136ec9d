"""The distribution users install (`pip install adamkit`): a wheel, not this checkout. The
suites run an editable install, which finds every file in the repository, so a module,
kernel source or marker left out of pyproject.toml's package lists would pass them and
break (or, for the C sources, silently slow) every installed copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import setuptools

from tests.processes import ROOT

PACKAGES = ("core", "lightning_adam", "composer_adam")
SHIPPED_SUFFIXES = {".py", ".c", ".cpp", ".typed"}

# pyproject.toml's `license = "Apache-2.0"` (an SPDX expression) needs setuptools 77; the
# Composer environment's pin is older, so the main environment builds the wheel.
pytestmark = pytest.mark.skipif(
    int(setuptools.__version__.split(".")[0]) < 77,
    reason=f"setuptools {setuptools.__version__} here cannot build pyproject.toml (needs 77+)",
)


def _source_files() -> set[str]:
    """Every file of the three packages that an installed copy needs, relative to ROOT."""
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and path.suffix in SHIPPED_SUFFIXES and "__pycache__" not in path.parts
    }


def _clean_environment(target: Path) -> dict[str, str]:
    """Only the install on the path (not the checkout, as tests.processes puts it), with
    what finds the compiler and the kernel cache, so the suite's built kernels are reused."""
    kept = ("PATH", "HOME", "TMPDIR", "CC", "XDG_CACHE_HOME", "ADAMKIT_KERNEL_CACHE")
    return {name: os.environ[name] for name in kept if name in os.environ} | {
        "PYTHONPATH": str(target),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, a directory it is installed into), built from a copy of the sources so
    that the build writes nothing into the checkout the other suite is reading."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", work]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = work.glob("adamkit-*.whl")
    target = work / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return wheel, target


def test_the_wheel_ships_every_module_kernel_source_and_type_marker(
    installed: tuple[Path, Path],
) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(
            next(name for name in names if name.endswith("entry_points.txt"))
        ).decode()
    shipped = {name for name in names if name.split("/")[0] in PACKAGES}
    assert shipped == _source_files()
    # llm-foundry finds the optimizers and the callback through these groups (README,
    # "Recipes and llm-foundry").
    assert "[llmfoundry_optimizers]" in entry_points
    assert "adamkit_decoupled_adamw = composer_adam:DecoupledAdamW" in entry_points
    assert "adamkit_gradient_release = composer_adam:GradientRelease" in entry_points


def test_the_installed_copy_builds_its_fused_kernels_and_steps_as_the_loop(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """Imported from the install, not the checkout: the generated C kernels (their sources
    read from the installed package) step fp32 and 8-bit state as the loop backend does."""
    _, target = installed
    script = textwrap.dedent(
        """
        import torch, core
        from pathlib import Path

        assert Path(core.__file__).is_relative_to(Path(TARGET)), core.__file__
        results = {}
        for fused in (False, True):  # fused=True is refused where no kernel can be built
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 5000)]
            optimizer = core.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)
            eight_bit = torch.nn.Parameter(torch.randn(5000))
            quantized = core.AdamW([eight_bit], lr=1e-2, fused=fused, state_precision="8bit")
            for _ in range(3):
                for p in (*params, eight_bit):
                    p.grad = torch.randn_like(p)
                optimizer.step()
                quantized.step()
            assert quantized.state[eight_bit]["exp_avg_codes"].dtype == torch.uint8
            results[fused] = [p.detach().clone() for p in (*params, eight_bit)]
        # tests/core/test_fused.py and test_quantized_fused.py: fp32 within 1e-6, 8-bit
        # runs within a tenth of lr (a code may flip where rounding meets a midpoint)
        for loop, fused, bound in zip(results[False], results[True], (1e-6, 1e-6, 1e-3)):
            torch.testing.assert_close(fused, loop, rtol=0, atol=bound)
        print("stepped")
        """
    ).replace("TARGET", repr(str(target)))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_clean_environment(target),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stepped" in result.stdout
