"""Tests for blossom_secure.site.synth: deterministic synthetic sites that read back through
blossom_secure.site.data, carry learnable signal in both modalities, and are written atomically."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from blossom_secure.site import synth
from blossom_secure.site.data import load_site_arrays, read_study
from blossom_secure.site.synth import SynthSummary, generate_site_data

FEATURES = ("age", "bmi", "systolic_bp", "crp", "wbc", "ldh")
TASKS = {"diagnosis": "diagnosis_label", "grade": "grade_label"}
NUM_CLASSES = {"diagnosis": 2, "grade": 3}


def generate(site_dir: Path, **overrides: object) -> SynthSummary:
    kwargs: dict = dict(
        federation_seed=11,
        site_seed=1,
        patients=12,
        modalities=("image", "tabular"),
        image_fraction=0.75,
        tabular_fraction=0.5,
        tabular_features=FEATURES,
        tasks=TASKS,
        num_classes=NUM_CLASSES,
        image_spatial_dims=2,
        image_size=(16, 16),
        patient_prefix="H",
    )
    kwargs.update(overrides)
    return generate_site_data(site_dir, **kwargs)


def tree_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def load(summary: SynthSummary, *, size: tuple[int, ...] = (16, 16), spatial_dims: int = 2, **overrides: object):
    kwargs: dict = dict(
        dicom_dir=summary.dicom_dir,
        clinical_csv=summary.clinical_csv,
        patient_id_column=summary.patient_id_column,
        modalities=("image", "tabular"),
        tabular_features=FEATURES,
        tasks=TASKS,
        num_classes=NUM_CLASSES,
        image_spatial_dims=spatial_dims,
        image_size=size,
        image_window=(-1000.0, 400.0),
    )
    kwargs.update(overrides)
    return load_site_arrays(**kwargs)


# --------------------------------------------------------------------------------------
# Determinism


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    generate(tmp_path / "a", image_spatial_dims=3, image_size=(16, 16, 4))
    generate(tmp_path / "b", image_spatial_dims=3, image_size=(16, 16, 4))
    assert tree_digest(tmp_path / "a" / "data") == tree_digest(tmp_path / "b" / "data")


def test_regenerating_in_place_replaces_the_previous_synthetic_data(tmp_path: Path) -> None:
    generate(tmp_path)
    first = tree_digest(tmp_path / "data")
    generate(tmp_path, site_seed=2)
    assert tree_digest(tmp_path / "data") != first
    generate(tmp_path)
    assert tree_digest(tmp_path / "data") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folders left


def test_different_site_seeds_give_different_patients(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", site_seed=1)
    b = generate(tmp_path / "b", site_seed=2)
    ids_a = {r["patient_id"] for r in read_rows(a.clinical_csv)}
    ids_b = {r["patient_id"] for r in read_rows(b.clinical_csv)}
    assert ids_a != ids_b
    assert tree_digest(a.data_dir) != tree_digest(b.data_dir)


def test_uids_are_distinct_and_derived_from_the_seeds(tmp_path: Path) -> None:
    summary = generate(tmp_path / "a", image_spatial_dims=3, image_size=(16, 16, 3))
    other = generate(tmp_path / "b", site_seed=2, image_spatial_dims=3, image_size=(16, 16, 3))
    sop = [pydicom.dcmread(p).SOPInstanceUID for p in sorted(summary.dicom_dir.rglob("*.dcm"))]
    sop_other = [pydicom.dcmread(p).SOPInstanceUID for p in sorted(other.dicom_dir.rglob("*.dcm"))]
    assert len(set(sop)) == len(sop) == summary.with_image * 3
    assert not set(sop) & set(sop_other)


# --------------------------------------------------------------------------------------
# What is written


def test_summary_and_csv_agree_with_the_requested_fractions(tmp_path: Path) -> None:
    summary = generate(tmp_path, patients=20, image_fraction=0.75, tabular_fraction=0.5)
    assert (summary.patients, summary.with_image, summary.with_tabular) == (20, 15, 10)
    assert summary.with_both == 5 and summary.without_modality == 0
    rows = read_rows(summary.clinical_csv)
    assert [r["patient_id"] for r in rows] == sorted(r["patient_id"] for r in rows)
    assert all(r["patient_id"].startswith("H") and len(r["patient_id"]) == 7 for r in rows)
    complete = [r for r in rows if all(r[f] for f in FEATURES)]
    assert len(complete) == 10
    assert all(not any(r[f] for f in FEATURES) for r in rows if r not in complete)  # all or nothing
    for task, column in TASKS.items():
        labels = [int(r[column]) for r in rows]  # every patient has every label
        assert all(0 <= y < NUM_CLASSES[task] for y in labels)
        assert tuple(np.bincount(labels, minlength=NUM_CLASSES[task])) == summary.label_counts[task]
    studies = sorted(p.name for p in summary.dicom_dir.iterdir())
    assert len(studies) == 15 and set(studies) <= {r["patient_id"] for r in rows}
    assert (summary.data_dir / "SYNTHETIC.txt").is_file()


def test_fractions_that_do_not_cover_everyone_leave_label_only_patients(tmp_path: Path) -> None:
    summary = generate(tmp_path, patients=20, image_fraction=0.5, tabular_fraction=0.25)
    assert summary.without_modality == 5
    arrays = load(summary)
    assert arrays.num_patients == 15 and arrays.dropped_without_modality == 5


def test_clinical_values_are_plausible(tmp_path: Path) -> None:
    summary = generate(
        tmp_path,
        patients=200,
        modalities=("tabular",),
        image_fraction=0.0,
        tabular_fraction=1.0,
        tabular_features=(*FEATURES, "unknown_marker"),
    )
    rows = read_rows(summary.clinical_csv)
    age = np.array([float(r["age"]) for r in rows])
    crp = np.array([float(r["crp"]) for r in rows])
    sbp = np.array([float(r["systolic_bp"]) for r in rows])
    assert age.min() >= 18 and age.max() <= 95 and 50 < np.median(age) < 75
    assert crp.min() > 0 and np.median(crp) < 30  # log-normal: skewed, positive
    assert sbp.min() >= 80 and sbp.max() <= 230
    assert all(r["age"] == str(int(float(r["age"]))) for r in rows)  # whole years
    assert len({r["unknown_marker"] for r in rows}) > 100  # generic scale, two decimals


def test_dicom_headers_are_a_plausible_synthetic_ct(tmp_path: Path) -> None:
    summary = generate(tmp_path, image_spatial_dims=3, image_size=(20, 16, 5))
    study = sorted(summary.dicom_dir.iterdir())[0]
    files = sorted(study.iterdir())
    assert len(files) == 5
    positions = []
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.PatientID == study.name and "SYNTHETIC" in str(ds.PatientName)
        assert ds.PatientSex in ("F", "M") and len(ds.PatientBirthDate) == 8
        assert ds.InstanceNumber == k + 1
        assert (ds.Columns, ds.Rows) == (20, 16)
        assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
        assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
        for keyword in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "PixelSpacing",
            "SliceThickness",
            "ImageOrientationPatient",
            "StudyDate",
        ):
            assert keyword in ds
        positions.append(float(ds.ImagePositionPatient[2]))
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu.min() < -900 and 300 < hu.max() < 800  # air and bone
    assert positions == sorted(positions) and len(set(positions)) == 5
    rows = {r["patient_id"]: r for r in read_rows(summary.clinical_csv)}
    ds = pydicom.dcmread(files[0])
    if rows[study.name]["age"]:
        assert int(str(ds.PatientAge)[:3]) == int(float(rows[study.name]["age"]))


def test_imaging_only_site_writes_no_feature_columns(tmp_path: Path) -> None:
    summary = generate(tmp_path, modalities=("image",), image_fraction=1.0, tabular_fraction=0.0)
    with summary.clinical_csv.open(newline="") as f:
        assert next(csv.reader(f)) == ["patient_id", *TASKS.values()]
    assert summary.with_tabular == 0 and summary.with_image == summary.patients


def test_3d_site_reads_back_as_volumes(tmp_path: Path) -> None:
    summary = generate(tmp_path, image_spatial_dims=3, image_size=(16, 16, 6))
    arrays = load(summary, size=(16, 16, 6), spatial_dims=3)
    assert arrays.image is not None and arrays.image.shape == (12, 1, 16, 16, 6)
    assert arrays.image_present.sum() == 9


@pytest.mark.parametrize(("compression", "syntax"), [("rle", RLELossless), ("jpeg2000", JPEG2000Lossless)])
def test_compressed_sites_read_back_identically(tmp_path: Path, compression: str, syntax: str) -> None:
    size = (32, 40, 3)
    plain = generate(tmp_path / "plain", patients=6, image_spatial_dims=3, image_size=size)
    packed = generate(tmp_path / "packed", patients=6, image_spatial_dims=3, image_size=size, compression=compression)
    plain_files = sorted(plain.dicom_dir.rglob("*.dcm"))
    packed_files = sorted(packed.dicom_dir.rglob("*.dcm"))
    assert [p.relative_to(plain.dicom_dir) for p in plain_files] == [
        p.relative_to(packed.dicom_dir) for p in packed_files
    ]
    for a, b in zip(plain_files, packed_files, strict=True):
        ds, original = pydicom.dcmread(b), pydicom.dcmread(a)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert ds.SOPInstanceUID == original.SOPInstanceUID  # lossless: same instance
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
    for study in sorted(plain.dicom_dir.iterdir()):
        for window in (None, (-1000.0, 400.0)):
            np.testing.assert_array_equal(
                read_study(study, spatial_dims=3, size=(16, 16, 3), window=window),
                read_study(packed.dicom_dir / study.name, spatial_dims=3, size=(16, 16, 3), window=window),
            )
    assert plain.clinical_csv.read_bytes() == packed.clinical_csv.read_bytes()


# --------------------------------------------------------------------------------------
# The generative model


def test_tasks_are_defined_by_name_and_federation() -> None:
    a = synth._task_direction(7, "diagnosis")
    np.testing.assert_array_equal(a, synth._task_direction(7, "diagnosis"))
    assert not np.allclose(a, synth._task_direction(7, "grade"))
    assert not np.allclose(a, synth._task_direction(8, "diagnosis"))
    for task in ("diagnosis", "grade", "anything_else"):
        w = synth._task_direction(7, task)
        assert np.isclose(np.linalg.norm(w), 1.0)
        assert abs(w[0]) > 0.5 and np.hypot(w[2], w[3]) > 0.5  # needs the image and the table


def _tabular_xy(summary: SynthSummary, task: str) -> tuple[np.ndarray, np.ndarray]:
    rows = read_rows(summary.clinical_csv)
    x = np.array([[float(r[f]) for f in FEATURES] for r in rows])
    y = np.array([int(r[TASKS[task]]) for r in rows])
    return x, y


def test_the_model_is_shared_across_sites_of_a_federation(tmp_path: Path) -> None:
    """A classifier fitted at one site transfers to another site of the same federation
    (same mapping from latent to table and labels), but not to another federation's site."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    common = dict(patients=400, modalities=("tabular",), image_fraction=0.0, tabular_fraction=1.0)
    train = generate(tmp_path / "a", site_seed=1, **common)
    same = generate(tmp_path / "b", site_seed=2, shift=0.3, **common)
    x, y = _tabular_xy(train, "grade")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    x_same, y_same = _tabular_xy(same, "grade")
    transfer = model.score(x_same, y_same)
    assert transfer > 0.45  # chance is about 1/3
    scores_elsewhere = []
    for federation_seed in (12, 13, 14):
        other = generate(tmp_path / f"f{federation_seed}", site_seed=2, federation_seed=federation_seed, **common)
        scores_elsewhere.append(model.score(*_tabular_xy(other, "grade")))
    assert transfer > max(scores_elsewhere)


def test_fused_model_learns_both_tasks_well_above_chance(tmp_path: Path) -> None:
    """A 300-patient site: logistic regression on downsampled pixels plus the table.
    (Measured: 0.81 for the binary task, 0.65 for the 3-class task; image alone 0.72 and 0.51,
    table alone 0.67 and 0.54.)"""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    summary = generate(
        tmp_path,
        federation_seed=7,
        site_seed=1,
        patients=300,
        image_fraction=1.0,
        tabular_fraction=1.0,
        image_size=(32, 32),
    )
    arrays = load(summary, size=(8, 8))
    assert arrays.image is not None and arrays.tabular is not None
    both = np.hstack([arrays.image.reshape(arrays.num_patients, -1), arrays.tabular])
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.03, max_iter=3000))
    binary = cross_val_score(model, both, arrays.labels["diagnosis"], cv=folds).mean()
    three = cross_val_score(model, both, arrays.labels["grade"], cv=folds).mean()
    assert binary > 0.7
    assert three > 0.5


# --------------------------------------------------------------------------------------
# Atomic writing and refusal


def test_interrupted_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate(tmp_path)
    before = tree_digest(tmp_path / "data")
    calls = []

    def failing_write(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) % 3 == 0:  # the third study of each run
            raise KeyboardInterrupt
        original(*args, **kwargs)

    original = synth._write_study
    monkeypatch.setattr(synth, "_write_study", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, site_seed=9)
    assert tree_digest(tmp_path / "data") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []


def test_real_data_folder_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clinical.csv").write_text("patient_id,label\nREAL1,1\n")
    with pytest.raises(FileExistsError):
        generate(tmp_path)
    assert (tmp_path / "data" / "clinical.csv").read_text() == "patient_id,label\nREAL1,1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"image_fraction": 1.5},
        {"image_fraction": -0.1},
        {"tabular_fraction": float("nan")},
        {"patients": 1},
        {"patients": 0},
        {"patients": 10.0},
        {"modalities": ("image", "genomics")},
        {"modalities": ()},
        {"modalities": ("image",)},  # a tabular fraction without the modality
        {"tabular_features": ()},  # the tabular modality without features
        {"compression": "jpeg"},
        {"compression": "lossy"},
        {"compression": "jpeg2000", "image_size": (16, 16)},  # openjpeg needs 32 x 32 or more
        {"federation_seed": -1},
        {"site_seed": "1"},
        {"image_spatial_dims": 4},
        {"image_size": (16, 16, 16)},
        {"image_size": (4, 4)},
        {"shift": float("inf")},
        {"patient_prefix": "../x"},
        {"patient_prefix": ""},
        {"tasks": {}},
        {"tasks": {"diagnosis": "age", "grade": "grade_label"}},
        {"num_classes": {"diagnosis": 1, "grade": 3}},
        {"tabular_features": ("age", "age")},
        {"tabular_features": ("bad,name",)},
    ],
)
def test_nonsense_arguments_are_refused_before_anything_is_written(tmp_path: Path, overrides: dict) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path / "site", **overrides)
    assert not (tmp_path / "site").exists()
