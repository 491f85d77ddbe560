"""The site file.

A **site file** (``<site>/site.toml``) belongs to one hospital: its id, the policy it is
bound by, and its data manifest (modalities, DICOM folder, clinical CSV, tasks and label
columns). Optional ``[synth]`` says how the example sites' data are generated on first use.

It is data only; every problem is reported at once as a
:class:`~blossom_secure.errors.PolicyError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from blossom_secure._toml import Table, read_root_table
from blossom_secure.blocks import MODALITIES, is_valid_modality_name, is_valid_task_name
from blossom_secure.config import FederationConfig, read_ident
from blossom_secure.errors import PolicyError, Problem
from blossom_secure.site.policy import Policy, load_policy

__all__ = ["AUDIT_FILE", "BLOCKS_FILE", "DATA_ORIGINS", "LEDGER_FILE", "SiteConfig", "SynthConfig",
           "federation_blocks", "load_site", "policy_refusal", "shareable_name_problems",
           "shareable_pattern_warnings", "site_dirs"]

#: The site's files in its state folder (``<site>/state/``): its model blocks (private
#: ones included), its privacy ledger and its audit log (the signed checkpoint beside it).
BLOCKS_FILE = "blocks.npz"
LEDGER_FILE = "ledger.json"
AUDIT_FILE = "audit.jsonl"

COMPRESSIONS = ("none", "rle", "jpeg2000")
DATA_ORIGINS = ("patients", "synthetic", "public-benchmark")


@dataclass(frozen=True)
class SynthConfig:
    seed: int
    patients: int
    image_fraction: float
    tabular_fraction: float
    shift: float
    compression: str | None


@dataclass(frozen=True)
class SiteConfig:
    """A validated site file (and the policy it names)."""

    root: Path
    id: str
    name: str
    policy: Policy
    modalities: tuple[str, ...]
    dicom_dir: Path | None
    clinical_csv: Path
    patient_id_column: str
    tasks: dict[str, str]  # task -> label column
    synth: SynthConfig | None = None
    federation_file: Path | None = None
    blocks: tuple[str, ...] = field(default=())
    #: ``patients`` (default: real patient data), ``synthetic`` (generated; implied by a
    #: ``[synth]`` section) or ``public-benchmark`` (a published data set). Only a site
    #: whose data are not patients' may run a seeded simulation (nominal epsilon).
    data_origin: str = "patients"

    @property
    def may_seed_dp_noise(self) -> bool:
        """Whether a simulation may seed this site's DP noise (never for patient data)."""
        return self.data_origin != "patients"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"


def load_site(site_dir: Path, *, federation: FederationConfig | None = None) -> SiteConfig:
    """Read and validate ``site_dir/site.toml`` and the policy it names.

    Paths in the site file are relative to the site folder. If ``federation`` is given, the
    site's tasks must be federation tasks, its policy must name that federation, and the
    site's block list is filled in.

    Raises:
        PolicyError: every problem in the site file and its policy, together.
    """
    site_dir = Path(site_dir)
    path = site_dir / "site.toml"
    if not site_dir.is_dir():
        raise PolicyError([Problem(str(site_dir), "", "site folder not found")])
    root = read_root_table(path)
    problems = root.problems

    site = root.table("site")
    sid = name = policy = federation_file = None
    data_origin = "patients"
    if site is not None:
        sid = read_ident(site, "id")
        name = site.str("name", required=False, default=sid)
        data_origin = site.choice("data_origin", DATA_ORIGINS, required=False, default="patients")
        policy_ref = site.str("policy")
        if policy_ref is not None:
            try:
                policy = load_policy(Path(os.path.normpath(site_dir / policy_ref)))
            except PolicyError as exc:
                problems.extend(exc.problems)
        fed_ref = site.str("federation", required=False)
        if fed_ref is not None:
            federation_file = Path(os.path.normpath(site_dir / fed_ref))
        site.finish()

    dt = root.table("data")
    modalities = dicom_dir = csv = id_col = None
    if dt is not None:
        modalities = dt.str_list("modalities")
        if modalities is not None:
            known = MODALITIES
            if federation is not None and federation.layout is not None:
                known = federation.layout.modalities
            unknown = [m for m in modalities if m not in known]
            if unknown and federation is None:
                # Without the federation file, extra tabular modalities cannot be checked yet.
                unknown = [m for m in unknown if not is_valid_modality_name(m)]
            if unknown:
                dt.problem("modalities", f"unknown modality {unknown[0]!r} (known: {', '.join(known)})")
                modalities = None
            elif len(set(modalities)) != len(modalities):
                dt.problem("modalities", "a modality is listed twice")
                modalities = None
        dicom_ref = dt.str("dicom_dir", required=bool(modalities and "image" in modalities))
        if dicom_ref is not None:
            dicom_dir = site_dir / dicom_ref
        csv_ref = dt.str("clinical_csv")
        if csv_ref is not None:
            csv = site_dir / csv_ref
        id_col = dt.str("patient_id_column", required=False, default="patient_id")
        dt.finish()

    tasks: dict[str, str] = {}
    tt = root.table("tasks")
    if tt is not None:
        for task in list(tt.data):
            column = tt.str(task)
            if column is None:
                continue
            if federation is not None and federation.layout is not None and task not in federation.layout.tasks:
                tt.problem(task, f"not a task of federation {federation.id!r} "
                                 f"(its tasks: {', '.join(sorted(federation.layout.tasks))})")
                continue
            if not is_valid_task_name(task):
                tt.problem(task, "task names are lower-case identifiers")
                continue
            tasks[task] = column
        if not tt.data:
            problems.append(Problem(str(path), "tasks", "declare at least one task"))
        tt.finish()

    synth = _parse_synth(root.table("synth", required=False))
    root.finish()
    if synth is not None:
        if data_origin == "public-benchmark":
            problems.append(Problem(str(path), "site.data_origin", "a site with a [synth] section holds synthetic data"))
        data_origin = "synthetic"

    if policy is not None and federation is not None and policy.federation != federation.id:
        problems.append(Problem(str(policy.path), "policy.federation",
                                f"allows federation {policy.federation!r}, not {federation.id!r}"))
    if policy is not None and federation is not None and federation.layout is not None:
        problems.extend(shareable_name_problems(policy, federation))
    if modalities is not None and id_col is not None and federation is not None and federation.layout is not None:
        problems.extend(_column_problems(path, tuple(modalities), id_col, tasks, federation))
    if problems:
        raise PolicyError(problems)
    blocks: tuple[str, ...] = ()
    if federation is not None:
        blocks = federation.layout.blocks_for(tuple(modalities), tuple(tasks))
    return SiteConfig(root=site_dir, id=sid, name=name, policy=policy, modalities=tuple(modalities),
                      dicom_dir=dicom_dir, clinical_csv=csv, patient_id_column=id_col, tasks=tasks,
                      synth=synth, federation_file=federation_file, blocks=blocks,
                      data_origin=data_origin or "patients")


def federation_blocks(federation: FederationConfig) -> tuple[str, ...]:
    """Every block of the federation's layout that a policy could share: one encoder per
    modality and the fusion block (heads never leave, so they are not listed)."""
    layout = federation.layout
    return tuple(b for b in layout.blocks_for(layout.modalities, ()) if not b.startswith("head."))


def shareable_name_problems(policy: Policy, federation: FederationConfig) -> list[Problem]:
    """``[sharing] shareable`` entries that name no block of the federation's layout: an
    exact name that matches nothing is a problem (a typo such as ``encoder.imaging`` would
    otherwise silently share nothing). A wildcard that matches nothing is only a warning
    (:func:`shareable_pattern_warnings`)."""
    import difflib

    blocks = federation_blocks(federation)
    problems = []
    for entry in policy.shareable:
        if any(c in entry for c in "*?[") or entry in blocks:
            continue
        close = difflib.get_close_matches(entry, blocks, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(Problem(str(policy.path), "sharing.shareable",
                                f"{entry!r} names no block of federation {federation.id!r} (its blocks: "
                                f"{', '.join(blocks)}){hint}"))
    return problems


def shareable_pattern_warnings(policy: Policy, federation: FederationConfig) -> list[str]:
    """Wildcard entries of ``[sharing] shareable`` that match no block of the federation."""
    from blossom_secure.blocks import match_patterns

    blocks = federation_blocks(federation)
    return [f"{policy.path}: sharing.shareable: {entry!r} matches no block of federation {federation.id!r} "
            f"(its blocks: {', '.join(blocks)})"
            for entry in policy.shareable
            if any(c in entry for c in "*?[") and not any(match_patterns(b, (entry,)) for b in blocks)]


def policy_refusal(site: SiteConfig, federation: FederationConfig, *, secure: bool,
                   coordinator: str | None = None) -> str | None:
    """Why a site refuses to join a round of ``federation``, or ``None``; decided from the
    public files alone (site file, policy, federation file), so it can be asked before any
    site is started.

    ``coordinator`` is the address the site is connected to (a deployed site: its own
    ``join`` command's ``--coordinator``); ``None`` means the federation file's
    ``coordinator`` (the embedded runtime). The policy must list it either way.

    Every check that could refuse a contribution later in the protocol runs here,
    before the site reserves privacy budget or trains: the policy's federation and
    coordinator, secure aggregation, and a public weight within the federation's bound.
    """
    policy = site.policy
    if policy.federation != federation.id:
        return f"policy allows federation {policy.federation!r} only"
    connected = federation.coordinator if coordinator is None else coordinator
    if connected not in policy.coordinators:
        return f"coordinator {connected!r} is not allowed by the policy ([policy] coordinators)"
    if policy.secure_aggregation_required and not secure:
        return "policy requires secure aggregation; this round would aggregate in plaintext"
    weight = federation.weighting.weight_of(site.id)
    if weight is None:
        return ("the federation file declares no public weight for this site "
                "([weighting.sites]); its contributions could not be weighted")
    if weight > federation.aggregation.max_weight:
        return (f"the site's public weight {weight} exceeds the federation's max_weight "
                f"{federation.aggregation.max_weight}")
    return None


def _column_problems(path: Path, modalities: tuple[str, ...], id_col: str, tasks: dict[str, str],
                     federation: FederationConfig) -> list[Problem]:
    """The patient id, label and feature columns must be different CSV columns: a label
    that is also a model input (or the id) would be trained on as a feature."""
    layout = federation.layout
    features: dict[str, str] = {}
    if "tabular" in modalities:
        features.update({f: "a tabular feature column of the federation" for f in layout.tabular.features})
    for m in modalities:
        if m in layout.extra_tabular:
            features.update({f: f"a feature column of modality {m!r}" for f in layout.extra_tabular[m].features})
    problems = []
    if id_col in features:
        problems.append(Problem(str(path), "data.patient_id_column",
                                f"{id_col!r} is also {features[id_col]}; the id cannot be a model input"))
    seen: dict[str, str] = {}
    for task, column in tasks.items():
        if column == id_col:
            problems.append(Problem(str(path), f"tasks.{task}", f"label column {column!r} is the patient id column"))
        elif column in features:
            problems.append(Problem(str(path), f"tasks.{task}",
                                    f"label column {column!r} is also {features[column]}: a label cannot be a model "
                                    "input (the model would be given the answer)"))
        elif column in seen:
            problems.append(Problem(str(path), f"tasks.{task}",
                                    f"label column {column!r} is also the label column of task {seen[column]!r}"))
        seen.setdefault(column, task)
    return problems


def _parse_synth(table: Table | None) -> SynthConfig | None:
    if table is None:
        return None
    values = dict(
        seed=table.int("seed", minimum=0),
        patients=table.int("patients", minimum=2, maximum=100_000),
        image_fraction=table.float("image_fraction", required=False, default=1.0, minimum=0.0, maximum=1.0),
        tabular_fraction=table.float("tabular_fraction", required=False, default=1.0, minimum=0.0, maximum=1.0),
        shift=table.float("shift", required=False, default=0.0, minimum=-10.0, maximum=10.0),
        compression=table.choice("compression", COMPRESSIONS, required=False, default="none"),
    )
    table.finish()
    if None in values.values():
        return None
    if values["compression"] == "none":
        values["compression"] = None
    return SynthConfig(**values)


def site_dirs(sites_root: Path) -> list[Path]:
    """The site folders (those holding a ``site.toml``) under ``sites_root``, sorted."""
    return sorted(p.parent for p in Path(sites_root).glob("*/site.toml"))
