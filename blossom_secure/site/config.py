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

__all__ = ["DATA_ORIGINS", "SiteConfig", "SynthConfig", "load_site", "site_dirs"]

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
    if problems:
        raise PolicyError(problems)
    blocks: tuple[str, ...] = ()
    if federation is not None:
        blocks = federation.layout.blocks_for(tuple(modalities), tuple(tasks))
    return SiteConfig(root=site_dir, id=sid, name=name, policy=policy, modalities=tuple(modalities),
                      dicom_dir=dicom_dir, clinical_csv=csv, patient_id_column=id_col, tasks=tasks,
                      synth=synth, federation_file=federation_file, blocks=blocks,
                      data_origin=data_origin or "patients")


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
