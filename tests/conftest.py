"""Test-session setup shared by every package's tests."""

import os

from hypothesis import HealthCheck, settings

# Triton kernels are tested on CPU tensors through Triton's interpreter; this must be set
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

# `pytest --hypothesis-profile=thorough` explores far more examples than CI does.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")
