import pytest
import torch

from attn_course import basics
from attn_course.data import marker_task
from attn_course.train import fit


def test_fit_learns_the_marker_task_with_attention():
    x, y, _ = marker_task(500, 6, generator=torch.Generator().manual_seed(0))
    model = basics.ContentAttentionPool(2)
    history = fit(model, x, y, steps=300, lr=0.05, eval_fn=lambda m: 1.0, eval_every=100)
    assert len(history) == 300
    with torch.no_grad():
        pred, _ = model(x)
    assert torch.nn.functional.mse_loss(pred, y) < 0.05 < history.losses[0]
    assert history.evals == [(100, 1.0), (200, 1.0), (300, 1.0)]


def test_fit_bad_arguments():
    m = basics.FixedSelectionPool(3)
    with pytest.raises(ValueError, match="number of examples"):
        fit(m, torch.zeros(4, 3, 2), torch.zeros(5))
    with pytest.raises(ValueError, match="steps"):
        fit(m, torch.zeros(4, 3, 2), torch.zeros(4), steps=0)


def test_bench_runs_and_reports_ratios():
    from attn_course import bench

    rows = bench.sdpa(lengths=(16, 32), batch=1, heads=1, dim=8, min_run_time=0.01)
    assert [r[0] for r in rows] == [16, 32]
    assert all(r[1] > 0 and r[2] > 0 and abs(r[3] - r[1] / r[2]) < 1e-9 for r in rows)
    assert "torch" in bench.machine()
