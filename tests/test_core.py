import random

import numpy as np
import pytest
import torch

from attn_course import get_device, seed_everything
from attn_course.data import marker_task, noisy_sine, target_function


def test_get_device_matches_what_is_available():
    dev = get_device()
    assert isinstance(dev, torch.device)
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    elif not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        assert dev.type == "cpu"
    torch.zeros(1, device=dev)  # usable


def test_seed_everything_makes_all_generators_repeat():
    seed_everything(123)
    a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(123)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("bad, exc", [(1.5, TypeError), ("0", TypeError), (-1, ValueError), (True, TypeError)])
def test_seed_everything_rejects_bad_seeds(bad, exc):
    with pytest.raises(exc, match="seed"):
        seed_everything(bad)


def test_marker_task_target_is_the_value_at_the_marker():
    x, y, pos = marker_task(50, 7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (50, 7, 2) and y.shape == (50,) and pos.shape == (50,)
    assert torch.equal(x[..., 1].argmax(-1), pos)
    assert torch.equal(x[..., 1].sum(-1), torch.ones(50))
    assert torch.equal(y, x[torch.arange(50), pos, 0])
    assert len(set(pos.tolist())) > 1
    _, _, fixed = marker_task(20, 7, moving=False)
    assert set(fixed.tolist()) == {3}


def test_noisy_sine_is_sorted_noisy_target():
    x, y = noisy_sine(200, noise=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.all(x[1:] >= x[:-1]) and x.min() >= 0 and x.max() <= 5
    residual = y - target_function(x)
    assert 0.05 < residual.std() < 0.2


@pytest.mark.parametrize("fn, kwargs, arg", [
    (marker_task, {"num_examples": 0, "length": 3}, "num_examples"),
    (marker_task, {"num_examples": 3, "length": -1}, "length"),
    (noisy_sine, {"num_points": 0}, "num_points"),
])
def test_data_rejects_non_positive_sizes(fn, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        fn(**kwargs)


def test_sort_task_layout():
    from attn_course.data import sort_task

    ids, targets = sort_task(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (3, 11) and torch.all(ids[:, 5] == 7)
    assert torch.equal(ids[:, 6:], ids[:, :5].sort(1).values)
    assert torch.all(targets[:, :5] == -100) and torch.all(targets[:, -1] == -100)
    assert torch.equal(targets[:, 5:10], ids[:, 6:])


def test_copy_back_task_targets():
    from attn_course.data import copy_back_task

    ids, targets = copy_back_task(4, 10, 3, 5, generator=torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (4, 10) and ids.max() < 5
    assert torch.all(targets[:, :3] == -100) and torch.equal(targets[:, 3:], ids[:, :-3])


def test_token_ids_check_names_the_argument():
    from attn_course._checks import token_ids

    with pytest.raises(TypeError, match="ids must be an int64"):
        token_ids("ids", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"ids holds ids outside \[0, 4\)"):
        token_ids("ids", torch.tensor([[0, 4]]), 4)
