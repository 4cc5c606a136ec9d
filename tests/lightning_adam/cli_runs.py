"""Run by test_cli.py: LightningCLI runs of examples/lightning_cli.py, one after another
in this one fresh process, as `python examples/lightning_cli.py fit --config base.yaml
ARGS` would run each (LightningCLI parses its own arguments, builds its own Trainer, and
logs into the run's folder, which is also the working directory while it runs).

One process for all of them because starting one costs about 6 s of imports (lightning
3.7 s of it) against about 4 s of training per run; each run's outcome is still its own:
a run that fails or exits is recorded and the next one starts.

Usage: python -m tests.lightning_adam.cli_runs PLAN.json, where the plan is a list of
{"directory": ..., "args": [...]}; each run writes <directory>/outcome.json with its exit
code (0, the code LightningCLI exited with, or 1 for an exception) and, unless it was 0,
what it printed to stderr and the traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

from tests.lightning_adam.models import load_module
from tests.processes import ROOT

EXAMPLE = ROOT / "examples" / "lightning_cli.py"
BASE = ROOT / "configs" / "lightning" / "base.yaml"


def fit_arguments(directory: Path, args: list[str]) -> list[str]:
    """The example's arguments for `fit --config base.yaml ARGS`, logging into directory."""
    return [
        "fit",
        "--config",
        str(BASE),
        *args,
        f"--trainer.default_root_dir={directory}",
        f"--trainer.logger.init_args.save_dir={directory}",
    ]


def run(example: object, directory: Path, args: list[str]) -> dict[str, object]:
    """One `fit` through the example's LightningCLI, in this process."""
    command = fit_arguments(directory, args)
    stderr = io.StringIO()
    code, error = 0, ""
    os.chdir(directory)
    try:
        with contextlib.redirect_stderr(stderr):
            example.main(command)  # type: ignore[attr-defined]
    except SystemExit as exit_info:
        code = (
            exit_info.code if isinstance(exit_info.code, int) else int(exit_info.code is not None)
        )
    except Exception:
        code, error = 1, traceback.format_exc()
    finally:
        os.chdir(ROOT)
    printed = stderr.getvalue()[-3000:] if code else ""
    return {"code": code, "error": printed + error}


def main(plan_file: str) -> None:
    example = load_module(EXAMPLE)
    for entry in json.loads(Path(plan_file).read_text()):
        directory = Path(entry["directory"])
        directory.mkdir(parents=True, exist_ok=True)
        outcome = run(example, directory, entry["args"])
        (directory / "outcome.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1])
