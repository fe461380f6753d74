import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Unit tests never depend on how the notebooks are rendered; widget tests pick a mode explicitly.
os.environ.pop("ATTN_COURSE_STATIC", None)

settings.register_profile(
    "course", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("course")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
