"""Local training under differential privacy (Opacus DP-SGD) and local evaluation.

Every trained block (encoders, fusion, heads) is trained with DP-SGD: per-sample gradients
clipped to the policy's ``max_grad_norm``, Gaussian noise of ``noise_multiplier`` times
that norm, Poisson sampling of batches. A head never leaves the site, but it is still
released to the hospital's own users, so it is trained privately too.

The round's DP parameters are planned *before* training (:func:`plan_round`) so that the
ledger can record the spend durably before any computation starts; after training the plan
is checked against the history Opacus's own accountant kept, and a mismatch is an error.

Notes:
    Batch sampling and noise come from :mod:`blossom_secure.site.dp_random`: a keyed AES-256-CTR
    stream whose key is drawn from the OS CSPRNG for every round, never from torch's
    Mersenne Twister (Opacus's ``secure_mode`` needs ``torchcsprng``, which cannot be
    installed for current torch). A seeded simulation derives the key from its seed, so
    its epsilon is nominal and is labelled so in the ledger and audit log.

    Nothing computed from the patients of the site shapes the model input: tabular features
    are clipped and scaled with the public values of the federation file
    (:class:`~blossom_secure.config.FeatureScale`), images with the declared intensity window.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from blossom_secure.config import FeatureScale, ModelLayout
from blossom_secure.site.dp_random import DPRandomness, PoissonBatchSampler
from blossom_secure.model import BlockModel
from blossom_secure.site.policy import PrivacyTerms
from blossom_secure.site.ledger import noise_for_target

__all__ = ["RoundPlan", "SiteTensors", "TrainResult", "evaluate", "plan_round", "train_dp",
           "scale_features", "train_without_dp_simulation_only"]


@dataclass(frozen=True)
class SiteTensors:
    """A site's data as tensors, tabular features clipped and scaled with public values.

    Attributes:
        image, tabular: inputs (``None`` for a modality the site lacks).
        image_present, tabular_present: float (N,) presence masks.
        labels: task -> int64 (N,), -1 where missing.
        extra, extra_present: the same, per extra tabular modality the site holds.
    """

    image: torch.Tensor | None
    image_present: torch.Tensor
    tabular: torch.Tensor | None
    tabular_present: torch.Tensor
    labels: Mapping[str, torch.Tensor]
    extra: Mapping[str, torch.Tensor] = field(default_factory=lambda: MappingProxyType({}))
    extra_present: Mapping[str, torch.Tensor] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_arrays(cls, arrays, layout: ModelLayout) -> SiteTensors:
        """Build from :class:`blossom_secure.site.data.SiteArrays`, scaling every tabular
        feature with the public values the federation layout declares
        (:class:`~blossom_secure.config.FeatureScale`): clipped to the declared range, then
        centred and scaled. No statistic of the site's patients is used, so one patient's
        values never change another patient's model input."""
        tab = None
        if arrays.tabular is not None:
            tab = scale_features(arrays.tabular, arrays.tabular_present, layout.tabular.scaling)
        img = torch.from_numpy(arrays.image.astype(np.float32)) if arrays.image is not None else None
        extra_present = getattr(arrays, "extra_tabular_present", {})
        extra = {m: scale_features(x, extra_present[m], layout.extra_tabular[m].scaling)
                 for m, x in getattr(arrays, "extra_tabular", {}).items()}
        return cls(
            image=img,
            image_present=torch.from_numpy(arrays.image_present.astype(np.float32)),
            tabular=tab,
            tabular_present=torch.from_numpy(arrays.tabular_present.astype(np.float32)),
            labels={t: torch.from_numpy(np.asarray(v, dtype=np.int64)) for t, v in arrays.labels.items()},
            extra=extra,
            extra_present={m: torch.from_numpy(p.astype(np.float32)) for m, p in extra_present.items()},
        )

    def __len__(self) -> int:
        return int(self.image_present.shape[0])

    def subset(self, idx: np.ndarray) -> SiteTensors:
        i = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return SiteTensors(
            image=None if self.image is None else self.image[i],
            image_present=self.image_present[i],
            tabular=None if self.tabular is None else self.tabular[i],
            tabular_present=self.tabular_present[i],
            labels={t: v[i] for t, v in self.labels.items()},
            extra={m: v[i] for m, v in self.extra.items()},
            extra_present={m: v[i] for m, v in self.extra_present.items()},
        )

    def model_inputs(self) -> tuple:
        """The positional arguments of :meth:`BlockModel.forward` for these patients."""
        return (self.image, self.image_present, self.tabular, self.tabular_present, self.extra, self.extra_present)


def scale_features(x: np.ndarray, present: np.ndarray, scaling: Sequence[FeatureScale]) -> torch.Tensor:
    """Clip every column to its declared range, then centre and scale it with the declared
    public values; zeros where the modality is absent.

    Raises:
        ValueError: the number of declared scalings differs from the number of columns.
    """
    if len(scaling) != x.shape[1]:
        raise ValueError(f"{x.shape[1]} feature columns but {len(scaling)} declared scalings")
    low = np.array([s.low for s in scaling], dtype=np.float64)
    high = np.array([s.high for s in scaling], dtype=np.float64)
    centre = np.array([s.centre for s in scaling], dtype=np.float64)
    scale = np.array([s.scale for s in scaling], dtype=np.float64)
    out = ((np.clip(x.astype(np.float64), low, high) - centre) / scale).astype(np.float32)
    out[~present] = 0.0
    return torch.from_numpy(out)


@dataclass(frozen=True)
class RoundPlan:
    """A round's DP-SGD parameters, fixed before training.

    Attributes:
        noise_multiplier, sample_rate, steps: What the ledger records and the accountant
            composes (``steps`` over the whole round).
        batch_size: The expected batch size the noisy gradient sum is divided by (public).
        epochs: Passes of ``steps // epochs`` Poisson batches each.
        sampling: ``public`` (rate and steps declared in the federation file) or
            ``training-set size`` (derived from the site's count; see :func:`plan_round`).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    batch_size: int
    epochs: int
    sampling: str = "public"


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    history: tuple[tuple[float, float, int], ...]
    randomness: str | None = None  # dp_random kind; None when nothing was accounted


def plan_round(n_train: int, *, batch_size: int, epochs: int, terms: PrivacyTerms,
               sample_rate: float | None = None, steps_per_round: int | None = None) -> RoundPlan:
    """Plan a round's DP-SGD: Poisson sampling rate, steps and noise.

    With ``sample_rate`` and ``steps_per_round`` (the federation file's public values),
    every number of the plan is public: each patient joins each of the ``steps_per_round``
    batches with probability ``sample_rate``, and the noisy sum is divided by the public
    ``batch_size``. Without them the plan is Opacus's default: rate ``1 / ceil(n /
    batch_size)`` and ``ceil(n / batch_size)`` steps per epoch, which depend on the
    training-set size ``n`` (only through ``ceil(n / batch_size)``).

    Raises:
        ValueError: no training examples, or only one of the two public values given.
    """
    if n_train < 1:
        raise ValueError("no training examples")
    if (sample_rate is None) != (steps_per_round is None):
        raise ValueError("give both sample_rate and steps_per_round, or neither")
    sampling = "public"
    if sample_rate is None:
        batches = math.ceil(n_train / batch_size)
        sample_rate = 1.0 / batches
        steps = batches * epochs
        sampling = "training-set size"
    else:
        steps, epochs = int(steps_per_round), 1
    noise = terms.noise_multiplier
    if noise is None:
        noise = noise_for_target(target_epsilon=terms.target_epsilon_per_round, delta=terms.delta,
                                 sample_rate=sample_rate, steps=steps, accountant=terms.accountant)
    return RoundPlan(noise_multiplier=noise, sample_rate=float(sample_rate), steps=steps,
                     batch_size=batch_size, epochs=epochs, sampling=sampling)


def _loss(logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
    total = None
    for task, out in logits.items():
        y = labels[task]
        # Per-sample losses, summed over tasks; missing labels (-1) contribute zero.
        per = nn.functional.cross_entropy(out, y.clamp(min=0), reduction="none") * (y >= 0).to(out.dtype)
        total = per if total is None else total + per
    return total.mean()


def train_dp(model: BlockModel, data: SiteTensors, plan: RoundPlan, *, max_grad_norm: float,
             learning_rate: float, randomness: DPRandomness, momentum: float = 0.0,
             max_physical_batch_size: int | None = None, frozen: Collection[str] = ()) -> TrainResult:
    """Train every block of ``model`` but the ``frozen`` ones in place with DP-SGD for ``plan``.

    Args:
        model: The site's model (modified in place).
        data: The training split.
        plan: The DP parameters recorded in the ledger beforehand.
        max_grad_norm: Per-sample clipping norm.
        learning_rate: SGD step size.
        momentum: SGD momentum (post-processing of the noisy gradients: no privacy cost;
            the momentum buffer starts at zero every round).
        randomness: The round's source of Poisson sampling and Gaussian noise
            (:class:`~blossom_secure.site.dp_random.DPRandomness`): from the OS CSPRNG, or a
            seeded simulation whose epsilon is nominal.
        max_physical_batch_size: Run a Poisson batch through the model in parts of at most
            this many patients (less memory for large networks). The step, its noise and its
            accounting are those of the whole batch: sampling, clipping, noise and the
            ledger's plan do not change. ``None``: the whole batch at once. The site agent
            passes the federation file's ``training.max_physical_batch_size``.
        frozen: Blocks that stay as they are (fine-tuning the others): they take no
            gradient, so the clipping norm and the noise are spent on the trained blocks
            only. The step's accounting is the same (a DP-SGD step on the trained blocks;
            the frozen ones are constants of it).

    Returns:
        Steps taken, mean loss, and the (noise, rate, steps) history Opacus accounted.

    Raises:
        RuntimeError: Opacus ran a different number of steps or sample rate than planned
            (the ledger would then be wrong; the update must not be released).
        ValueError: ``max_physical_batch_size`` is given and not a positive int, or
            ``frozen`` names a block the model does not have or every block.
    """
    if max_physical_batch_size is not None and (
            not isinstance(max_physical_batch_size, int) or isinstance(max_physical_batch_size, bool)
            or max_physical_batch_size < 1):
        raise ValueError("max_physical_batch_size must be a positive int or None")
    with warnings.catch_warnings():
        # Documented in the module notes (secure_mode), and harmless (hooks on inputs).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        with _frozen_blocks(model, frozen):
            return _train_dp(model, data, plan, max_grad_norm=max_grad_norm, learning_rate=learning_rate,
                             randomness=randomness, momentum=momentum,
                             max_physical_batch_size=max_physical_batch_size)


@contextlib.contextmanager
def _frozen_blocks(model: BlockModel, frozen: Collection[str]) -> Iterator[None]:
    """Within the block, the parameters of the ``frozen`` blocks take no gradient."""
    blocks = model.blocks()
    unknown = sorted(set(frozen) - set(blocks))
    if unknown:
        raise ValueError(f"cannot freeze {unknown[0]!r}: the model has no such block")
    if frozen and set(frozen) >= set(blocks):
        raise ValueError("every block is frozen: nothing to train")
    params = [p for name in frozen for p in blocks[name].parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def _train_dp(model: BlockModel, data: SiteTensors, plan: RoundPlan, *, max_grad_norm: float,
              learning_rate: float, randomness: DPRandomness, momentum: float,
              max_physical_batch_size: int | None) -> TrainResult:
    from opacus import PrivacyEngine

    dataset, unpack = _dataset(model, data)
    sampler = PoissonBatchSampler(num_samples=len(dataset), sample_rate=plan.sample_rate,
                                  steps=plan.steps // plan.epochs, randomness=randomness)
    # Opacus reads the loader's length and dataset only (the sampling is ours, below).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                momentum=momentum)
    engine = PrivacyEngine(accountant="rdp")
    # Opacus wraps the model (per-sample gradients) and validates it; the loader is ours
    # (Poisson sampling from the keyed stream), and so is the optimizer's noise.
    dp_model, opacus_opt, _ = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=False)
    dp_model.forbid_grad_accumulation()
    # The noisy sum is divided by the public expected batch size, never by a count of patients.
    dp_opt = _KeyedNoiseDPOptimizer(
        opacus_opt.original_optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=plan.batch_size, randomness=randomness)
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    dp_model.train()
    losses = []
    steps = 0
    for _ in range(plan.epochs):
        for batch in _poisson_batches(sampler, dataset.tensors):
            # A logical (Poisson) batch in physical parts of at most max_physical_batch_size
            # patients: every part's per-sample gradients are clipped and summed, and only the
            # last part's step adds the noise and is accounted (Opacus's skip-step signal, as
            # in its BatchMemoryManager), so the step is the same DP-SGD step.
            parts = _physical_parts(batch, max_physical_batch_size)
            batch_loss = 0.0
            for i, part in enumerate(parts):
                dp_opt.signal_skip_step(do_skip=i < len(parts) - 1)
                inputs, labels = unpack(part)
                dp_opt.zero_grad(set_to_none=True)
                if part[0].shape[0] > 0:
                    logits = dp_model(*inputs)
                    loss = _loss(logits, labels)
                    loss.backward()
                    batch_loss += float(loss.detach()) * part[0].shape[0]
                else:
                    # An empty Poisson batch: no per-sample gradients, but the step (noise
                    # only) is still taken and accounted, exactly as DP-SGD prescribes.
                    for p in dp_model.parameters():
                        if p.requires_grad:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                dp_opt.step()
            if batch[0].shape[0] > 0:
                losses.append(batch_loss / batch[0].shape[0])
            steps += 1
    history = tuple((float(s), float(q), int(n)) for s, q, n in engine.accountant.history)
    accounted = sum(n for _, _, n in history)
    if accounted != plan.steps or any(abs(q - plan.sample_rate) > 1e-12 or s != plan.noise_multiplier
                                      for s, q, _ in history):
        raise RuntimeError(f"Opacus accounted {history}, but the ledger recorded "
                           f"({plan.noise_multiplier}, {plan.sample_rate}, {plan.steps})")
    dp_model._close()
    return TrainResult(steps=steps, mean_loss=float(np.mean(losses)) if losses else float("nan"), history=history,
                       randomness=randomness.kind)


class _KeyedNoiseDPOptimizer(DPOptimizer):
    """Opacus's DP optimizer with the Gaussian noise drawn from a :class:`DPRandomness`
    stream instead of torch's generator; clipping, accumulation and scaling are Opacus's."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, randomness: DPRandomness) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean")
        self.randomness = randomness

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        # One pass over the stream for every parameter: the same values as one
        # gaussian_like call per parameter, in order.
        noises = self.randomness.gaussian_like_each([p.summed_grad for p in self.params],
                                                    self.noise_multiplier * self.max_grad_norm)
        for p, noise in zip(self.params, noises, strict=True):
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def _physical_parts(batch: list[torch.Tensor], max_size: int | None) -> list[list[torch.Tensor]]:
    """``batch`` in consecutive parts of at most ``max_size`` rows (the whole batch, even
    empty, when ``max_size`` is None or not exceeded)."""
    n = batch[0].shape[0]
    if max_size is None or n <= max_size:
        return [batch]
    return [[t[start:start + max_size] for t in batch] for start in range(0, n, max_size)]


def _poisson_batches(sampler: PoissonBatchSampler, tensors: Sequence[torch.Tensor]):
    """The sampler's batches, each a list of the rows of every tensor in ``tensors``
    (possibly empty). What a DataLoader over the same sampler yields, gathered with one
    index per tensor instead of one dataset item per patient."""
    for idx in sampler:
        rows = torch.as_tensor(idx, dtype=torch.int64)
        yield [t.index_select(0, rows) for t in tensors]


def _dataset(model: BlockModel, data: SiteTensors):
    """A TensorDataset of ``data`` and a function turning one of its batches into
    ``(forward arguments, labels by task)``. The first tensor is always the image
    presence mask (its length is the batch size)."""
    extras = [m for m in model.modalities if m in data.extra]
    tensors = [data.image_present, data.tabular_present]
    tensors += [data.extra_present[m] for m in extras]
    names = []
    if data.image is not None:
        tensors.append(data.image)
        names.append("image")
    if data.tabular is not None:
        tensors.append(data.tabular)
        names.append("tabular")
    tensors += [data.extra[m] for m in extras]
    tasks = list(model.tasks)
    tensors.extend(data.labels[t] for t in tasks)
    k = len(extras)

    def unpack(batch):
        img_p, tab_p = batch[0], batch[1]
        ex_p = dict(zip(extras, batch[2:2 + k], strict=True))
        rest = batch[2 + k:]
        inputs = dict(zip(names, rest[: len(names)], strict=True))
        ex = dict(zip(extras, rest[len(names): len(names) + k], strict=True))
        labels = dict(zip(tasks, rest[len(names) + k:], strict=True))
        return (inputs.get("image"), img_p, inputs.get("tabular"), tab_p, ex, ex_p), labels

    return torch.utils.data.TensorDataset(*tensors), unpack


def train_without_dp_simulation_only(model: BlockModel, data: SiteTensors, *, epochs: int, batch_size: int,
                                     learning_rate: float, momentum: float, seed: int,
                                     frozen: Collection[str] = ()) -> TrainResult:
    """Train every block but the ``frozen`` ones with plain mini-batch SGD: **no clipping,
    no noise, no privacy**.

    For simulations that measure what differential privacy costs (the "DP off" arm of
    ``blossom experiment``) and nothing else: a site agent reaches it only when built
    with ``simulation_without_dp=True`` and an explicit simulation seed, never from a
    policy file. Shuffled batches of ``batch_size``, ``ceil(n / batch_size)`` steps per
    epoch (the same number of steps as DP-SGD's plan), SGD with ``momentum``.

    Returns:
        Steps taken, mean loss, and an empty history (nothing is accounted).

    Raises:
        ValueError: no training examples.
    """
    if len(data) < 1:
        raise ValueError("no training examples")
    with _frozen_blocks(model, frozen):
        return _train_plain(model, data, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                            momentum=momentum, seed=seed)


def _train_plain(model: BlockModel, data: SiteTensors, *, epochs: int, batch_size: int, learning_rate: float,
                 momentum: float, seed: int) -> TrainResult:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dataset, unpack = _dataset(model, data)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                momentum=momentum)
    model.train()
    losses, steps = [], 0
    for _ in range(epochs):
        for batch in loader:
            inputs, labels = unpack(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(model(*inputs), labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            steps += 1
    return TrainResult(steps=steps, mean_loss=float(np.mean(losses)), history=())


@torch.no_grad()
def evaluate(model: BlockModel, data: SiteTensors) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 per task on ``data`` (patients with a label for the task).

    Macro-F1 averages the F1 of the classes present among the patients evaluated: a class
    a site never sees would count as 0 and make the same model look worse at a site with
    fewer classes (label skew)."""
    from sklearn.metrics import f1_score

    model.eval()
    logits = model(*data.model_inputs())
    out = {}
    for task, lg in logits.items():
        y = data.labels[task].numpy()
        keep = y >= 0
        pred = lg.argmax(dim=1).numpy()[keep]
        y = y[keep]
        if y.size == 0:
            continue
        out[task] = {
            "accuracy": float((pred == y).mean()),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0)),
            "n": int(y.size),
        }
    model.train()
    return out
