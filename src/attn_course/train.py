"""A small, reusable training loop with a progress bar."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _checks, _cpu_cores
from .widgets import is_static

__all__ = ["fit", "fit_stream", "fit_stacked", "StackedModels", "concurrently", "History", "sequence_cross_entropy", "masked_accuracy", "IGNORE"]

IGNORE = -100  # target value of positions that do not count (as in torch's cross_entropy)


@dataclass
class History:
    """What :func:`fit` recorded: the loss of every step and ``(step, value)`` evaluations.

    ``len(history)`` is the number of steps taken.

    Example:
        >>> from attn_course.train import History
        >>> history = History(losses=[1.0, 0.5, 0.25], evals=[(3, 0.9)])
        >>> len(history), history.losses[-1], history.evals[-1]
        (3, 0.25, (3, 0.9))
    """

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.losses)


def sequence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits (B, L, C)`` against ``targets (B, L)``, skipping ``IGNORE``.

    Example:
        >>> import math
        >>> import torch
        >>> from attn_course.train import IGNORE, sequence_cross_entropy
        >>> logits = torch.zeros(1, 3, 4)                 # uniform over 4 classes
        >>> targets = torch.tensor([[2, 0, IGNORE]])      # the last position does not count
        >>> round(sequence_cross_entropy(logits, targets).item(), 4), round(math.log(4), 4)
        (1.3863, 1.3863)
    """
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of the positions with a target (not ``IGNORE``) whose arg-max is right.

    Example:
        >>> import torch
        >>> from attn_course.train import IGNORE, masked_accuracy
        >>> logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])   # predicts 1, 0, 0
        >>> masked_accuracy(logits, torch.tensor([[1, 1, IGNORE]]))           # 1 right of 2 counted
        0.5
    """
    keep = targets != IGNORE
    return (logits.argmax(-1)[keep] == targets[keep]).float().mean().item()


def fit(model: nn.Module, inputs, targets: torch.Tensor, *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        steps: int = 300, lr: float = 1e-2, batch_size: int = 64, seed: int = 0,
        desc: str = "training", eval_fn: Callable[[nn.Module], float] | None = None,
        eval_every: int = 50) -> History:
    """Train ``model`` with Adam on mini-batches drawn from ``(inputs, targets)``.

    ``inputs`` is a tensor, or a tuple of tensors passed to ``model`` as separate
    arguments. ``model(...)`` may return a tensor or a tuple whose first item is the
    prediction. Shows a tqdm progress bar in a live session (none when the book is
    built, where it would only print timings). ``eval_fn(model)``, if given, is called
    (in eval mode, without gradients) every ``eval_every`` steps and after the last.
    Returns a :class:`History`.

    Example:
        Three steps on a linear regression, with an evaluation after the last:

        >>> import torch
        >>> from torch import nn
        >>> from attn_course.train import fit
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(32, 2)
        >>> y = x @ torch.tensor([[1.0], [-2.0]])
        >>> model = nn.Linear(2, 1)
        >>> history = fit(model, x, y, steps=3, batch_size=8, eval_fn=lambda m: 0.0)
        >>> len(history), history.evals, model.training
        (3, [(3, 0.0)], False)
    """
    batch_size = _checks.positive_number("batch_size", batch_size, integer=True)
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    for i, x in enumerate(parts):
        if x.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets must have the same number of examples; got "
                             f"inputs[{i}] {tuple(x.shape)}, targets {tuple(targets.shape)}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = targets.shape[0]

    def next_batch(step):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(targets.device)
        return tuple(x[idx] for x in parts), targets[idx]

    return fit_stream(model, next_batch, loss_fn=loss_fn, steps=steps, lr=lr, desc=desc,
                      eval_fn=eval_fn, eval_every=eval_every)


def fit_stream(model: nn.Module, next_batch: Callable[[int], tuple], *,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               steps: int = 300, lr: float = 1e-2, desc: str = "training",
               eval_fn: Callable[[nn.Module], float] | None = None, eval_every: int = 50,
               stop: Callable[[History], bool] | None = None) -> History:
    """Like :func:`fit`, with batches from ``next_batch(step) -> (inputs, targets)``
    (``inputs`` a tensor or a tuple of tensors): for data generated on the fly, e.g.
    a new sequence length every step.

    ``stop(history)``, if given, is called after every evaluation; when it returns ``True``
    training ends there (e.g. once every copy has converged), so ``len(history)`` may be
    less than ``steps``.

    Example:
        A new batch, of a new length, at every step:

        >>> import torch
        >>> from torch import nn
        >>> from attn_course.train import fit_stream
        >>> _ = torch.manual_seed(0)
        >>> def next_batch(step):
        ...     x = torch.randn(4, step + 1, 3)       # length step + 1
        ...     return x, x.sum(-1, keepdim=True)
        >>> history = fit_stream(nn.Linear(3, 1), next_batch, steps=3)
        >>> len(history.losses)
        3
    """
    steps = _checks.positive_number("steps", steps, integer=True)
    lr = _checks.positive_number("lr", lr)
    eval_every = _checks.positive_number("eval_every", eval_every, integer=True)
    loss_fn = loss_fn or nn.functional.mse_loss
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = History()
    from tqdm.auto import trange

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            history.evals.append((step, float(eval_fn(model))))
        model.train()

    model.train()
    for step in trange(1, steps + 1, desc=desc, disable=is_static(), leave=False):
        inputs, targets = next_batch(step)
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        pred = out[0] if isinstance(out, tuple) else out
        loss = loss_fn(pred, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.losses.append(loss.item())
        if eval_fn is not None and (step % eval_every == 0 or step == steps):
            evaluate(step)
            if stop is not None and stop(history):
                break
    model.eval()
    return history


class StackedModels(nn.Module):
    r"""``M`` models of one architecture, evaluated (and trained) as one module.

    The models' parameters and buffers are stacked along a leading model axis
    (``torch.func.stack_module_state``) and the forward pass is mapped over that axis with
    ``torch.func.vmap``: ``forward(*inputs)``, every input with a leading axis of ``M``
    (``None`` passes through to every copy), returns the outputs of the ``M`` copies stacked,
    copy ``m`` computed from ``inputs[i][m]`` with model ``m``'s weights (the first item if a
    model returns a tuple). A loss summed over the copies gives each copy exactly the
    gradient it would get alone, since the copies share no weight:

    .. math:: \nabla_{\theta_m} \sum_{m'=1}^{n_\text{seeds}} \mathcal L_{m'}(\theta_{m'}) = \nabla_{\theta_m} \mathcal L_m(\theta_m)

    and Adam works element by element, so training the stack trains ``M`` independent
    models at about the Python cost of one. (This is the model-ensembling recipe of
    ``torch.func``, not a paper's method.) :meth:`write_back` copies the weights into the
    models. :func:`fit_stacked` trains one; :class:`attn_course.transformer.SeedStack` is
    the one for the capstone's transformers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attn_course.train import StackedModels
        >>> _ = torch.manual_seed(0)
        >>> models = [nn.Linear(3, 2) for _ in range(4)]          # four seeds, one architecture
        >>> stack = StackedModels(models)
        >>> x = torch.randn(4, 5, 3)                               # (M, B, features): a batch each
        >>> out = stack(x)
        >>> tuple(out.shape), torch.allclose(out[2], models[2](x[2]))
        ((4, 5, 2), True)
    """

    def __init__(self, models):
        super().__init__()
        if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
            raise TypeError(f"models must be a sequence of models, got one {type(models).__name__}")
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise TypeError("models must be a non-empty sequence of nn.Module")
        shapes = [tuple((k, v.shape, v.dtype) for k, v in m.state_dict().items()) for m in models]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("every model must have the same parameter names and shapes")
        params, buffers = torch.func.stack_module_state(models)
        self.num_models = len(models)
        self._names, self._buffer_names = list(params), list(buffers)
        self.stacked = nn.ParameterList(nn.Parameter(params[n].detach().clone()) for n in self._names)
        for i, name in enumerate(self._buffer_names):
            self.register_buffer(f"stacked_buffer{i}", buffers[name].clone())
        self._template = [copy.deepcopy(models[0])]          # a list: not a registered submodule

    def train(self, mode: bool = True):
        """Set training mode, also on the model that computes each copy (dropout, batch norm)."""
        self._template[0].train(mode)
        return super().train(mode)

    def _weights(self) -> tuple[dict, dict]:
        return (dict(zip(self._names, self.stacked)),
                {n: getattr(self, f"stacked_buffer{i}") for i, n in enumerate(self._buffer_names)})

    def _call(self, params: dict, buffers: dict, *inputs):
        """One copy's forward pass (``vmap`` maps it over the model axis); subclasses may override."""
        out = torch.func.functional_call(self._template[0], (params, buffers), inputs)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, *inputs):
        return self._map(inputs, tuple(None if x is None else 0 for x in inputs))

    def _map(self, inputs: tuple, in_dims: tuple):
        """Run :meth:`_call` over the copies; ``in_dims[i]`` is 0 where ``inputs[i]`` has one slice
        per copy and ``None`` where all copies share it."""
        params, buffers = self._weights()
        with warnings.catch_warnings():  # torch's fused CPU attention has no vmap rule yet: a loop, still right
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return torch.func.vmap(self._call, in_dims=(0, 0, *in_dims))(params, buffers, *inputs)

    @torch.no_grad()
    def write_back(self, models) -> None:
        """Copy the (trained) weights of copy ``m`` into ``models[m]``."""
        models = list(models)
        if len(models) != self.num_models:
            raise TypeError(f"models must be {self.num_models} model(s), got {len(models)}")
        params, buffers = self._weights()
        for m, model in enumerate(models):
            own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            for name, value in {**params, **buffers}.items():
                own[name].copy_(value[m])


def fit_stacked(models, next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                steps: int = 300, lr: float = 1e-2, desc: str = "training") -> torch.Tensor:
    """Train ``M`` models of one architecture at once with Adam; return the losses ``(steps, M)``.

    The models run as one :class:`StackedModels` (weights stacked along a leading model
    axis, the forward pass ``vmap``-ped over it); ``next_batch(step) -> (x (M, B, ...),
    y (M, B, ...))`` (``step`` from 1) gives each model its own batch. The loss is the sum
    of the ``M`` losses, so each copy gets exactly its own gradient, and Adam works element
    by element: this equals ``M`` separate trainings, at about the Python cost of one (which
    dominates for small models). ``model(x)`` may return a tensor or a tuple whose first
    item is the prediction; ``loss_fn`` defaults to mean squared error. The trained weights
    are written back into ``models``, which are left in eval mode.

    Example:
        Two models, each with its own batch, three steps:

        >>> import torch
        >>> from torch import nn
        >>> from attn_course.train import fit_stacked
        >>> _ = torch.manual_seed(0)
        >>> models = [nn.Linear(2, 1), nn.Linear(2, 1)]
        >>> before = models[0].weight.clone()
        >>> def next_batch(step):
        ...     x = torch.randn(2, 8, 2)                   # (M, B, features)
        ...     return x, x.sum(-1, keepdim=True)
        >>> losses = fit_stacked(models, next_batch, steps=3)
        >>> tuple(losses.shape), torch.equal(models[0].weight, before)   # (steps, M); trained in place
        ((3, 2), False)
    """
    from tqdm.auto import trange

    models = list(models)
    stack = StackedModels(models)
    steps = _checks.positive_number("steps", steps, integer=True)
    lr = _checks.positive_number("lr", lr)
    loss_fn = loss_fn or nn.functional.mse_loss
    M = len(models)
    opt = torch.optim.Adam(stack.parameters(), lr=lr)
    losses = torch.empty(steps, M)
    for m in models:
        m.train()
    stack.train()
    for step in trange(1, steps + 1, desc=desc, disable=is_static(), leave=False):
        x, y = next_batch(step)
        if x.shape[0] != M or y.shape[0] != M:
            raise ValueError(f"next_batch must give x and y with a leading axis of {M} (one per model), "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        pred = stack(x)                                      # (M, B, ...)
        each = torch.stack([loss_fn(pred[m], y[m]) for m in range(M)])
        opt.zero_grad()
        each.sum().backward()                                 # copy m's gradient is its own loss's
        opt.step()
        losses[step - 1] = each.detach().cpu()
    stack.write_back(models)
    for m in models:
        m.eval()
    return losses


def concurrently(jobs, *, workers: int | None = None) -> list:
    """Run independent jobs (functions of no arguments) at the same time, one per CPU core, and
    return their results in the order of ``jobs``.

    A small model on a CPU keeps about one core busy, however many threads torch may use: its
    matrices are too small to split. Several trainings side by side in threads (torch releases
    Python's lock inside each operation) use every core instead. While the jobs run, torch
    computes each operation on one thread (``torch.set_num_threads(1)``, restored afterwards),
    so every job does the same arithmetic in the same order as it would alone: the results
    equal those of running the jobs one after another with one thread, bit for bit, whichever
    job finishes first, provided no job draws from torch's global random generator (build the
    models before, and give each job its own ``torch.Generator``). A warning says so if one did.
    ``workers`` defaults to the number of cores this process may use. (A thin use of
    ``concurrent.futures.ThreadPoolExecutor``.)

    Example:
        >>> import torch
        >>> from attn_course.train import concurrently
        >>> def job(seed):
        ...     gen = torch.Generator().manual_seed(seed)        # its own generator
        ...     return torch.randn(3, 3, generator=gen).sum().item()
        >>> together = concurrently([lambda s=s: job(s) for s in range(4)])
        >>> alone = [job(s) for s in range(4)]
        >>> together == alone
        True
    """
    from concurrent.futures import ThreadPoolExecutor

    jobs = list(jobs)
    if not all(callable(j) for j in jobs):
        raise TypeError(f"jobs must be functions of no arguments, got {[type(j).__name__ for j in jobs]}")
    if workers is None:
        workers = _cpu_cores()
    workers = _checks.positive_number("workers", workers, integer=True)
    if not jobs:
        return []
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = [pool.submit(job) for job in jobs]
            results = [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)
    if not torch.equal(rng, torch.random.get_rng_state()):
        warnings.warn("a job drew from torch's global random generator, so its results may depend on which "
                      "job ran first: build models before, and give each job its own torch.Generator",
                      RuntimeWarning, stacklevel=2)
    return results
