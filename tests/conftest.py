"""Test-session setup shared by every package's tests."""

import importlib.util
import os

import torch
from hypothesis import HealthCheck, settings

from tests.triton_interpreter import patch_language_once_per_launch

# Triton kernels are tested on CPU tensors through Triton's interpreter; this must be set
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ["TRITON_INTERPRET"] == "1" and importlib.util.find_spec("triton") is not None:
    patch_language_once_per_launch()

# One torch thread in every test process (workers set their own, tests of threads set
# theirs): the models are tiny, and `make test` runs the two environments' suites side by
# side on one core each, where a second OpenMP thread per suite oversubscribes the cores.
# Measured before this was shared by all three packages (core tests ran with torch's
# default there, two threads, in the main environment only): in a CI run, main's
# test_reliability took 82 s against 29 s for the same tests in the Composer suite.
torch.set_num_threads(1)

# CI draws the same 40 examples per property every run (derandomize), so a red run is
# the code's doing and reruns identically; `pytest --hypothesis-profile=thorough` explores
# 1000 fresh random ones. Either prints a failure's reproduction blob (@reproduce_failure):
# a clean clone keeps no example database to replay from.
settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")
