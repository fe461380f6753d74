import pytest
import torch

from attn_course import basics
from attn_course.data import marker_task
from attn_course.train import StackedModels, fit


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


def test_sparse_benchmark_pieces():
    from attn_course import bench

    r = bench.run_one("sliding_window", 1024)
    assert r["method"] == "sliding_window" and r["L"] == 1024 and r["seconds"] > 0
    assert r["max_error"] < 1e-4 and r["flops"] == 4 * 8 * 64 * bench._band_pairs(1024, 256)
    assert bench._band_pairs(10, 2) == int((torch.arange(10)[:, None] - torch.arange(10)[None, :]).abs().le(2).sum())
    assert abs(bench._fit_slope([(1, 1.0), (2, 4.0), (4, 16.0)]) - 2) < 1e-12
    fake = [{"method": m, "L": L, "seconds": t * L / 1000, "peak_mib": 1.0, "max_error": 0.0, "flops": 1e9}
            for m, t in (("dense SDPA", 2.0), ("SDPA + band mask", 3.0), ("sliding_window", 0.5))
            for L in (1000, 2000)]
    table = bench.sparse_table(fake, peak=100.0)
    assert "| sliding_window | 2000 | 1000.0 | 1 | 4.00x | 6.00x |" in table
    assert table.count("\n") == 1 + 6


def test_stored_reference_results_are_complete():
    from attn_course import bench

    ref = bench.reference_results()
    methods = {r["method"] for r in ref["results"]}
    assert {"dense SDPA", "SDPA + band mask", "sliding_window", "bigbird (block 64)", "performer (256 features)"} <= methods
    assert {r["L"] for r in ref["results"]} == set(bench.LENGTHS)
    assert ref["matmul_peak_gflops"] > 0 and "torch" in ref["machine"]


def test_bench_command_line_writes_its_reports(tmp_path, capsys, monkeypatch):
    from attn_course import bench

    # every suite, at sizes small enough for a test (the processes it starts take the sizes as arguments)
    monkeypatch.setattr(bench, "QUICK", {"flash_lengths": (256,), "flash_train_length": 256, "ring_length": 256})
    assert bench.main(["--one", "sliding_window", "512"]) == 0
    assert '"method": "sliding_window"' in capsys.readouterr().out
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--out", str(out), "--lengths", "512",
                       "--methods", "dense SDPA", "SDPA + band mask", "sliding_window"]) == 0
    printed = capsys.readouterr().out
    assert "Chapter 1" in printed and "Chapter 7: sparse attention" in printed and "machine:" in printed
    data = __import__("json").loads((out / "sparse.json").read_text())
    assert {r["method"] for r in data["results"]} == {"dense SDPA", "SDPA + band mask", "sliding_window"}
    assert "| sliding_window | 512 |" in (out / "sparse.md").read_text()
    assert (out / "sparse.png").stat().st_size > 1000
    flash_data = __import__("json").loads((out / "flash.json").read_text())
    assert {r["L"] for r in flash_data["results"]} == {256} and flash_data["train"]
    ring_data = __import__("json").loads((out / "distributed.json").read_text())
    assert {r["L"] for r in ring_data["results"]} == {256} and "Ulysses" in (out / "distributed.md").read_text()
    import pytest

    with pytest.raises(ValueError, match="unknown methods"):
        bench.run_sparse([512], out, methods=["nope"])


def test_seconds_times_a_call():
    import time

    from attn_course.bench import seconds

    assert 0.004 < seconds(lambda: time.sleep(0.005), min_run_time=0.05) < 0.1


def test_fit_stacked_equals_separate_trainings_with_the_same_batches():
    from attn_course.train import fit_stacked, fit_stream

    def make(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()

    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(5, 2, 16, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 16, 2, generator=g,
                                                                                       dtype=torch.float64)
    stacked = [make(1), make(2)]
    losses = fit_stacked(stacked, lambda step: (xs[step - 1], ys[step - 1]), steps=5, lr=0.05)
    assert losses.shape == (5, 2)
    for m in range(2):
        alone = make(m + 1)
        history = fit_stream(alone, lambda step, m=m: (xs[step - 1, m], ys[step - 1, m]), steps=5, lr=0.05)
        torch.testing.assert_close(losses[:, m], torch.tensor(history.losses, dtype=torch.float32))
        for a, b in zip(alone.parameters(), stacked[m].parameters()):
            torch.testing.assert_close(a, b)
    assert not stacked[0].training
    with pytest.raises(ValueError, match="leading axis of 2"):
        fit_stacked(stacked, lambda step: (xs[0, 0], ys[0, 0]), steps=1)
    with pytest.raises(ValueError, match="same parameter names and shapes"):
        fit_stacked([make(1), torch.nn.Linear(3, 2)], lambda step: (xs[0], ys[0]), steps=1)


def test_stacked_models_map_each_model_over_its_own_inputs():
    def make(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh()).double()
        net[1].running_mean.normal_()                            # a buffer that differs per model
        return net.eval()

    models = [make(0), make(1), make(2)]
    stack = StackedModels(models).eval()                        # eval: batch norm uses each copy's buffers
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    out = stack(x)
    for m, model in enumerate(models):
        torch.testing.assert_close(out[m], model(x[m]))
    out.sum().backward()                                         # each copy's gradient is its own model's
    models[1](x[1]).sum().backward()
    torch.testing.assert_close(stack.stacked[0].grad[1], models[1][0].weight.grad)
    with torch.no_grad():
        stack.stacked[0].mul_(2.0)
    stack.write_back(models)
    torch.testing.assert_close(models[2][0].weight, stack.stacked[0][2])
    torch.testing.assert_close(stack(x)[2], models[2](x[2]))
    with pytest.raises(TypeError, match="models"):
        StackedModels(models[0])
    with pytest.raises(TypeError, match="models"):
        StackedModels([])
    with pytest.raises(ValueError, match="same parameter"):
        StackedModels([torch.nn.Linear(2, 3), torch.nn.Linear(3, 3)])
    with pytest.raises(TypeError, match="3 model"):
        stack.write_back(models[:2])


def test_fit_stream_stops_when_told_and_equals_the_same_steps_without_a_stop():
    from attn_course.train import fit_stream

    def run(stop):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        g = torch.Generator().manual_seed(1)

        def next_batch(step):
            x = torch.randn(8, 2, generator=g)
            return x, x.sum(-1, keepdim=True)

        steps = 5 if stop is None else 20
        return model, fit_stream(model, next_batch, steps=steps, lr=0.05, eval_fn=lambda m: 0.0,
                                 eval_every=5, stop=stop)

    stopped, history = run(lambda h: h.evals[-1][0] >= 5)        # stops after the first evaluation, at step 5
    alone, reference = run(None)                                 # 5 steps, no stop
    assert len(history) == 5 and history.evals == [(5, 0.0)]
    assert history.losses == reference.losses
    torch.testing.assert_close(stopped.weight, alone.weight)
    assert not stopped.training
    _, never = run(lambda h: False)
    assert len(never) == 20 and [s for s, _ in never.evals] == [5, 10, 15, 20]


def _train_seq2seq(model, seed, steps=6):
    """A few Adam steps of a GRU encoder-decoder on its own stream; the final weights, flattened."""
    from attn_course.data import reverse_task
    from attn_course.train import sequence_cross_entropy

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        length = int(torch.randint(3, 9, (1,), generator=gen))
        source, decoder_input, target = reverse_task(16, length, 7, generator=gen)
        loss = sequence_cross_entropy(model(source, decoder_input)[0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_concurrently_equals_running_the_jobs_one_by_one_on_one_thread():
    import copy

    from attn_course.seq2seq import Seq2Seq
    from attn_course.train import concurrently

    torch.manual_seed(0)
    models = [Seq2Seq(7, 8, 16, attention=a) for a in (True, False, "uniform", True)]
    copies = [copy.deepcopy(m) for m in models]
    threads = torch.get_num_threads()
    together = concurrently([lambda m=m, s=s: _train_seq2seq(m, s) for s, m in enumerate(models)], workers=2)
    assert torch.get_num_threads() == threads                      # restored
    torch.set_num_threads(1)
    try:
        alone = [_train_seq2seq(m, s) for s, m in enumerate(copies)]
    finally:
        torch.set_num_threads(threads)
    assert len(together) == len(alone) == 4
    for a, b in zip(together, alone):
        assert torch.equal(a, b)                                   # bit for bit, in the jobs' order
    assert not torch.equal(together[0], together[3])               # and not one job's result repeated


def test_concurrently_passes_errors_on_and_warns_about_the_global_generator():
    from attn_course.train import concurrently

    assert concurrently([]) == []
    assert concurrently([lambda: 1, lambda: 2, lambda: 3], workers=1) == [1, 2, 3]

    def boom():
        raise KeyError("inside the job")

    threads = torch.get_num_threads()
    with pytest.raises(KeyError, match="inside the job"):
        concurrently([lambda: 1, boom])
    assert torch.get_num_threads() == threads
    with pytest.warns(RuntimeWarning, match="global random generator"):
        concurrently([lambda: torch.rand(1), lambda: torch.rand(1)])
    with pytest.raises(TypeError, match="jobs must be functions"):
        concurrently([1, 2])
    with pytest.raises(ValueError, match="workers"):
        concurrently([lambda: 1], workers=0)
    with pytest.raises(TypeError, match="workers"):
        concurrently([lambda: 1], workers=1.5)


def test_concurrently_runs_stacked_trainings_too():
    """``vmap`` (inside ``fit_stacked``) keeps its state per thread: two stacks at once train as alone."""
    import copy

    from attn_course.train import concurrently, fit_stacked

    def make(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def job(models, seed):
        gen = torch.Generator().manual_seed(seed)

        def next_batch(step):
            x = torch.randn(2, 16, 4, generator=gen)
            return x, x[..., :2].sin()

        return fit_stacked(models, next_batch, steps=20, lr=1e-2)

    sets = [[make(10 * k + i) for i in range(2)] for k in range(3)]
    copies = copy.deepcopy(sets)
    together = concurrently([lambda k=k: job(sets[k], k) for k in range(3)], workers=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [job(copies[k], k) for k in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    assert all(torch.equal(p, q) for s, c in zip(sets, copies) for m, n in zip(s, c)
               for p, q in zip(m.parameters(), n.parameters()))
