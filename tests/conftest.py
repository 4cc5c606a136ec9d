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

# `pytest --hypothesis-profile=thorough` explores far more examples than CI does.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")
