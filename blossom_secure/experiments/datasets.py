"""The benchmark data sets as pools of examples with two modalities, and writing a site's
share of a pool as a real site data folder (clinical CSV, DICOM studies).

* ``synthetic``: the toolkit's synthetic hospital (:mod:`blossom_secure.site.synth`): DICOM CT
  studies (modality A, ``image``) and a clinical table (modality B, ``tabular``); two tasks
  (``malignancy``, 2 classes; ``severity``, 3 classes) so that sites can hold different
  tasks. Nothing describes a real patient.
* ``breast_cancer``: the Wisconsin Diagnostic Breast Cancer table bundled with
  scikit-learn (569 tumours, 30 features, benign/malignant; UCI, CC BY 4.0). Modality A
  (``tabular``) is the 10 *mean* measurements; modality B (``se_worst``) is the 10
  *standard error* and 10 *worst* measurements of the same cell-nucleus properties, the
  way BLOSSOM splits PTB-XL's leads into two groups.
* ``digits``: the UCI optical-recognition handwritten digits bundled with scikit-learn
  (1797 images of 8x8 pixels, 10 classes; CC BY 4.0). Modality A (``tabular``) is the top
  half of the image (rows 0-3, 32 pixels), modality B (``lower_half``) the bottom half
  (rows 4-7): two views of one object, each informative alone, better together.

Everything is read from disk (scikit-learn's bundled files, the synthetic generator): no
network access.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blossom_secure._fs import atomic_write

__all__ = ["DATASETS", "Pool", "breast_cancer_groups", "load_pool", "write_site_data"]

DATASETS = ("synthetic", "breast_cancer", "digits")

SYNTH_FEATURES = ("age", "bmi", "systolic_bp", "crp", "wbc", "ldh")
SYNTH_TASKS = {"malignancy": 2, "severity": 3}
_SYNTH_FEDERATION_SEED = 2026
_SYNTH_POOL_SEED = 1


@dataclass(frozen=True)
class Pool:
    """A data set as one pool of examples with two modalities.

    Attributes:
        name: The data set.
        patient_ids: One id per example.
        labels: Task -> int64 labels of every example.
        num_classes: Task -> number of classes.
        modality_a, modality_b: The two modalities (``image`` or a tabular modality name).
        columns: Tabular modality -> its feature column names.
        values: Tabular modality -> ``(n, F)`` float values.
        studies: Folder of ``<patient_id>/`` DICOM studies when a modality is ``image``.
        image_size: The studies' size (when there are studies).
        scaling: Tabular modality -> one ``(low, high, centre, scale)`` per column: the
            public scaling its federation files declare (see the loaders for where each
            comes from; never from one site's share of the pool).
    """

    name: str
    patient_ids: tuple[str, ...]
    labels: Mapping[str, np.ndarray]
    num_classes: Mapping[str, int]
    modality_a: str
    modality_b: str
    columns: Mapping[str, tuple[str, ...]]
    values: Mapping[str, np.ndarray]
    studies: Path | None = None
    image_size: tuple[int, ...] = field(default=())
    scaling: Mapping[str, tuple[tuple[float, float, float, float], ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def modalities_of(self, role: str) -> tuple[str, ...]:
        """The modalities a site with ``role`` (``a``, ``b``, ``both``) holds."""
        return {"a": (self.modality_a,), "b": (self.modality_b,), "both": (self.modality_a, self.modality_b)}[role]


def _column(name: str) -> str:
    return name.strip().replace(" ", "_").lower()


def breast_cancer_groups() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The two feature groups of the breast-cancer table, as CSV column names:
    (the 10 ``mean_*`` measurements, the 10 ``*_error`` then the 10 ``worst_*`` ones)."""
    from sklearn.datasets import load_breast_cancer

    names = [_column(n) for n in load_breast_cancer().feature_names]
    a = tuple(n for n in names if n.startswith("mean_"))
    b = tuple(n for n in names if n.endswith("_error")) + tuple(n for n in names if n.startswith("worst_"))
    return a, b


def _breast_cancer() -> Pool:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [_column(n) for n in data.feature_names]
    a, b = breast_cancer_groups()
    x = np.asarray(data.data, dtype=np.float64)
    n = x.shape[0]
    # scikit-learn's target: 0 = malignant, 1 = benign. Here 1 = malignant.
    y = (1 - np.asarray(data.target)).astype(np.int64)
    values = {"tabular": x[:, [names.index(c) for c in a]], "se_worst": x[:, [names.index(c) for c in b]]}
    return Pool(name="breast_cancer", patient_ids=tuple(f"wdbc{i:04d}" for i in range(n)),
                labels={"diagnosis": y}, num_classes={"diagnosis": 2}, modality_a="tabular",
                modality_b="se_worst", columns={"tabular": a, "se_worst": b}, values=values,
                scaling={m: _published_summary(v) for m, v in values.items()})


def _published_summary(values: np.ndarray) -> tuple[tuple[float, float, float, float], ...]:
    """Per column ``(min, max, mean, sd)`` of a whole public benchmark table: the summary
    statistics its documentation publishes (scikit-learn's description of WDBC lists each
    feature's min and max). The benchmark treats them as public knowledge, as a clinic
    would treat published reference ranges; they are not computed from any one site's share."""
    return tuple((float(c.min()), float(c.max()), float(c.mean()), float(c.std()) or 1.0) for c in values.T)


def _digits() -> Pool:
    from sklearn.datasets import load_digits

    data = load_digits()
    img = np.asarray(data.images, dtype=np.float64)  # (n, 8, 8)
    n = img.shape[0]
    top = tuple(f"px_{r}_{c}" for r in range(4) for c in range(8))
    bottom = tuple(f"px_{r}_{c}" for r in range(4, 8) for c in range(8))
    return Pool(name="digits", patient_ids=tuple(f"digit{i:05d}" for i in range(n)),
                labels={"digit": np.asarray(data.target, dtype=np.int64)}, num_classes={"digit": 10},
                modality_a="tabular", modality_b="lower_half", columns={"tabular": top, "lower_half": bottom},
                values={"tabular": img[:, :4, :].reshape(n, 32), "lower_half": img[:, 4:, :].reshape(n, 32)},
                # Pixels are 0..16 by the data set's definition (4x4 blocks of 0/1 counted).
                scaling={m: ((0.0, 16.0, 8.0, 8.0),) * 32 for m in ("tabular", "lower_half")})


def _synthetic(work_dir: Path, *, patients: int, image_size: tuple[int, int]) -> Pool:
    from blossom_secure.site.synth import generate_site_data, public_feature_scaling

    root = work_dir / "pools" / f"synthetic-{patients}-{image_size[0]}x{image_size[1]}"
    data = root / "data"
    if not (data / "clinical.csv").is_file():
        generate_site_data(root, federation_seed=_SYNTH_FEDERATION_SEED, site_seed=_SYNTH_POOL_SEED,
                           patients=patients, modalities=("image", "tabular"), image_fraction=1.0,
                           tabular_fraction=1.0, tabular_features=SYNTH_FEATURES,
                           tasks={t: t for t in SYNTH_TASKS}, num_classes=SYNTH_TASKS, image_spatial_dims=2,
                           image_size=tuple(image_size), patient_prefix="syn")
    with open(data / "clinical.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ids = tuple(r["patient_id"] for r in rows)
    values = np.array([[float(r[c]) for c in SYNTH_FEATURES] for r in rows], dtype=np.float64)
    labels = {t: np.array([int(r[t]) for r in rows], dtype=np.int64) for t in SYNTH_TASKS}
    return Pool(name="synthetic", patient_ids=ids, labels=labels, num_classes=dict(SYNTH_TASKS),
                modality_a="image", modality_b="tabular", columns={"tabular": SYNTH_FEATURES},
                values={"tabular": values}, studies=data / "dicom", image_size=tuple(image_size),
                scaling={"tabular": tuple(public_feature_scaling(c) for c in SYNTH_FEATURES)})


def load_pool(name: str, work_dir: Path, *, synthetic_patients: int = 1200,
              synthetic_image_size: tuple[int, int] = (16, 16)) -> Pool:
    """The pool of data set ``name`` (the synthetic one is generated under ``work_dir`` once).

    Raises:
        ValueError: unknown data set.
    """
    if name == "breast_cancer":
        return _breast_cancer()
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic(Path(work_dir), patients=synthetic_patients, image_size=synthetic_image_size)
    raise ValueError(f"unknown data set {name!r} (known: {', '.join(DATASETS)})")


def write_site_data(pool: Pool, data_dir: Path, *, indices: np.ndarray, modalities: Sequence[str],
                    tasks: Sequence[str]) -> None:
    """Write the examples ``indices`` of ``pool`` as a site's data folder.

    ``data_dir/clinical.csv`` gets the id column, the columns of the tabular modalities the
    site holds and the label columns of its tasks (named like the tasks); if it holds
    ``image``, ``data_dir/dicom/<patient_id>`` links to the pool's study.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    columns = [c for m in modalities if m != "image" for c in pool.columns[m]]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["patient_id", *columns, *tasks])
    for i in indices:
        cells = [pool.patient_ids[i]]
        for m in modalities:
            if m != "image":
                cells += [repr(float(v)) for v in pool.values[m][i]]
        cells += [str(int(pool.labels[t][i])) for t in tasks]
        writer.writerow(cells)
    atomic_write(data_dir / "clinical.csv", buf.getvalue().encode("utf-8"))
    if "image" in modalities:
        dicom = data_dir / "dicom"
        dicom.mkdir(exist_ok=True)
        for i in indices:
            pid = pool.patient_ids[i]
            link = dicom / pid
            if not link.exists():
                os.symlink(os.path.relpath(pool.studies / pid, dicom), link)
