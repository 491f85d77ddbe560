"""Deterministic synthetic hospital sites: DICOM studies and a clinical CSV.

:func:`generate_site_data` writes a site's ``data/`` folder in the layout that
:func:`blossom_secure.site.data.load_site_arrays` reads: ``data/dicom/<patient_id>/*.dcm`` (real
DICOM CT files written with pydicom, optionally RLE or JPEG 2000 lossless compressed) and
``data/clinical.csv``. Nothing here is a real patient; every study says so in its
descriptions and its PatientName is ``SYNTHETIC^<patient id>``.

The generative model (shared by every site of a federation):

* Each patient has a latent ``z`` in R^4. At a site, ``z ~ N(shift * u_site, I)``, where
  ``u_site`` is a unit direction drawn from the site seed: ``shift`` is covariate shift
  (non-IID sites); ``shift = 0`` is the federation's reference population ``N(0, I)``.
* **Image** (a low-resolution chest CT, HU): body, subcutaneous fat, lungs, mediastinum and
  spine, plus a nodule in the right lung whose *radius* encodes ``z0`` and whose *density*
  encodes ``z1``; the body size and the nodule's position vary per patient, and every voxel
  gets noise. ``z0`` is visible only in the image.
* **Tabular**: each clinical feature is a noisy linear map of ``(z1, z2, z3)`` with a
  loading fixed by the federation seed and the feature's name, put on a plausible clinical
  scale and unit (``age`` in years, ``crp`` in mg/L, ...; unknown names get a generic
  scale). ``z2`` and ``z3`` are visible only in the table.
* **Labels**: each task has a unit direction ``w`` in latent space, fixed by the federation
  seed and the task's name, that always mixes the image-only dimension ``z0`` with the
  table-only dimensions ``z2, z3``. The score ``w . z + noise`` is cut at the quantiles of
  its distribution under the reference population into ``num_classes`` classes (so a
  shifted site also has a shifted label prior). Both modalities carry part of every label,
  so a model that fuses them beats either alone.

The mapping from latent to image, table and labels depends only on the federation seed
(and on the names of the features and tasks); the patients depend on the site seed. The
randomness here is *not* secret: NumPy ``default_rng`` streams seeded from hashes of
(purpose, federation seed, site seed, ...) are exactly what is wanted, because the point is
reproducibility. Same arguments give byte-identical files (within one installation of
NumPy and pydicom): UIDs are derived from the seeds, dates and times are fixed.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from types import MappingProxyType

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import UID, CTImageStorage, JPEG2000Lossless, RLELossless, generate_uid

from blossom_secure.blocks import MODALITIES, is_valid_task_name

__all__ = [
    "COMPRESSIONS",
    "LATENT_DIMS",
    "PATIENT_ID_COLUMN",
    "SynthSummary",
    "generate_site_data",
    "public_feature_scaling",
]

logger = logging.getLogger(__name__)

#: Values accepted for ``compression`` (``None``: uncompressed explicit VR little endian).
COMPRESSIONS: tuple[str, ...] = ("rle", "jpeg2000")
#: Name of the patient id column in the generated CSV.
PATIENT_ID_COLUMN = "patient_id"
#: Dimensions of the latent space.
LATENT_DIMS = 4

_VERSION = "blossom_secure.synth/v1"
_MARKER = "SYNTHETIC.txt"
_MARKER_TEXT = (
    "Synthetic data written by blossom_secure.synth. No real patient is described here.\n"
    "This folder is replaced when the site is generated again.\n"
)
_MAX_PATIENTS = 100_000
_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,15}")
_COLUMN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")

# Noise levels of the generative model.
_TABULAR_NOISE = 0.4  # sd of a feature's noise, in units of the feature's sd
_LABEL_NOISE = 0.25  # sd of the label score's noise (the score's signal has sd 1)
_IMAGE_NOISE_HU = 15.0

# Geometry of the synthetic chest CT, in mm.
_FIELD_OF_VIEW_MM = 360.0
_SCAN_LENGTH_MM = 120.0
_HU_AIR, _HU_FAT, _HU_TISSUE, _HU_LUNG, _HU_BONE = -1000.0, -100.0, 40.0, -850.0, 500.0
_RESCALE_INTERCEPT = -1024
_STORED_MAX = 4095
_J2K_MIN_SIDE = 32

_STUDY_DATE = datetime.date(2024, 1, 8)
_IMPLEMENTATION_UID = generate_uid(entropy_srcs=[_VERSION, "implementation"])


@dataclass(frozen=True)
class _Feature:
    unit: str
    mean: float  # for log-normal features: mean of the log
    sd: float  # for log-normal features: sd of the log
    low: float
    high: float
    decimals: int
    log_normal: bool = False


# Plausible adult inpatient scales. Unknown names get _GENERIC_FEATURE.
_FEATURES: dict[str, _Feature] = {
    "age": _Feature("years", 62.0, 14.0, 18.0, 95.0, 0),
    "bmi": _Feature("kg/m2", 27.5, 5.0, 15.0, 55.0, 1),
    "systolic_bp": _Feature("mmHg", 132.0, 18.0, 80.0, 230.0, 0),
    "diastolic_bp": _Feature("mmHg", 80.0, 11.0, 40.0, 130.0, 0),
    "heart_rate": _Feature("bpm", 78.0, 13.0, 35.0, 180.0, 0),
    "temperature": _Feature("degC", 36.9, 0.6, 34.0, 41.5, 1),
    "spo2": _Feature("%", 96.0, 2.0, 70.0, 100.0, 0),
    "crp": _Feature("mg/L", math.log(8.0), 1.0, 0.1, 400.0, 1, log_normal=True),
    "wbc": _Feature("10^9/L", 7.8, 2.6, 0.5, 40.0, 1),
    "ldh": _Feature("U/L", 230.0, 70.0, 80.0, 1500.0, 0),
    "creatinine": _Feature("umol/L", math.log(85.0), 0.3, 30.0, 900.0, 0, log_normal=True),
    "glucose": _Feature("mmol/L", 6.2, 1.6, 2.5, 30.0, 1),
    "hemoglobin": _Feature("g/dL", 13.4, 1.7, 5.0, 20.0, 1),
    "platelets": _Feature("10^9/L", 250.0, 70.0, 10.0, 900.0, 0),
    "albumin": _Feature("g/L", 38.0, 5.0, 15.0, 55.0, 0),
    "sodium": _Feature("mmol/L", 139.0, 3.5, 115.0, 160.0, 0),
    "potassium": _Feature("mmol/L", 4.2, 0.5, 2.5, 7.0, 1),
    "d_dimer": _Feature("mg/L FEU", math.log(0.8), 0.9, 0.05, 35.0, 2, log_normal=True),
    "troponin": _Feature("ng/L", math.log(12.0), 1.0, 1.0, 5000.0, 0, log_normal=True),
    "lactate": _Feature("mmol/L", math.log(1.4), 0.4, 0.3, 20.0, 1, log_normal=True),
}
_GENERIC_FEATURE = _Feature("", 50.0, 10.0, -math.inf, math.inf, 2)


def public_feature_scaling(name: str) -> tuple[float, float, float, float]:
    """``(low, high, centre, scale)`` of a synthetic feature, from the generator's declared
    population model (public: it is the same for every site, and no site's patients inform
    it). What a federation of synthetic sites declares as its public scaling.

    For a log-normal feature, ``centre`` and ``scale`` are the distribution's mean and
    standard deviation. A feature the generator does not know gets ``[0, 100]`` around 50.
    """
    f = _FEATURES.get(name)
    if f is None:
        return (0.0, 100.0, _GENERIC_FEATURE.mean, _GENERIC_FEATURE.sd)
    if f.log_normal:
        mean = math.exp(f.mean + f.sd ** 2 / 2)
        return (f.low, f.high, mean, mean * math.sqrt(math.expm1(f.sd ** 2)))
    return (f.low, f.high, f.mean, f.sd)


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_site_data` wrote.

    Attributes:
        data_dir: The site's ``data`` folder.
        dicom_dir: ``data/dicom``, one ``<patient_id>/`` folder per study.
        clinical_csv: ``data/clinical.csv``.
        patient_id_column: The CSV's patient id column.
        patients: Patients in the CSV.
        with_image: Patients with a study.
        with_tabular: Patients with a complete feature row.
        with_both: Patients with both.
        without_modality: Patients with neither (they have labels only; a loader drops them).
        label_counts: Task -> per-class counts over all patients.
    """

    data_dir: Path
    dicom_dir: Path
    clinical_csv: Path
    patient_id_column: str
    patients: int
    with_image: int
    with_tabular: int
    with_both: int
    without_modality: int
    label_counts: Mapping[str, tuple[int, ...]]


# --------------------------------------------------------------------------------------
# Seeding: every stream is named by its purpose, so adding a stream never shifts another.


def _rng(*parts: str | int) -> np.random.Generator:
    material = "\x1f".join([_VERSION, *(str(p) for p in parts)]).encode("utf-8")
    return np.random.default_rng(int.from_bytes(hashlib.sha256(material).digest()[:16], "big"))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _task_direction(federation_seed: int, task: str) -> np.ndarray:
    """The task's unit direction in latent space (federation-wide)."""
    rng = _rng("task-direction", federation_seed, task)
    theta = rng.uniform(math.pi / 5, 3 * math.pi / 10)  # image-only vs table-only share
    psi = rng.uniform(0.0, 2 * math.pi)  # how the table-only part splits over z2, z3
    z1_weight = rng.uniform(-0.3, 0.3)
    sign = rng.choice([-1.0, 1.0])
    w = np.array([sign * math.cos(theta), z1_weight, math.sin(theta) * math.cos(psi), math.sin(theta) * math.sin(psi)])
    return _unit(w)


def _feature_loading(federation_seed: int, feature: str) -> np.ndarray:
    """How ``feature`` depends on ``(z1, z2, z3)`` (federation-wide), norm sqrt(1 - noise^2)."""
    rng = _rng("feature-loading", federation_seed, feature)
    a = _unit(rng.standard_normal(3) * np.array([0.6, 1.0, 1.0]))
    return a * math.sqrt(1.0 - _TABULAR_NOISE**2)


def _feature_values(x: np.ndarray, spec: _Feature) -> np.ndarray:
    """Standardised ``x`` on the feature's clinical scale, clipped and rounded."""
    values = spec.mean + spec.sd * x
    if spec.log_normal:
        values = np.exp(values)
    return np.round(np.clip(values, spec.low, spec.high), spec.decimals)


# --------------------------------------------------------------------------------------
# Images


def _render_ct(
    *, z: np.ndarray, rng: np.random.Generator, columns: int, rows: int, slices: int
) -> tuple[np.ndarray, float, float]:
    """A chest CT in HU, shape ``(slices, rows, columns)``; also pixel spacing, slice step."""
    spacing = _FIELD_OF_VIEW_MM / max(columns, rows)
    step = max(spacing, _SCAN_LENGTH_MM / slices) if slices > 1 else spacing
    x = (np.arange(columns) - (columns - 1) / 2) * spacing
    y = (np.arange(rows) - (rows - 1) / 2) * spacing
    zz = (np.arange(slices) - (slices - 1) / 2) * step
    Z, Y, X = np.meshgrid(zz, y, x, indexing="ij")

    body_a, body_b = 150.0 * (1 + 0.04 * rng.standard_normal()), 110.0 * (1 + 0.04 * rng.standard_normal())
    jitter = rng.normal(0.0, 3.0, size=3)
    if slices == 1:
        jitter[2] = 0.0  # keep the nodule centred on the one slice

    def inside(cx: float, cy: float, a: float, b: float) -> np.ndarray:
        return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 <= 1.0

    hu = np.full(X.shape, _HU_AIR)
    hu[inside(0.0, 0.0, body_a, body_b)] = _HU_FAT
    hu[inside(0.0, 0.0, 0.9 * body_a, 0.9 * body_b)] = _HU_TISSUE
    taper = np.sqrt(np.clip(1.0 - (Z / (0.75 * _SCAN_LENGTH_MM)) ** 2, 0.05, 1.0))
    for side in (-1.0, 1.0):
        lung = ((X - side * 70.0) / (48.0 * taper)) ** 2 + ((Y + 5.0) / (72.0 * taper)) ** 2 <= 1.0
        hu[lung] = _HU_LUNG
    hu[inside(12.0, 5.0, 30.0, 28.0)] = _HU_TISSUE + 5.0  # mediastinum
    hu[inside(0.0, 85.0, 15.0, 15.0)] = _HU_BONE  # vertebral body

    # The nodule: radius from z0, density from z1, soft edge (partial volume).
    radius = float(np.clip(15.0 + 6.0 * z[0], 4.0, 33.0))
    density = float(np.clip(20.0 + 60.0 * z[1], -250.0, 250.0))
    distance = np.sqrt((X - (-70.0 + jitter[0])) ** 2 + (Y - (-15.0 + jitter[1])) ** 2 + (Z - jitter[2]) ** 2)
    weight = 1.0 / (1.0 + np.exp(-(radius - distance) / 1.0))
    hu = hu * (1.0 - weight) + density * weight
    hu += rng.normal(0.0, _IMAGE_NOISE_HU, size=hu.shape)
    return hu, spacing, step


def _slice_dataset(
    *,
    pixels: np.ndarray,
    pid: str,
    index: int,
    position: tuple[float, float, float],
    spacing: float,
    step: float,
    uids: dict[str, str],
    sop_uid: UID,
    study_date: datetime.date,
    study_time: str,
    birth_date: datetime.date,
    age_years: int,
    sex: str,
    site_seed: int,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.ImplementationClassUID = _IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "BLOSSOM_SYNTH1"
    date = study_date.strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"SYN{uids['accession']}"
    ds.Modality = "CT"
    ds.Manufacturer = "blossom_secure synthetic"
    ds.InstitutionName = f"Synthetic site {site_seed}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC CT CHEST - NOT A REAL PATIENT"
    ds.SeriesDescription = "SYNTHETIC AXIAL"
    ds.PatientName = f"SYNTHETIC^{pid}"
    ds.PatientID = pid
    ds.PatientBirthDate = birth_date.strftime("%Y%m%d")
    ds.PatientSex = sex
    ds.PatientAge = f"{min(age_years, 999):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{step:.3f}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{position[2]:.3f}"
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = str(_RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.ImageComments = "Synthetic image generated by blossom_secure.synth; not a real patient."
    # set_pixel_data and compress would otherwise draw a fresh random SOP Instance UID.
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16, generate_instance_uid=False)
    return ds


def _write_study(
    folder: Path,
    *,
    hu: np.ndarray,
    spacing: float,
    step: float,
    pid: str,
    federation_seed: int,
    site_seed: int,
    compression: str | None,
    study_date: datetime.date,
    study_time: str,
    birth_date: datetime.date,
    age_years: int,
    sex: str,
) -> None:
    folder.mkdir()
    slices, rows, columns = hu.shape
    stored = np.clip(np.rint(hu) - _RESCALE_INTERCEPT, 0, _STORED_MAX).astype(np.int16)

    def uid(*kind: str | int) -> UID:
        return generate_uid(entropy_srcs=[_VERSION, str(federation_seed), str(site_seed), pid, *map(str, kind)])

    uids: dict[str, str] = {"study": uid("study"), "series": uid("series"), "frame": uid("frame")}
    uids["accession"] = hashlib.sha256(uids["study"].encode()).hexdigest()[:10].upper()
    x0 = -(columns - 1) / 2 * spacing
    y0 = -(rows - 1) / 2 * spacing
    for k in range(slices):
        z = (k - (slices - 1) / 2) * step
        ds = _slice_dataset(
            pixels=stored[k],
            pid=pid,
            index=k,
            position=(x0, y0, z),
            spacing=spacing,
            step=step,
            uids=uids,
            sop_uid=uid("instance", k),
            study_date=study_date,
            study_time=study_time,
            birth_date=birth_date,
            age_years=age_years,
            sex=sex,
            site_seed=site_seed,
        )
        if compression == "rle":
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        elif compression == "jpeg2000":
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        ds.save_as(folder / f"slice_{k + 1:04d}.dcm", enforce_file_format=True)


# --------------------------------------------------------------------------------------
# Arguments


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_args(
    *,
    federation_seed: int,
    site_seed: int,
    patients: int,
    modalities: Sequence[str],
    image_fraction: float,
    tabular_fraction: float,
    tabular_features: Sequence[str],
    tasks: Mapping[str, str],
    num_classes: Mapping[str, int],
    image_spatial_dims: int,
    image_size: tuple[int, ...],
    shift: float,
    compression: str | None,
    patient_prefix: str,
) -> None:
    for name, seed in (("federation_seed", federation_seed), ("site_seed", site_seed)):
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"{name} must be a non-negative int, not {seed!r}")
    if not _is_int(patients) or not 2 <= patients <= _MAX_PATIENTS:
        raise ValueError(f"patients must be an int in [2, {_MAX_PATIENTS}], not {patients!r}")
    mods = tuple(modalities)
    if not mods or len(set(mods)) != len(mods) or not set(mods) <= set(MODALITIES):
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES} without repeats, not {mods!r}")
    for name, fraction, modality in (
        ("image_fraction", image_fraction, "image"),
        ("tabular_fraction", tabular_fraction, "tabular"),
    ):
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], not {fraction!r}")
        if modality not in mods and fraction != 0.0:
            raise ValueError(f"{name} must be 0 for a site without the {modality} modality")
    feats = tuple(tabular_features) if "tabular" in mods else ()
    if "tabular" in mods and not feats:
        raise ValueError("the tabular modality needs at least one feature column")
    if len(set(feats)) != len(feats) or not all(isinstance(f, str) and _COLUMN_RE.fullmatch(f) for f in feats):
        raise ValueError("tabular_features must be distinct column names (letters, digits, _)")
    if not tasks:
        raise ValueError("at least one task is needed")
    for task, column in tasks.items():
        if not is_valid_task_name(task):
            raise ValueError(f"invalid task name {task!r}")
        if not isinstance(column, str) or not _COLUMN_RE.fullmatch(column):
            raise ValueError(f"task {task!r}: invalid label column name {column!r}")
        k = num_classes.get(task)
        if not _is_int(k) or not 2 <= k <= 100:  # type: ignore[operator]
            raise ValueError(f"task {task!r}: num_classes must be an int in [2, 100], not {k!r}")
    columns = [PATIENT_ID_COLUMN, *feats, *tasks.values()]
    if len(set(columns)) != len(columns):
        raise ValueError(f"the feature and label columns must be distinct and differ from {PATIENT_ID_COLUMN!r}")
    if image_spatial_dims not in (2, 3) or isinstance(image_spatial_dims, bool):
        raise ValueError(f"image_spatial_dims must be 2 or 3, not {image_spatial_dims!r}")
    if (
        not isinstance(image_size, tuple)
        or len(image_size) != image_spatial_dims
        or not all(_is_int(s) and 8 <= s <= 512 for s in image_size[:2])
        or not all(_is_int(s) and 2 <= s <= 512 for s in image_size[2:])
    ):
        raise ValueError(
            f"image_size must be a tuple of {image_spatial_dims} ints, columns and rows in [8, 512], "
            f"slices in [2, 512], not {image_size!r}"
        )
    if not isinstance(shift, (int, float)) or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number, not {shift!r}")
    if compression is not None and compression not in COMPRESSIONS:
        raise ValueError(f"compression must be None or one of {COMPRESSIONS}, not {compression!r}")
    if compression == "jpeg2000":
        if "pylibjpeg" not in get_encoder(JPEG2000Lossless).available_plugins:
            raise ValueError("jpeg2000 compression needs the pylibjpeg-openjpeg package")
        if min(image_size[:2]) < _J2K_MIN_SIDE:
            # openjpeg (through pylibjpeg-openjpeg) always uses 6 wavelet resolutions.
            raise ValueError(f"jpeg2000 compression needs columns and rows of at least {_J2K_MIN_SIDE}")
    if not isinstance(patient_prefix, str) or not _PREFIX_RE.fullmatch(patient_prefix):
        raise ValueError(f"patient_prefix must match {_PREFIX_RE.pattern}, not {patient_prefix!r}")


def _presence(rng: np.random.Generator, n: int, fraction_a: float, fraction_b: float) -> tuple[np.ndarray, np.ndarray]:
    """Two presence masks with the requested shares that overlap as little as needed:
    every patient has at least one of them whenever ``fraction_a + fraction_b >= 1``."""
    n_a = math.floor(fraction_a * n + 0.5)
    n_b = math.floor(fraction_b * n + 0.5)
    order = rng.permutation(n)
    a = np.zeros(n, dtype=bool)
    b = np.zeros(n, dtype=bool)
    a[order[:n_a]] = True
    b[order[n - n_b :]] = True
    return a, b


# --------------------------------------------------------------------------------------
# The site


def generate_site_data(
    site_dir: Path,
    *,
    federation_seed: int,
    site_seed: int,
    patients: int,
    modalities: Sequence[str],
    image_fraction: float,
    tabular_fraction: float,
    tabular_features: Sequence[str],
    tasks: Mapping[str, str],
    num_classes: Mapping[str, int],
    image_spatial_dims: int,
    image_size: tuple[int, ...],
    shift: float = 0.0,
    compression: str | None = None,
    patient_prefix: str,
) -> SynthSummary:
    """Write a synthetic site's ``data/`` folder (DICOM studies and clinical CSV).

    The files are written into a temporary folder beside ``site_dir/data`` and renamed
    into place, so an interruption never leaves a half-written ``data`` folder. An
    existing ``data`` folder is replaced only if it was written by this function (it
    holds a ``SYNTHETIC.txt`` marker); anything else there is never overwritten.

    Args:
        site_dir: The site's folder (created if missing); the data goes to ``site_dir/data``.
        federation_seed: Fixes the generative model shared by every site of a federation.
        site_seed: Fixes this site's patients.
        patients: Number of patients (rows of the CSV), at least 2.
        modalities: The site's modalities, a subset of ``("image", "tabular")``.
        image_fraction: Share of patients with a study; 0 for a site without images.
        tabular_fraction: Share of patients with a complete feature row; 0 for a site
            without the tabular modality. The two sets overlap as little as they must, so
            every patient has some modality whenever the shares add up to at least 1.
        tabular_features: Feature column names (see the module docstring for the known
            clinical names); ignored (no feature columns are written) when the site has
            no tabular modality.
        tasks: Task name -> label column. Every patient gets a label for every task.
        num_classes: Task name -> number of classes.
        image_spatial_dims: 2 (one slice per patient) or 3 (a series of slices).
        image_size: ``(columns, rows)`` or ``(columns, rows, slices)``; columns and rows
            in [8, 512], slices in [2, 512]; the order in which :func:`blossom_secure.site.data.read_study` returns the axes.
        shift: Covariate shift of this site's latent distribution (0: none).
        compression: ``None``, ``"rle"`` (RLE Lossless) or ``"jpeg2000"`` (JPEG 2000
            lossless, through pylibjpeg-openjpeg; columns and rows of at least 32 because
            its encoder always uses 6 wavelet resolutions). The pixel values are the same
            in all, and so are the UIDs (lossless compression keeps the SOP Instance UID).
        patient_prefix: Prefix of the patient ids (a letter, then letters, digits, ``_``
            or ``-``; at most 16 characters); ids are the prefix and six digits.

    Returns:
        A :class:`SynthSummary` of what was written.

    Raises:
        ValueError: An argument is out of range or inconsistent (fractions outside
            [0, 1], fewer than 2 patients, unknown modality or compression, ...).
        FileExistsError: ``site_dir/data`` exists and was not written by this function.
        OSError: The files cannot be written (nothing is left half-written).
    """
    _check_args(
        federation_seed=federation_seed,
        site_seed=site_seed,
        patients=patients,
        modalities=modalities,
        image_fraction=image_fraction,
        tabular_fraction=tabular_fraction,
        tabular_features=tabular_features,
        tasks=tasks,
        num_classes=num_classes,
        image_spatial_dims=image_spatial_dims,
        image_size=image_size,
        shift=shift,
        compression=compression,
        patient_prefix=patient_prefix,
    )
    site_dir = Path(site_dir)
    final = site_dir / "data"
    if (final.exists() or final.is_symlink()) and not (final.is_dir() and (final / _MARKER).is_file()):
        raise FileExistsError(f"{final} exists and was not written by blossom_secure.synth; not replacing it")
    features = tuple(tabular_features) if "tabular" in modalities else ()
    tasks = dict(tasks)
    n = patients

    # Patients (site seed) and their latents, shifted along a site-specific direction.
    rng = _rng("patients", federation_seed, site_seed)
    numbers = rng.choice(900_000, size=n, replace=False) + 100_000
    ids = [f"{patient_prefix}{int(k):06d}" for k in numbers]
    direction = _unit(_rng("shift-direction", federation_seed, site_seed).standard_normal(LATENT_DIMS))
    z = rng.standard_normal((n, LATENT_DIMS)) + shift * direction
    has_image, has_tabular = _presence(
        _rng("presence", federation_seed, site_seed), n, float(image_fraction), float(tabular_fraction)
    )

    # Clinical features for everyone (blanked where the row is missing), on clinical scales.
    table: dict[str, np.ndarray] = {}
    for feature in features:
        noise = _rng("feature-noise", federation_seed, site_seed, feature).standard_normal(n)
        x = z[:, 1:4] @ _feature_loading(federation_seed, feature) + _TABULAR_NOISE * noise
        table[feature] = _feature_values(x, _FEATURES.get(feature, _GENERIC_FEATURE))

    # Labels: the task's latent direction, cut at the reference population's quantiles.
    labels: dict[str, np.ndarray] = {}
    for task in tasks:
        k = int(num_classes[task])
        noise = _rng("label-noise", federation_seed, site_seed, task).standard_normal(n)
        score = z @ _task_direction(federation_seed, task) + _LABEL_NOISE * noise
        reference = NormalDist(0.0, math.sqrt(1.0 + _LABEL_NOISE**2))
        cuts = np.array([reference.inv_cdf(j / k) for j in range(1, k)])
        labels[task] = np.searchsorted(cuts, score).astype(np.int64)

    # Demographics for the DICOM header; the age agrees with the CSV's when it has one.
    demo = _rng("demographics", federation_seed, site_seed)
    sexes = demo.choice(["F", "M"], size=n)
    ages = table["age"] if "age" in table else np.round(np.clip(demo.normal(62.0, 14.0, n), 18, 95))
    study_days = demo.integers(0, 365, size=n)
    study_seconds = demo.integers(8 * 3600, 18 * 3600, size=n)
    birth_offsets = demo.integers(0, 365, size=n)

    site_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".data-tmp-", dir=site_dir))
    try:
        dicom_dir = tmp / "dicom"
        dicom_dir.mkdir()
        if "image" in modalities:
            if image_spatial_dims == 2:
                columns, rows, slices = image_size[0], image_size[1], 1
            else:
                columns, rows, slices = image_size
            for i in np.flatnonzero(has_image):
                pid = ids[i]
                hu, spacing, step = _render_ct(
                    z=z[i],
                    rng=_rng("image", federation_seed, site_seed, pid),
                    columns=columns,
                    rows=rows,
                    slices=slices,
                )
                study_date = _STUDY_DATE + datetime.timedelta(days=int(study_days[i]))
                seconds = int(study_seconds[i])
                age = int(ages[i])
                _write_study(
                    dicom_dir / pid,
                    hu=hu,
                    spacing=spacing,
                    step=step,
                    pid=pid,
                    federation_seed=federation_seed,
                    site_seed=site_seed,
                    compression=compression,
                    study_date=study_date,
                    study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
                    birth_date=study_date - datetime.timedelta(days=age * 365 + int(birth_offsets[i])),
                    age_years=age,
                    sex=str(sexes[i]),
                )
        header = [PATIENT_ID_COLUMN, *features, *(tasks[t] for t in tasks)]
        decimals = [_FEATURES.get(f, _GENERIC_FEATURE).decimals for f in features]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for row in sorted(range(n), key=lambda j: ids[j]):
            cells = [ids[row]]
            for feature, d in zip(features, decimals, strict=True):
                cells.append(f"{table[feature][row]:.{d}f}" if has_tabular[row] else "")
            cells += [str(int(labels[t][row])) for t in tasks]
            writer.writerow(cells)
        (tmp / "clinical.csv").write_text(buffer.getvalue(), encoding="utf-8", newline="")
        (tmp / _MARKER).write_text(_MARKER_TEXT, encoding="utf-8", newline="")
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    with_both = int((has_image & has_tabular).sum())
    summary = SynthSummary(
        data_dir=final,
        dicom_dir=final / "dicom",
        clinical_csv=final / "clinical.csv",
        patient_id_column=PATIENT_ID_COLUMN,
        patients=n,
        with_image=int(has_image.sum()),
        with_tabular=int(has_tabular.sum()),
        with_both=with_both,
        without_modality=int((~has_image & ~has_tabular).sum()),
        label_counts=MappingProxyType(
            {t: tuple(int(c) for c in np.bincount(labels[t], minlength=num_classes[t])) for t in tasks}
        ),
    )
    logger.info("synthetic site written to %s: %d patients", final, n)
    return summary


def _swap_into_place(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``, replacing a previous synthetic ``final`` if any."""
    if not final.exists():
        os.replace(new, final)
        return
    old = Path(tempfile.mkdtemp(prefix=".data-old-", dir=final.parent))
    os.replace(final, old)  # onto an empty folder: allowed on POSIX
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
