"""The federation file.

The **federation file** (``federation.toml``) is shared by every member out of band: the
federation id, the block layout (embedding size, imaging encoder, tabular features, tasks),
training and aggregation parameters. Every site builds its blocks from it, so a block has
the same shape at every site that holds it. A hospital's own site file is read by
:mod:`blossom_secure.site.config`.

It is data only; every problem is reported at once as a
:class:`~blossom_secure.errors.PolicyError`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from blossom_secure._toml import Table, read_root_table
from blossom_secure.blocks import (
    FUSION,
    MODALITIES,
    encoder_block,
    head_block,
    is_valid_modality_name,
    is_valid_task_name,
)
from blossom_secure.errors import PolicyError, Problem

__all__ = [
    "AggregationConfig",
    "FeatureScale",
    "FederationConfig",
    "ImageConfig",
    "ModelLayout",
    "TabularConfig",
    "TrainingConfig",
    "WeightingConfig",
    "load_federation",
    "read_ident",
]

_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
AGGREGATION_MODES = ("blockwise", "full-model", "paper-full-model", "local")
IMAGE_ARCHITECTURES = ("cnn", "densenet121")


@dataclass(frozen=True)
class ImageConfig:
    spatial_dims: int
    size: tuple[int, ...]
    window: tuple[float, float] | None
    architecture: str
    channels: tuple[int, ...]
    norm: str


@dataclass(frozen=True)
class FeatureScale:
    """The public scaling of one tabular feature, declared in the federation file.

    A raw value ``x`` becomes ``(clip(x, low, high) - centre) / scale``. Every number here
    is public (chosen from domain knowledge or published reference ranges, never from the
    sites' patients), so the model input of one patient never depends on another patient.
    """

    low: float
    high: float
    centre: float
    scale: float


@dataclass(frozen=True)
class TabularConfig:
    features: tuple[str, ...]
    hidden: tuple[int, ...]
    scaling: tuple[FeatureScale, ...] = ()  # one per feature, in the order of ``features``


@dataclass(frozen=True)
class ModelLayout:
    """The federation's block layout: what every block is, wherever it is built.

    Attributes:
        embedding_dim: Size of every modality embedding and of the fused representation.
        image: The ``image`` modality's encoder.
        tabular: The ``tabular`` modality's encoder (clinical table).
        tasks: Task -> number of classes.
        extra_tabular: Further tabular modalities, name -> encoder (from
            ``[model.extra_tabular.<name>]``): for data sets whose features fall into
            several groups that sites may hold separately (for example two sets of
            measurements). Each gets its own block ``encoder.<name>``. Empty by default.
    """

    embedding_dim: int
    image: ImageConfig
    tabular: TabularConfig
    tasks: dict[str, int]  # task -> number of classes
    extra_tabular: Mapping[str, TabularConfig] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every modality of the federation, in canonical order (built-ins, then extras sorted)."""
        return MODALITIES + tuple(sorted(self.extra_tabular))

    def tabular_config(self, modality: str) -> TabularConfig:
        """The tabular encoder configuration of ``modality`` (``tabular`` or an extra one).

        Raises:
            KeyError: ``modality`` is not a tabular modality of this layout.
        """
        if modality == "tabular":
            return self.tabular
        return self.extra_tabular[modality]

    def blocks_for(self, modalities: tuple[str, ...], tasks: tuple[str, ...]) -> tuple[str, ...]:
        """Block names a site with these modalities and tasks builds, in canonical order."""
        return (
            tuple(encoder_block(m) for m in self.modalities if m in modalities)
            + (FUSION,)
            + tuple(head_block(t) for t in sorted(tasks))
        )


@dataclass(frozen=True)
class TrainingConfig:
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    holdout_fraction: float
    split_seed: int
    #: Public Poisson sampling rate and steps per round (both or neither); see
    #: :func:`blossom_secure.site.training.plan_round`.
    sample_rate: float | None = None
    steps_per_round: int | None = None
    #: At most this many patients of a Poisson batch go through the model at once
    #: (:func:`blossom_secure.site.training.train_dp`): memory only. The logical batch, its
    #: clipping, its one noise draw and its one accounted step are the same, so the
    #: sampling, the noise and the epsilon do not change. Any positive int (one at least
    #: as large as every batch never splits it); ``None``: each batch at once.
    max_physical_batch_size: int | None = None


@dataclass(frozen=True)
class AggregationConfig:
    """The ``[aggregation]`` table: public terms of aggregation shared by every member.

    Attributes:
        max_sites: Public upper bound on the number of member sites: the no-wrap proof of
            secure aggregation uses it, and the thresholds of blocks without a declared
            group must be a strict majority of it. ``None``: not declared, the roster's
            size stands in.
        threshold: The Shamir threshold ``t`` of every block without a declared group
            (Bonawitz et al. 2017); ``None``: ``floor(2 * max_sites / 3) + 1`` (at least
            ``min_contributors``).
        thresholds: Per-block overrides (``[aggregation.thresholds]``): against
            ``max_sites`` for a block without a declared group, against the group's size
            for one with a group.
        groups: Public block groups (``[aggregation.groups]``): block name to the sorted
            ids of the sites allowed to contribute it, ``P_b``. A grouped block's
            threshold must be a strict majority of ``|P_b|`` (default
            ``max(min_contributors, floor(2 * |P_b| / 3) + 1)``, at most ``|P_b|``).
        sparse: The sparse masking graph for large block groups (``[aggregation.sparse]``:
            ``neighbours`` and optionally ``from_sites``, ``share_threshold`` and
            ``min_masked``; :class:`blossom_secure.secagg.params.SparseGraph`), or
            ``None``: every block group masks over its complete graph.
    """

    mode: str
    secure: bool
    min_contributors: int
    clip: float
    ring_bits: int
    max_weight: int
    max_sites: int | None = None
    threshold: int | None = None
    thresholds: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    sparse: Mapping[str, int] | None = None


@dataclass(frozen=True)
class WeightingConfig:
    """How much each site's update counts in a block's mean: a public number, never the
    site's exact training-set size.

    Attributes:
        scheme: ``equal`` (every contribution weighs 1) or ``declared`` (each site's weight
            is the public number in ``declared``, from ``[weighting.sites]``).
        declared: Site id -> declared weight (``declared`` scheme only).
    """

    scheme: str = "equal"
    declared: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def weight_of(self, site_id: str) -> int | None:
        """The public weight of ``site_id``'s contributions, or ``None`` if it has none."""
        if self.scheme == "equal":
            return 1
        return self.declared.get(site_id)


@dataclass(frozen=True)
class FederationConfig:
    path: Path
    id: str
    name: str
    coordinator: str
    layout: ModelLayout
    training: TrainingConfig
    aggregation: AggregationConfig
    synth_seed: int
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    sha256: str = ""  # hex SHA-256 of the file's exact bytes (bound into every signed protocol message)


def load_federation(path: Path) -> FederationConfig:
    """Read and validate a federation file.

    Raises:
        PolicyError: every problem found, with file, key and reason.
    """
    path = Path(path)
    root = read_root_table(path)
    problems = root.problems

    fed = root.table("federation")
    fid = name = coordinator = None
    if fed is not None:
        fid = read_ident(fed, "id")
        name = fed.str("name", required=False, default=fid)
        coordinator = fed.str("coordinator", required=False, default="embedded")
        fed.finish()

    layout = _parse_layout(root.table("model"))

    tr = root.table("training")
    training = None
    if tr is not None:
        values = dict(
            rounds=tr.int("rounds", minimum=1, maximum=10_000),
            local_epochs=tr.int("local_epochs", required=False, default=1, minimum=1, maximum=100),
            batch_size=tr.int("batch_size", minimum=1, maximum=4096),
            learning_rate=tr.float("learning_rate", exclusive_minimum=0.0, maximum=10.0),
            momentum=tr.float("momentum", required=False, default=0.0, minimum=0.0, exclusive_maximum=1.0),
            holdout_fraction=tr.float("holdout_fraction", required=False, default=0.25,
                                      exclusive_minimum=0.0, exclusive_maximum=1.0),
            split_seed=tr.int("split_seed", required=False, default=0, minimum=0),
        )
        sample_rate = tr.float("sample_rate", required=False, exclusive_minimum=0.0, maximum=1.0)
        steps_per_round = tr.int("steps_per_round", required=False, minimum=1, maximum=1_000_000)
        if ("sample_rate" in tr.data) != ("steps_per_round" in tr.data):
            tr.problem("sample_rate", "declare both sample_rate and steps_per_round (public DP-SGD sampling), "
                                      "or neither")
        # Memory only (physical parts of each Poisson batch): no bound but 1, since a value
        # above every batch's size simply never splits one.
        max_physical_batch_size = tr.int("max_physical_batch_size", required=False, minimum=1)
        tr.finish()
        if None not in values.values():
            training = TrainingConfig(**values, sample_rate=sample_rate, steps_per_round=steps_per_round,
                                      max_physical_batch_size=max_physical_batch_size)

    ag = root.table("aggregation", required=False)
    aggregation = AggregationConfig(mode="blockwise", secure=True, min_contributors=2, clip=1.0, ring_bits=32,
                                    max_weight=10_000)
    if ag is not None:
        values = dict(
            mode=ag.choice("mode", AGGREGATION_MODES, required=False, default="blockwise"),
            secure=ag.bool("secure", required=False, default=True),
            min_contributors=ag.int("min_contributors", required=False, default=2, minimum=2),
            clip=ag.float("clip", required=False, default=1.0, exclusive_minimum=0.0, maximum=1e6),
            ring_bits=ag.int("ring_bits", required=False, default=32),
            max_weight=ag.int("max_weight", required=False, default=10_000, minimum=1, maximum=1 << 30),
        )
        if values["ring_bits"] not in (32, 64):
            ag.problem("ring_bits", "must be 32 or 64")
        # Public secure-aggregation terms: never taken from the coordinator's view of a
        # round. Each threshold must be a strict majority of the sites that could sign
        # for its block (two disjoint sets of sites can then never both pass the
        # consistency check; Bonawitz et al. 2017, sections 4 and 6) and at least
        # min_contributors: of max_sites, or of the block's public group P_b where
        # [aggregation.groups] declares one (only its members may take part in the block).
        max_sites = ag.int("max_sites", required=False, minimum=2, maximum=1 << 16)
        threshold = ag.int("threshold", required=False, minimum=2, maximum=1 << 16)
        shareable = ({encoder_block(m) for m in layout.modalities} | {FUSION}) if layout is not None else None
        groups: dict[str, tuple[str, ...]] = {}
        gr = ag.table("groups", required=False)
        if gr is not None:
            for block in sorted(gr.data):
                members = gr.str_list(block)
                if shareable is not None and block not in shareable:
                    gr.problem(block, "not a shared block of the layout (encoder.<modality> or fusion)")
                elif members is None:
                    continue
                elif max_sites is None:
                    gr.problem(block, "needs max_sites: a group is checked against the public bound on sites")
                elif any(not _ID_RE.fullmatch(m) for m in members):
                    gr.problem(block, "not a list of site ids (lower-case letters, digits, '-' or '_')")
                elif len(set(members)) != len(members):
                    gr.problem(block, "names a site twice")
                elif len(members) < 2:
                    gr.problem(block, "must name at least 2 sites (a sum over one site is that site's update)")
                elif len(members) > max_sites:
                    gr.problem(block, f"names {len(members)} sites, more than max_sites ({max_sites})")
                else:
                    groups[block] = tuple(sorted(members))
            gr.finish()
        # A block whose group is refused gets no second, misleading problem for its threshold.
        bad_groups = set(gr.data) - set(groups) if gr is not None else set()
        thresholds: dict[str, int] = {}
        th = ag.table("thresholds", required=False)
        if th is not None:
            for block in sorted(th.data):
                value = th.int(block, minimum=2, maximum=1 << 16)
                if shareable is not None and block not in shareable:
                    th.problem(block, "not a shared block of the layout (encoder.<modality> or fusion)")
                elif value is not None:
                    thresholds[block] = value
            th.finish()
        minimum = values["min_contributors"]
        sparse = _parse_sparse(ag.table("sparse", required=False), minimum)
        if max_sites is not None and minimum is not None and minimum > max_sites:
            ag.problem("min_contributors", f"must not exceed max_sites ({max_sites})")
        declared = [(ag, "threshold", threshold)] if threshold is not None else []
        for table, key, value in (*declared, *((th, b, v) for b, v in thresholds.items() if b not in bad_groups)):
            if max_sites is None:
                table.problem(key, "needs max_sites: a threshold is checked against the public bound on sites")
                continue
            group = groups.get(key) if table is th else None
            bound, name = (len(group), f"the {len(group)} sites of its group") if group else (max_sites, "max_sites")
            if minimum is not None and value < minimum:
                table.problem(key, f"must be at least min_contributors ({minimum})")
            if value > bound:
                table.problem(key, f"must not exceed {name} ({bound})")
            if 2 * value <= bound:
                table.problem(key, f"must be more than half of {name} ({bound}), at least "
                                   f"{bound // 2 + 1}, so that two disjoint sets of sites can never both pass "
                                   "the consistency check")
        ag.finish()
        if None not in values.values():
            aggregation = AggregationConfig(**values, max_sites=max_sites, threshold=threshold,
                                            thresholds=MappingProxyType(thresholds), groups=MappingProxyType(groups),
                                            sparse=sparse)

    weighting = _parse_weighting(root.table("weighting", required=False),
                                 aggregation.max_weight if aggregation is not None else None)

    synth = root.table("synth", required=False)
    synth_seed = 0
    if synth is not None:
        synth_seed = synth.int("seed", minimum=0) or 0
        synth.finish()

    root.finish()
    if problems:
        raise PolicyError(problems)
    return FederationConfig(path=path, id=fid, name=name, coordinator=coordinator, layout=layout,
                            training=training, aggregation=aggregation, synth_seed=synth_seed, weighting=weighting,
                            sha256=hashlib.sha256(path.read_bytes()).hexdigest())


WEIGHTING_SCHEMES = ("equal", "declared")


def _parse_sparse(table: Table | None, min_contributors: int | None) -> Mapping[str, int] | None:
    """``[aggregation.sparse]``: the sparse masking graph's public terms, checked as
    :class:`blossom_secure.secagg.params.SparseGraph` checks them (defaults filled in)."""
    if table is None:
        return None
    k = table.int("neighbours", minimum=2, maximum=1 << 16)
    from_sites = table.int("from_sites", required=False, minimum=4, maximum=1 << 16)
    share_threshold = table.int("share_threshold", required=False, minimum=2, maximum=1 << 16)
    min_masked = table.int("min_masked", required=False, minimum=1, maximum=1 << 16)
    table.finish()
    if k is None:
        return None
    if k % 2:
        table.problem("neighbours", "must be even (each site is joined to neighbours / 2 on either side of a ring)")
        return None
    terms = {"neighbours": k, "from_sites": 3 * k if from_sites is None else from_sites,
             "share_threshold": k // 2 + 1 if share_threshold is None else share_threshold,
             "min_masked": k // 2 if min_masked is None else min_masked}
    if terms["from_sites"] < k + 2:
        table.problem("from_sites", f"must be at least neighbours + 2 ({k + 2}): a smaller group is a complete "
                                    "graph already")
    if terms["share_threshold"] > k + 1:
        table.problem("share_threshold", f"must not exceed neighbours + 1 ({k + 1}), the holders of a secret")
    if terms["min_masked"] > k:
        table.problem("min_masked", f"must not exceed neighbours ({k})")
    elif min_contributors is not None and terms["min_masked"] + 1 < min_contributors:
        table.problem("min_masked", f"plus one must be at least min_contributors ({min_contributors}): it is the "
                                    "fewest inputs an unmasked value can involve")
    return MappingProxyType(terms)


def _parse_weighting(table: Table | None, max_weight: int | None) -> WeightingConfig:
    """``[weighting]``: ``scheme = "equal"`` (default) or ``"declared"`` with a
    ``[weighting.sites]`` table of public weights, each at most ``aggregation.max_weight``."""
    if table is None:
        return WeightingConfig()
    scheme = table.choice("scheme", WEIGHTING_SCHEMES, required=False, default="equal")
    declared: dict[str, int] = {}
    sites = table.table("sites", required=scheme == "declared")
    if sites is not None:
        if scheme != "declared":
            table.problem("sites", 'declared weights need scheme = "declared"')
        for site_id in list(sites.data):
            if not _ID_RE.fullmatch(site_id):
                sites.problem(site_id, "not a site id (lower-case letters, digits, '-' or '_')")
                sites.mark_seen(site_id)
                continue
            value = sites.int(site_id, minimum=1, maximum=max_weight if max_weight is not None else 1 << 30)
            if value is not None:
                declared[site_id] = value
        if scheme == "declared" and not sites.data:
            table.problem("sites", "declare at least one site's weight")
        sites.finish()
    table.finish()
    return WeightingConfig(scheme=scheme or "equal", declared=MappingProxyType(declared))


def _parse_scaling(table: Table, features: list[str] | None) -> tuple[FeatureScale, ...] | None:
    """``scaling``: for every feature, ``{ range = [low, high], centre = c, scale = s }``
    (``centre`` and ``scale`` default to the middle and half-width of the range)."""
    sc = table.table("scaling", required=False)
    if sc is None:
        if features:
            table.problem("scaling", "declare the public scaling of every feature "
                                     "(feature = { range = [low, high], centre = c, scale = s }); "
                                     "it is never computed from the patients")
        return None
    out: list[FeatureScale] = []
    ok = True
    for f in features or ():
        entry = sc.table(f)
        if entry is None:
            ok = False
            continue
        bounds = entry.float_pair("range")
        centre = entry.float("centre", required=False)
        scale = entry.float("scale", required=False, exclusive_minimum=0.0)
        entry.finish()
        if bounds is None:
            ok = False
            continue
        low, high = bounds
        if not (math.isfinite(low) and math.isfinite(high)):
            entry.problem("range", "must be two finite numbers")
            ok = False
            continue
        out.append(FeatureScale(low=low, high=high, centre=(low + high) / 2 if centre is None else centre,
                                scale=(high - low) / 2 if scale is None else scale))
    sc.mark_seen(*(features or ()))
    sc.finish()
    return tuple(out) if ok and features is not None else None


def read_ident(table: Table, name: str) -> str | None:
    """The identifier at ``name`` (federation, site, task ids): checked, or ``None`` with a problem."""
    value = table.str(name)
    if value is not None and not _ID_RE.fullmatch(value):
        table.problem(name, "must be lower-case letters, digits, '-' or '_' (at most 63), starting with a letter or digit")
        return None
    return value


def _parse_layout(model: Table | None) -> ModelLayout | None:
    if model is None:
        return None
    embedding_dim = model.int("embedding_dim", minimum=2, maximum=4096)

    image = None
    im = model.table("image")
    if im is not None:
        dims = im.int("spatial_dims", minimum=2, maximum=3)
        size = im.int_list("size", minimum=8, length=dims) if dims else None
        window = im.float_pair("window", required=False)
        arch = im.choice("architecture", IMAGE_ARCHITECTURES, required=False, default="cnn")
        channels = im.int_list("channels", required=False, default=[8, 16, 32])
        norm = im.choice("norm", ("group", "instance"), required=False, default="group")
        if channels and norm == "group" and any(c % 4 for c in channels):
            im.problem("channels", "with group norm every channel count must be a multiple of 4")
        im.finish()
        if None not in (dims, size, arch, channels, norm):
            image = ImageConfig(spatial_dims=dims, size=tuple(size), window=window, architecture=arch,
                                channels=tuple(channels), norm=norm)

    tabular = None
    tb = model.table("tabular")
    if tb is not None:
        features = tb.str_list("features")
        hidden = tb.int_list("hidden", required=False, default=[64])
        scaling = _parse_scaling(tb, features)
        tb.finish()
        if features is not None and hidden is not None and scaling is not None:
            tabular = TabularConfig(features=tuple(features), hidden=tuple(hidden), scaling=scaling)

    extra_tabular = _parse_extra_tabular(model.table("extra_tabular", required=False), tabular)

    tasks: dict[str, int] = {}
    tt = model.table("tasks")
    if tt is not None:
        for task in list(tt.data):
            if not is_valid_task_name(task):
                tt.problem(task, "task names are lower-case identifiers (letters, digits, '_')")
                tt.mark_seen(task)
                continue
            classes = tt.int(task, minimum=2, maximum=1000)
            if classes is not None:
                tasks[task] = classes
        if not tt.data:
            tt.problems.append(Problem(tt.file, tt.prefix, "declare at least one task"))
        tt.finish()
    model.finish()
    if None in (embedding_dim, image, tabular, extra_tabular) or tt is None or not tasks:
        return None
    return ModelLayout(embedding_dim=embedding_dim, image=image, tabular=tabular, tasks=tasks,
                       extra_tabular=MappingProxyType(extra_tabular))


def _parse_extra_tabular(table: Table | None, tabular: TabularConfig | None) -> dict[str, TabularConfig] | None:
    """``[model.extra_tabular.<name>]`` tables: further tabular modalities (``None``: problems)."""
    if table is None:
        return {}
    out: dict[str, TabularConfig] = {}
    ok = True
    columns: dict[str, str] = {f: "tabular" for f in (tabular.features if tabular is not None else ())}
    for name in list(table.data):
        if not is_valid_modality_name(name) or name in MODALITIES:
            table.problem(name, "a modality name is a lower-case identifier other than "
                                f"{', '.join(MODALITIES)}")
            table.mark_seen(name)
            ok = False
            continue
        sub = table.table(name)
        if sub is None:
            ok = False
            continue
        features = sub.str_list("features")
        hidden = sub.int_list("hidden", required=False, default=[64])
        for f in features or ():
            if f in columns:
                sub.problem("features", f"column {f!r} already belongs to modality {columns[f]!r}")
                features = None
                break
            columns[f] = name
        scaling = _parse_scaling(sub, features)
        sub.finish()
        if features is None or hidden is None or scaling is None:
            ok = False
            continue
        out[name] = TabularConfig(features=tuple(features), hidden=tuple(hidden), scaling=scaling)
    table.finish()
    return out if ok else None
