"""Reading a hospital site's data: DICOM studies and the clinical CSV.

This is the torch/MONAI glue layer for data: the only module of blossom_secure that reads
DICOM pixel data (through MONAI's ``LoadImage`` with ``PydicomReader``). It turns a site's
files into plain NumPy arrays (:class:`SiteArrays`) that the training code wraps in tensors.

Layout of a site's data:

* ``dicom_dir/<patient_id>/*.dcm``: one study per patient, a single image or a series of
  slice files (one series; slices ordered by InstanceNumber). A single file
  ``dicom_dir/<patient_id>.dcm`` (a single image or a multi-frame volume) is also accepted.
  Entries whose names start with ``.`` are ignored everywhere (``.DS_Store`` and the like);
  any other entry that is not a study is a problem.
* a clinical CSV (UTF-8, a byte-order mark allowed; comma-, semicolon-, tab- or
  ``|``-separated, the separator detected with :class:`csv.Sniffer`; any line endings;
  header row), keyed by a patient-id column, with
  one label column per task and, for a site that holds the tabular modality, the feature
  columns. Other columns are ignored. The CSV is always required because labels live in
  it; an imaging-only site's CSV may have just the id and label columns (feature names
  passed for a site without the tabular modality are ignored).

Rules:

* A cell that is empty (or only whitespace) is missing. No other spelling means missing:
  ``NA`` in a feature column is a non-numeric value and therefore a problem.
* A patient's **tabular** modality is present iff *all* of its feature cells are
  non-empty; a partly missing row counts as absent (its values are zeroed).
* A patient's **image** modality is present iff a study exists for the patient.
* A **label** is an integer in ``[0, num_classes)``; an empty label cell means that
  patient has no label for that task (``-1`` in :attr:`SiteArrays.labels`).
* Patients with no label for any task, or with no present modality, are dropped. That is
  not an error: :class:`SiteArrays` reports how many were dropped. Their studies are not
  read. A site left with no usable patient at all is an error.
* Everything else wrong with the data is a :class:`~blossom_secure.errors.DataError`, which
  lists *every* problem found (file, column or patient, reason): missing folder or file,
  missing or repeated columns, duplicate or malformed patient ids, non-numeric or
  non-finite feature values, labels that are not integers in range, a study for a patient
  who is not in the CSV, a study whose PatientID tag disagrees with its folder name,
  unreadable or truncated studies, a CSV with a header and no rows. Problem messages name
  the patient and the column but never echo a cell's value (nor a DICOM tag's); at most
  :data:`MAX_PROBLEMS_PER_KIND` problems of one kind are listed, then counted.

Images are returned as ``float32`` arrays of shape ``(1, *size)`` scaled to ``[0, 1]``.
The spatial axes follow MONAI's convention for DICOM (``PydicomReader(swap_ij=True)``):
``(columns, rows[, slices])``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
import pydicom.config
import pydicom.errors
from monai.data import PydicomReader
from monai.transforms import LoadImage, Resize, ScaleIntensity, ScaleIntensityRange
from monai.utils import convert_to_numpy
from pydicom.pixels import get_decoder

from blossom_secure.blocks import MODALITIES, is_valid_task_name
from blossom_secure.errors import DataError, Problem

if TYPE_CHECKING:
    from blossom_secure.config import FederationConfig
    from blossom_secure.site.config import SiteConfig

__all__ = [
    "CSV_DELIMITERS",
    "MAX_PROBLEMS_PER_KIND",
    "SiteArrays",
    "bounded_problems",
    "load_site_arrays",
    "load_site_data",
    "read_study",
    "split_holdout",
]

logger = logging.getLogger(__name__)

#: Largest clinical CSV read, in bytes.
MAX_CSV_BYTES = 256 * 1024 * 1024
#: Largest study decoded, in voxels (before resizing): about 1 GiB as float32.
MAX_STUDY_VOXELS = 256 * 1024 * 1024
#: Largest number of slice files in one study folder.
MAX_SLICES_PER_STUDY = 4096

_DICOM_SUFFIX = ".dcm"
# Matched by PydicomReader against each path in a study folder; only *.dcm files are slices.
_SLICE_REGEX = r"(?is).*\.dcm\Z"
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
# ITU-R BT.601 luma weights, used to turn a colour image into one channel.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Patient ids become file names: no separators, no control characters, DICOM LO length.
_PATIENT_ID_RE = re.compile(r"[^\x00-\x1f\x7f/\\]{1,64}")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_MAX_REASON_CHARS = 200


@dataclass(frozen=True, eq=False)
class SiteArrays:
    """A site's data as arrays, one row per usable patient.

    Attributes:
        patient_ids: Sorted patient ids; only patients with a label for at least one task
            and at least one present modality.
        image: ``float32`` ``(N, 1, *size)`` in ``[0, 1]``, zeros where absent; ``None`` if
            the site does not hold the image modality.
        image_present: ``bool`` ``(N,)``.
        tabular: ``float32`` ``(N, F)`` raw feature values (not standardised), zeros where
            absent; ``None`` if the site does not hold the tabular modality.
        tabular_present: ``bool`` ``(N,)``.
        extra_tabular: Extra tabular modality (see
            :attr:`blossom_secure.config.ModelLayout.extra_tabular`) -> ``float32``
            ``(N, F)`` raw values, zeros where absent; only the extra modalities the site holds.
        extra_tabular_present: Extra tabular modality -> ``bool`` ``(N,)``.
        labels: Task name -> ``int64`` ``(N,)``, ``-1`` where that patient has no label.
        num_classes: Task name -> number of classes.
        tabular_features: The feature column names, in the order of ``tabular``'s columns
            (empty when the site does not hold the tabular modality).
        patients_in_csv: Rows in the clinical CSV.
        dropped_without_label: CSV patients dropped because they have no label at all.
        dropped_without_modality: Labelled CSV patients dropped because they have neither
            a study nor a complete feature row.
    """

    patient_ids: tuple[str, ...]
    image: np.ndarray | None
    image_present: np.ndarray
    tabular: np.ndarray | None
    tabular_present: np.ndarray
    labels: Mapping[str, np.ndarray]
    num_classes: Mapping[str, int]
    tabular_features: tuple[str, ...]
    patients_in_csv: int
    dropped_without_label: int
    dropped_without_modality: int
    extra_tabular: Mapping[str, np.ndarray] = field(default_factory=lambda: MappingProxyType({}))
    extra_tabular_present: Mapping[str, np.ndarray] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        n = len(self.patient_ids)
        shapes_ok = (
            self.image_present.shape == (n,)
            and self.tabular_present.shape == (n,)
            and (self.image is None or self.image.shape[0] == n)
            and (self.tabular is None or self.tabular.shape == (n, len(self.tabular_features)))
            and all(v.shape == (n,) for v in self.labels.values())
            and set(self.labels) == set(self.num_classes)
            and set(self.extra_tabular) == set(self.extra_tabular_present)
            and all(v.ndim == 2 and v.shape[0] == n for v in self.extra_tabular.values())
            and all(v.shape == (n,) for v in self.extra_tabular_present.values())
        )
        if not shapes_ok:
            raise ValueError("SiteArrays: arrays disagree on the number of patients or tasks")

    @property
    def num_patients(self) -> int:
        """Number of usable patients (rows)."""
        return len(self.patient_ids)

    def label_counts(self, task: str) -> tuple[int, ...]:
        """Per-class label counts for ``task`` (patients without a label are not counted).

        Raises:
            KeyError: ``task`` is not one of the site's tasks.
        """
        y = self.labels[task]
        return tuple(int(c) for c in np.bincount(y[y >= 0], minlength=self.num_classes[task]))

    def summary(self) -> dict[str, Any]:
        """Counts an operator can read or log; no patient ids and no values.

        Returns:
            A flat dict: ``patients``, ``with_image``, ``with_tabular``, ``with_both``,
            ``patients_in_csv``, ``dropped_without_label``, ``dropped_without_modality``
            and ``labels.<task>`` (a tuple of per-class counts) for every task.
        """
        out: dict[str, Any] = {
            "patients": self.num_patients,
            "with_image": int(self.image_present.sum()),
            "with_tabular": int(self.tabular_present.sum()),
            "with_both": int((self.image_present & self.tabular_present).sum()),
            "patients_in_csv": self.patients_in_csv,
            "dropped_without_label": self.dropped_without_label,
            "dropped_without_modality": self.dropped_without_modality,
        }
        for name in sorted(self.extra_tabular_present):
            out[f"with_{name}"] = int(self.extra_tabular_present[name].sum())
        for task in sorted(self.labels):
            out[f"labels.{task}"] = self.label_counts(task)
        return out


# --------------------------------------------------------------------------------------
# Argument checks (caller misuse: ValueError)


def _check_image_args(spatial_dims: int, size: tuple[int, ...], window: tuple[float, float] | None) -> None:
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims!r}")
    if (
        not isinstance(size, tuple)
        or len(size) != spatial_dims
        or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 4096 for s in size)
    ):
        raise ValueError(f"size must be a tuple of {spatial_dims} ints in [1, 4096], not {size!r}")
    if window is not None and (
        not isinstance(window, tuple)
        or len(window) != 2
        or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in window)
        or not window[0] < window[1]
    ):
        raise ValueError(f"window must be (low, high) with finite low < high, not {window!r}")


def _short(exc: BaseException) -> str:
    """One line naming an exception, for a Problem's reason (never a traceback)."""
    text = " ".join(str(exc).split())
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------
# DICOM studies


@dataclass(frozen=True)
class _SliceHeader:
    path: Path
    patient_id: str | None
    series_uid: str | None
    instance_number: int | None
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    photometric: str


@dataclass(frozen=True)
class _Study:
    """A study that passed the header checks, ready for MONAI."""

    path: Path
    headers: tuple[_SliceHeader, ...]

    @property
    def patient_ids(self) -> frozenset[str | None]:
        return frozenset(h.patient_id for h in self.headers)


def _study_files(path: Path) -> tuple[list[Path], list[Problem]]:
    """The slice files of a study (a file, or a folder of ``*.dcm`` files)."""
    if path.is_file():
        return [path], []
    if not path.exists():
        return [], [Problem(str(path), "", "study not found")]
    if not path.is_dir():
        return [], [Problem(str(path), "", "not a file or a folder")]
    files: list[Path] = []
    problems: list[Problem] = []
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        return [], [Problem(str(path), "", f"cannot list the folder ({_short(exc)})")]
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() == _DICOM_SUFFIX:
            files.append(entry)
        else:
            problems.append(Problem(str(entry), "", "unexpected entry in a study folder (slices must be *.dcm files)"))
    if not files and not problems:
        problems.append(Problem(str(path), "", "study folder holds no *.dcm files"))
    if len(files) > MAX_SLICES_PER_STUDY:
        problems.append(Problem(str(path), "", f"more than {MAX_SLICES_PER_STUDY} slice files"))
    return files, problems


def _read_header(path: Path) -> tuple[_SliceHeader | None, list[Problem]]:
    """Read one file's header (pixel data deferred) and check that it is a usable image."""
    name = str(path)
    try:
        if path.stat().st_size == 0:
            return None, [Problem(name, "", "empty file (0 bytes)")]
        # defer_size: large values (pixel data) are located but not loaded here.
        ds = pydicom.dcmread(path, defer_size=4096)
    except pydicom.errors.InvalidDicomError:
        return None, [Problem(name, "", "not a DICOM file (no DICM preamble and file meta information)")]
    except OSError as exc:
        return None, [Problem(name, "", f"cannot read the file ({_short(exc)})")]
    except Exception as exc:  # pydicom raises many types on malformed input
        return None, [Problem(name, "", f"not a readable DICOM file ({_short(exc)})")]

    truncated = _truncation(path, ds)
    if truncated is not None:
        return None, [Problem(name, "", truncated)]
    problems: list[Problem] = []
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        problems.append(Problem(name, "TransferSyntaxUID", "the file meta information names no transfer syntax"))
    else:
        try:
            decoder_ok = get_decoder(ts).is_available
        except NotImplementedError:
            decoder_ok = False
        if not decoder_ok:
            problems.append(
                Problem(
                    name,
                    "TransferSyntaxUID",
                    f"unsupported transfer syntax {ts.name} ({ts}): no pixel data decoder is installed for it",
                )
            )
    if "PixelData" not in ds:
        modality = ds.get("Modality", "unknown")
        problems.append(Problem(name, "PixelData", f"no pixel data (not an image; Modality {modality})"))
        return None, problems
    if "SegmentSequence" in ds:
        problems.append(Problem(name, "SegmentSequence", "a segmentation object, not an image"))

    def int_tag(keyword: str, default: int | None) -> int | None:
        try:
            value = ds.get(keyword, default)
            return None if value is None else int(value)
        except (TypeError, ValueError):
            return None

    rows, columns = int_tag("Rows", None), int_tag("Columns", None)
    frames = int_tag("NumberOfFrames", 1)
    samples = int_tag("SamplesPerPixel", 1)
    for keyword, value in (("Rows", rows), ("Columns", columns), ("NumberOfFrames", frames)):
        if value is None or value < 1:
            problems.append(Problem(name, keyword, "missing or not a positive integer"))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if (samples == 1 and photometric not in _MONOCHROME) or (samples == 3 and photometric not in _COLOUR):
        reason = f"unsupported photometric interpretation {photometric or 'none'}"
        problems.append(Problem(name, "PhotometricInterpretation", reason))
    elif samples not in (1, 3):
        problems.append(Problem(name, "SamplesPerPixel", "must be 1 (greyscale) or 3 (colour)"))
    if problems or rows is None or columns is None or frames is None or samples is None:
        return None, problems or [Problem(name, "", "malformed image header")]
    if rows * columns * frames > MAX_STUDY_VOXELS:
        return None, [Problem(name, "", f"image larger than {MAX_STUDY_VOXELS} voxels")]
    pid = ds.get("PatientID")
    series = ds.get("SeriesInstanceUID")
    return (
        _SliceHeader(
            path=path,
            patient_id=None if pid is None else str(pid),
            series_uid=None if series is None else str(series),
            instance_number=int_tag("InstanceNumber", None),
            rows=rows,
            columns=columns,
            frames=frames,
            samples_per_pixel=samples,
            photometric=photometric,
        ),
        [],
    )


# A file's first 128 bytes are the preamble, then "DICM", then the file meta group, whose
# first element (FileMetaInformationGroupLength, 12 bytes) gives the length of the rest.
_META_START = 128 + 4 + 12


def _truncation(path: Path, ds: Any) -> str | None:
    """Why a file that pydicom read looks cut short, or ``None``. pydicom stops silently at
    the end of a file, so a study cut in the middle would otherwise read as "no pixel data"
    or "no transfer syntax"."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    meta = getattr(ds, "file_meta", None)
    try:
        group_length = int(meta.get("FileMetaInformationGroupLength")) if meta is not None else None
    except (TypeError, ValueError):
        group_length = None
    if group_length is not None and size < _META_START + group_length:
        return f"truncated: the file ends after {size} bytes, inside its file meta information"
    if "PixelData" in ds:
        return None
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    try:
        is_image = sop is not None and "Image Storage" in pydicom.uid.UID(str(sop)).name
    except Exception:  # noqa: BLE001 - an unknown UID is simply not known to be an image
        is_image = False
    if len(ds) == 0 or is_image or "Rows" in ds:
        return f"truncated: the file ends after {size} bytes, before its pixel data"
    return None


def _inspect_study(path: Path) -> tuple[_Study | None, list[Problem]]:
    """Check a study's files and headers, before any pixel data is decoded."""
    files, problems = _study_files(path)
    headers: list[_SliceHeader] = []
    for f in files:
        header, found = _read_header(f)
        problems.extend(found)
        if header is not None:
            headers.append(header)
    if problems:
        return None, problems
    if len(headers) > 1:
        folder = str(path)
        first = headers[0]
        if any(h.frames != 1 for h in headers):
            problems.append(Problem(folder, "NumberOfFrames", "a series of slice files must hold one frame per file"))
        if any(h.samples_per_pixel != 1 for h in headers):
            problems.append(Problem(folder, "SamplesPerPixel", "a series of slice files must be greyscale"))
        if any((h.rows, h.columns) != (first.rows, first.columns) for h in headers):
            problems.append(Problem(folder, "Rows/Columns", "slices differ in size"))
        if any(h.photometric != first.photometric for h in headers):
            problems.append(Problem(folder, "PhotometricInterpretation", "slices differ"))
        if len({h.series_uid for h in headers}) != 1:
            problems.append(Problem(folder, "SeriesInstanceUID", "the folder holds more than one series"))
        numbers = [h.instance_number for h in headers]
        if any(n is None for n in numbers):
            reason = "a slice has no InstanceNumber, so the slices cannot be ordered"
            problems.append(Problem(folder, "InstanceNumber", reason))
        elif len(set(numbers)) != len(numbers):
            problems.append(Problem(folder, "InstanceNumber", "two slices share an InstanceNumber"))
        if sum(h.rows * h.columns for h in headers) > MAX_STUDY_VOXELS:
            problems.append(Problem(folder, "", f"series larger than {MAX_STUDY_VOXELS} voxels"))
    elif headers and headers[0].samples_per_pixel != 1 and headers[0].frames != 1:
        problems.append(Problem(str(headers[0].path), "NumberOfFrames", "multi-frame colour images are not supported"))
    if problems:
        return None, problems
    return _Study(path=path, headers=tuple(headers)), []


# Guards the shared loader: PydicomReader keeps per-call state between read and get_data.
_LOADER_LOCK = threading.Lock()

#: The tags MONAI's ``PydicomReader`` keeps in its pruned metadata (orientation, position,
#: pixel spacing, and the multi-frame functional groups), in its order.
_AFFINE_TAGS = (0x00200037, 0x00200032, 0x00280030, 0x52009229, 0x52009230)


class _PydicomReader(PydicomReader):
    """MONAI's ``PydicomReader``, without converting every element of a file to DICOM JSON
    to keep five of them.

    With ``prune_metadata`` (MONAI's default, used here) the reader serialises the whole
    dataset, pixel data included (as base64), then keeps only :data:`_AFFINE_TAGS`, from
    which it builds the affine. This serialises those elements alone, exactly as pydicom's
    ``Dataset.to_json_dict(suppress_invalid_tags=True)`` would (an element that cannot be
    converted is left out), so the metadata, and hence the decoded study and any error, are
    the same (``tests/test_data.py`` compares them with MONAI's own); that conversion was
    about a quarter of the time reading a site's studies takes.
    """

    def _get_meta_dict(self, img: Any) -> dict:
        if not self.prune_metadata:
            return super()._get_meta_dict(img)
        metadata = {}
        with pydicom.config.strict_reading():
            for tag in _AFFINE_TAGS:
                if tag not in img:
                    continue
                try:
                    metadata[f"{tag:08X}"] = img[tag].to_json_dict(bulk_data_element_handler=None,
                                                                  bulk_data_threshold=1024)
                except Exception:  # noqa: BLE001 - as suppress_invalid_tags: the element is left out
                    continue
        return metadata


@lru_cache(maxsize=1)
def _loader() -> tuple[LoadImage, PydicomReader]:
    """The MONAI loader, built once per process.

    Building a ``LoadImage`` instantiates every registered reader, and in MONAI 1.6 that
    includes the nvImageCodec reader, which tries to register a GPU pydicom decoder plugin
    and logs a warning when it cannot (no CUDA here). That warning says nothing an operator
    can act on, so it is filtered out while the loader is built, once per process.
    """
    reader = _PydicomReader(fname_regex=_SLICE_REGEX)
    plugin_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    quiet = _DropMessages("nvImageCodec is not available")
    plugin_logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = LoadImage(reader=reader, ensure_channel_first=True, image_only=True)
    finally:
        plugin_logger.removeFilter(quiet)
    return loader, reader


#: pydicom's pixel decoders log every failed decoding attempt with ``LOGGER.exception``.
_PYDICOM_DECODER_LOGGER = "pydicom.pixels.decoders.base"


class _DropTracebacks(logging.Filter):
    """Drops log records that carry a traceback (``exc_info``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.exc_info


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _decode_study(
    study: _Study, *, spatial_dims: int, size: tuple[int, ...], window: tuple[float, float] | None
) -> tuple[np.ndarray | None, list[Problem]]:
    """Decode a checked study with MONAI and bring it to ``(1, *size)`` in ``[0, 1]``."""
    first = study.headers[0]
    target = study.path if study.path.is_dir() and len(study.headers) > 1 else first.path
    loader, reader = _loader()
    decoder_logger = logging.getLogger(_PYDICOM_DECODER_LOGGER)
    quiet = _DropTracebacks()
    try:
        with _LOADER_LOCK, warnings.catch_warnings():
            # PydicomReader warns per file (missing orientation, slice spacing, ...).
            warnings.simplefilter("ignore")
            # pydicom's decoders log each failed attempt with its traceback before they
            # raise; the failure is reported as a Problem below, so the traceback would
            # only reach the operator's terminal twice over.
            decoder_logger.addFilter(quiet)
            try:
                # Passing the reader pins it: otherwise a failing read falls back to every
                # other registered reader (PIL, NumPy, ...).
                image = loader(str(target), reader=reader)
            finally:
                decoder_logger.removeFilter(quiet)
        array = convert_to_numpy(image, dtype=np.float32)
    except Exception as exc:  # decoders raise RuntimeError, ValueError, ... on bad pixel data
        if "less than expected" in str(exc):
            return None, [Problem(str(target), "PixelData", "truncated: the pixel data is shorter than the image "
                                                            f"header declares ({_short(exc)})")]
        return None, [Problem(str(target), "PixelData", f"pixel data could not be decoded ({_short(exc)})")]

    # PydicomReader swaps the first two axes of the decoded array. For a series that turns
    # (rows, cols, slices) into (cols, rows, slices); for a multi-frame file it turns
    # (frames, rows, cols) into (rows, frames, cols), so put the frames last here to get
    # the series layout.
    if len(study.headers) == 1 and first.frames > 1:
        array = array.transpose(0, 3, 1, 2)
    if first.samples_per_pixel == 3:  # (1, cols, rows, 3) -> (1, cols, rows)
        array = np.tensordot(array, _LUMA, axes=([-1], [0]))
    spatial = array.ndim - 1
    if spatial == 3 and spatial_dims == 2:
        array = array[..., array.shape[-1] // 2]
    elif spatial == 2 and spatial_dims == 3:
        return None, [
            Problem(
                str(target),
                "",
                "a single 2D image, but the site's images are 3D (a slice series or a multi-frame file is needed)",
            )
        ]
    elif spatial not in (2, 3):
        return None, [Problem(str(target), "", f"decoded to {spatial} spatial dimensions; expected 2 or 3")]

    if window is None:
        scale: Any = ScaleIntensity(minv=0.0, maxv=1.0)
    else:
        scale = ScaleIntensityRange(a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)
    resize = Resize(spatial_size=size, mode="area")
    out = convert_to_numpy(resize(scale(array)), dtype=np.float32)
    if first.photometric == "MONOCHROME1":  # higher stored values are darker
        out = 1.0 - out
    out = np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
    if out.shape != (1, *size):  # defensive: a MONAI change must not pass silently
        raise RuntimeError(f"internal error: study resized to {out.shape}, expected {(1, *size)}")
    return out, []


def _load_study(
    path: Path, *, spatial_dims: int, size: tuple[int, ...], window: tuple[float, float] | None
) -> tuple[np.ndarray | None, _Study | None, list[Problem]]:
    study, problems = _inspect_study(path)
    if study is None:
        return None, None, problems
    array, problems = _decode_study(study, spatial_dims=spatial_dims, size=size, window=window)
    return array, study, problems


def read_study(
    path: Path, *, spatial_dims: int, size: tuple[int, ...], window: tuple[float, float] | None = None
) -> np.ndarray:
    """Read one patient's DICOM study as a ``float32`` array ``(1, *size)`` in ``[0, 1]``.

    The study is read with MONAI ``LoadImage(reader="PydicomReader")`` (RescaleSlope and
    RescaleIntercept applied, so CT is in HU), scaled to ``[0, 1]`` (``ScaleIntensityRange``
    over ``window``, clipped; or ``ScaleIntensity`` min-max when ``window`` is ``None``) and
    resized to ``size`` (``Resize``, area interpolation). Uncompressed, deflated, RLE,
    JPEG (baseline, extended, lossless), JPEG-LS and JPEG 2000 transfer syntaxes are
    decoded (the last three through the pylibjpeg plugins). MONOCHROME1 images are
    inverted; colour images are reduced to luma (ITU-R BT.601).

    Args:
        path: A DICOM file (one image, or a multi-frame volume) or a folder of ``*.dcm``
            slice files forming one series (ordered by InstanceNumber).
        spatial_dims: 2 or 3. For 2, a volume contributes its middle slice. For 3, a single
            2D image is an error.
        size: Output spatial size, ``spatial_dims`` ints, in MONAI's axis order
            ``(columns, rows[, slices])``.
        window: ``(low, high)`` in stored units after rescaling (HU for CT), mapped to
            ``[0, 1]`` with clipping; ``None`` scales each study by its own min and max.

    Returns:
        A ``float32`` array of shape ``(1, *size)`` with values in ``[0, 1]``.

    Raises:
        DataError: The study cannot be used; every problem names the file and the reason
            (not found, empty, not DICOM, no pixel data, unsupported transfer syntax or
            photometric interpretation, pixel data that cannot be decoded, inconsistent
            series, wrong dimensionality).
        ValueError: ``spatial_dims``, ``size`` or ``window`` is invalid.

    Example:
        >>> x = read_study(Path("dicom/P001"), spatial_dims=2, size=(64, 64), window=(-1000.0, 400.0))
        >>> x.shape
        (1, 64, 64)
    """
    _check_image_args(spatial_dims, size, window)
    array, _, problems = _load_study(Path(path), spatial_dims=spatial_dims, size=size, window=window)
    if array is None:
        raise DataError(problems)
    return array


def _find_studies(dicom_dir: Path) -> tuple[dict[str, Path], list[Problem]]:
    """Map patient id -> study path for every study in ``dicom_dir``."""
    name = str(dicom_dir)
    if not dicom_dir.exists():
        return {}, [Problem(name, "", "DICOM folder not found")]
    if not dicom_dir.is_dir():
        return {}, [Problem(name, "", "not a folder")]
    studies: dict[str, Path] = {}
    problems: list[Problem] = []
    try:
        entries = sorted(dicom_dir.iterdir())
    except OSError as exc:
        return {}, [Problem(name, "", f"cannot list the folder ({_short(exc)})")]
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            pid = entry.name
        elif entry.is_file() and entry.suffix.lower() == _DICOM_SUFFIX:
            pid = entry.name[: -len(_DICOM_SUFFIX)]
        else:
            problems.append(
                Problem(str(entry), "", "not a study (expected a <patient_id>/ folder or a <patient_id>.dcm file)")
            )
            continue
        if pid in studies:
            problems.append(
                Problem(str(entry), f"patient {pid}", "two studies for one patient (a folder and a .dcm file)")
            )
            continue
        studies[pid] = entry
    if not studies and not problems:
        problems.append(
            Problem(name, "", "no studies found (expected <patient_id>/ folders or <patient_id>.dcm files)")
        )
    return studies, problems


# --------------------------------------------------------------------------------------
# Clinical CSV


@dataclass(frozen=True)
class _ClinicalRow:
    features: tuple[float, ...] | None  # None: at least one feature cell is empty
    labels: dict[str, int]  # task -> label, tasks without a label left out
    extra: dict[str, tuple[float, ...] | None] = field(default_factory=dict)  # extra tabular modalities


def _read_clinical_csv(
    path: Path,
    *,
    patient_id_column: str,
    tabular_features: Sequence[str],
    tasks: Mapping[str, str],
    num_classes: Mapping[str, int],
    extra_tabular: Mapping[str, Sequence[str]] = MappingProxyType({}),
) -> tuple[dict[str, _ClinicalRow] | None, list[Problem]]:
    name = str(path)
    try:
        size_bytes = path.stat().st_size
        if not path.is_file():
            return None, [Problem(name, "", "not a file")]
        if size_bytes > MAX_CSV_BYTES:
            return None, [Problem(name, "", f"larger than {MAX_CSV_BYTES} bytes")]
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, [Problem(name, "", "clinical CSV not found")]
    except OSError as exc:
        return None, [Problem(name, "", f"cannot read the file ({_short(exc)})")]
    try:
        text = raw.decode("utf-8-sig")  # a BOM, as spreadsheet programs write, is allowed
    except UnicodeDecodeError as exc:
        return None, [Problem(name, "", f"not UTF-8 text (byte {exc.start})")]

    if not text.strip():
        return None, [Problem(name, "", "empty file: no header row")]
    delimiter, note = _choose_delimiter(text, patient_id_column)
    if delimiter is None:
        return None, [Problem(name, "", note)]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        return None, [Problem(name, "line 1", f"malformed CSV ({exc})")]
    if header is None:
        return None, [Problem(name, "", "empty file: no header row")]
    header = [h.strip() for h in header]

    problems: list[Problem] = []
    column_index: dict[str, int] = {}
    for i, h in enumerate(header):
        if h in column_index:
            problems.append(Problem(name, h or f"column {i + 1}", "column name appears more than once"))
        else:
            column_index[h] = i
    needed: list[tuple[str, str]] = [(patient_id_column, "the patient id column")]
    needed += [(col, f"the label column of task {task!r}") for task, col in tasks.items()]
    needed += [(col, "a tabular feature column") for col in tabular_features]
    needed += [(col, f"a feature column of modality {m!r}") for m, cols in extra_tabular.items() for col in cols]
    for col, role in needed:
        if col not in column_index:
            problems.append(Problem(name, col, f"column missing ({role}){note if col == patient_id_column else ''}"))
    if patient_id_column not in column_index:
        return None, problems

    id_at = column_index[patient_id_column]
    groups = {"": tuple(tabular_features), **{m: tuple(cols) for m, cols in extra_tabular.items()}}
    group_at = {g: [column_index.get(col) for col in cols] for g, cols in groups.items()}
    label_at = {task: column_index.get(col) for task, col in tasks.items()}
    rows: dict[str, _ClinicalRow] = {}
    first_line: dict[str, int] = {}
    data_lines = 0
    try:
        for record in reader:
            line = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                continue  # blank line
            data_lines += 1
            if len(record) != len(header):
                problems.append(
                    Problem(name, f"line {line}", f"{len(record)} fields, but the header has {len(header)}")
                )
                continue
            pid = record[id_at].strip()
            if not pid:
                problems.append(Problem(name, f"{patient_id_column}, line {line}", "empty patient id"))
                continue
            if not _PATIENT_ID_RE.fullmatch(pid) or pid.startswith("."):
                problems.append(
                    Problem(
                        name,
                        f"{patient_id_column}, line {line}",
                        "malformed patient id (1-64 characters, no control characters or path separators, "
                        "not starting with '.')",
                    )
                )
                continue
            if pid in first_line:
                problems.append(
                    Problem(
                        name,
                        f"patient {pid}",
                        f"duplicate patient id (lines {first_line[pid]} and {line})",
                    )
                )
                continue
            first_line[pid] = line

            group_values: dict[str, tuple[float, ...] | None] = {}
            for group, cols in groups.items():
                values: list[float] = []
                complete = True
                for col, at in zip(cols, group_at[group], strict=True):
                    if at is None:
                        complete = False
                        continue
                    cell = record[at].strip()
                    if not cell:
                        complete = False
                        continue
                    try:
                        value = float(cell)
                    except ValueError:
                        value = math.nan
                        reason = "not a number"
                    else:
                        reason = "not a finite number"
                    if not math.isfinite(value):
                        problems.append(Problem(name, f"{col}, patient {pid}", reason))
                        complete = False
                        continue
                    values.append(value)
                group_values[group] = tuple(values) if complete else None

            labels: dict[str, int] = {}
            for task, at in label_at.items():
                if at is None:
                    continue
                cell = record[at].strip()
                if not cell:
                    continue
                col = tasks[task]
                k = num_classes[task]
                if not _INT_RE.fullmatch(cell):
                    reason = f"label is not an integer class in [0, {k})"
                    problems.append(Problem(name, f"{col}, patient {pid}", reason))
                    continue
                label = int(cell)
                if not 0 <= label < k:
                    problems.append(Problem(name, f"{col}, patient {pid}", f"label outside [0, {k})"))
                    continue
                labels[task] = label
            extra = {g: v for g, v in group_values.items() if g}
            rows[pid] = _ClinicalRow(features=group_values[""], labels=labels, extra=extra)
    except csv.Error as exc:
        problems.append(Problem(name, f"line {reader.line_num}", f"malformed CSV ({exc})"))
    if not rows and not problems and not data_lines:
        return None, [Problem(name, "", "the file has a header but no patient rows (header only)")]
    return rows, problems


#: Separators a clinical CSV may use (detected with :class:`csv.Sniffer`), and their names.
CSV_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "vertical bar"}
_SNIFF_BYTES = 64 * 1024


def _choose_delimiter(text: str, patient_id_column: str) -> tuple[str | None, str]:
    """The CSV's separator: the one :class:`csv.Sniffer` finds (among
    :data:`CSV_DELIMITERS`), or another of them under which the header holds the patient
    id column. Returns ``(separator, "")``; or ``(None, reason)`` when no separator splits
    the header at all (a wrong separator: one message naming the header's only column,
    never a cell of a patient row); or the sniffed separator with a note for the missing
    patient id column when the header splits but lacks it (then every missing column is
    reported, as usual).
    """
    first = text.splitlines()[0]
    try:
        sniffed = csv.Sniffer().sniff(text[:_SNIFF_BYTES], delimiters="".join(CSV_DELIMITERS)).delimiter
    except csv.Error:
        sniffed = ","
    headers: dict[str, list[str]] = {}
    for delimiter in [sniffed] + [d for d in CSV_DELIMITERS if d != sniffed]:
        try:
            headers[delimiter] = [h.strip() for h in next(csv.reader([first], delimiter=delimiter))]
        except (csv.Error, StopIteration):
            continue
        if patient_id_column in headers[delimiter]:
            return delimiter, ""
    widest = max(headers, key=lambda d: len(headers[d]), default=sniffed)
    header = headers.get(widest, [])
    if len(header) <= 1:
        shown = repr(first.strip()[:60]) + ("..." if len(first.strip()) > 60 else "")
        return None, (f"wrong separator: no {', '.join(CSV_DELIMITERS.values())} separates the header's column names, "
                      f"so it reads as one column ({shown}); separate the columns with one of them")
    return widest, f"; read as {CSV_DELIMITERS[widest]}-separated (the separator found)"


#: At most this many problems of one kind are listed; the rest are counted.
MAX_PROBLEMS_PER_KIND = 3


def _problem_kind(problem: Problem) -> tuple[str, str]:
    """What a problem is about, without the patient, line or number it names."""
    key = re.sub(r"(^|, )(patient .*|line [0-9]+)$", "", problem.key)
    return key, re.sub(r"[0-9]+", "#", problem.reason)


def bounded_problems(problems: Sequence[Problem], *, per_kind: int = MAX_PROBLEMS_PER_KIND) -> list[Problem]:
    """``problems`` with at most ``per_kind`` examples of each kind (the same column or
    field and the same reason, whatever patient, line or number), followed by one line
    counting the rest of that kind, so that one mistake (a header-only CSV, a wrong
    column) is a few lines, not one per patient."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        groups.setdefault(_problem_kind(problem), []).append(problem)
    out: list[Problem] = []
    for (key, _), items in groups.items():
        out.extend(items[:per_kind])
        rest = items[per_kind:]
        if rest:
            files = {p.file for p in rest}
            where = rest[0].file if len(files) == 1 else f"{len(files)} more files"
            out.append(Problem(where, key, f"... and {len(rest)} more problem(s) like the one above "
                                           f"({len(items)} in all)"))
    return out


# --------------------------------------------------------------------------------------
# A site


def _check_site_args(
    *,
    dicom_dir: Path | None,
    clinical_csv: Path | None,
    patient_id_column: str,
    modalities: Sequence[str],
    tabular_features: Sequence[str],
    tasks: Mapping[str, str],
    num_classes: Mapping[str, int],
    extra_tabular: Mapping[str, Sequence[str]],
) -> None:
    mods = tuple(modalities)
    known = MODALITIES + tuple(extra_tabular)
    if not mods or len(set(mods)) != len(mods) or not set(mods) <= set(known):
        raise ValueError(f"modalities must be a non-empty subset of {known} without repeats, not {mods!r}")
    for m, cols in extra_tabular.items():
        if m in MODALITIES or not isinstance(m, str) or not m:
            raise ValueError(f"{m!r} cannot name an extra tabular modality")
        if not cols:
            raise ValueError(f"extra tabular modality {m!r} needs at least one feature column")
    if clinical_csv is None:
        raise ValueError("clinical_csv is required: the labels live in the clinical CSV")
    if ("image" in mods) != (dicom_dir is not None):
        raise ValueError("dicom_dir must be given exactly when 'image' is one of the modalities")
    feats = tuple(tabular_features) if "tabular" in mods else ()
    if "tabular" in mods and not feats:
        raise ValueError("the tabular modality needs at least one feature column")
    if len(set(feats)) != len(feats) or not all(isinstance(f, str) and f for f in feats):
        raise ValueError("tabular_features must be distinct non-empty column names")
    if not isinstance(patient_id_column, str) or not patient_id_column:
        raise ValueError("patient_id_column must be a non-empty column name")
    if not tasks:
        raise ValueError("at least one task is needed")
    for task, col in tasks.items():
        if not is_valid_task_name(task):
            raise ValueError(f"invalid task name {task!r}")
        if not isinstance(col, str) or not col:
            raise ValueError(f"task {task!r}: the label column must be a non-empty name")
        k = num_classes.get(task)
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise ValueError(f"task {task!r}: num_classes must be an int >= 2, not {k!r}")
    extra_cols = [c for m, cols in extra_tabular.items() if m in mods for c in cols]
    columns = [patient_id_column, *tasks.values(), *feats, *extra_cols]
    if len(set(columns)) != len(columns):
        raise ValueError("the id, label and feature columns must all be different columns")


def load_site_arrays(
    *,
    dicom_dir: Path | None,
    clinical_csv: Path | None,
    patient_id_column: str,
    modalities: Sequence[str],
    tabular_features: Sequence[str],
    tasks: Mapping[str, str],
    num_classes: Mapping[str, int],
    image_spatial_dims: int,
    image_size: tuple[int, ...],
    image_window: tuple[float, float] | None = None,
    extra_tabular: Mapping[str, Sequence[str]] | None = None,
) -> SiteArrays:
    """Read a site's DICOM studies and clinical CSV into arrays.

    The rules (which modality counts as present, which patients are dropped) are in the
    module docstring. Everything is checked before anything is returned, and every problem
    found is reported at once.

    Args:
        dicom_dir: Folder of studies (``<patient_id>/*.dcm`` or ``<patient_id>.dcm``);
            required exactly when ``"image"`` is in ``modalities``.
        clinical_csv: The clinical CSV (always required: the labels live there).
        patient_id_column: Name of the CSV column holding patient ids.
        modalities: The modalities the site holds, a subset of ``("image", "tabular")``.
        tabular_features: Feature column names, in the order wanted (the federation's
            layout); ignored, and not required in the CSV, when the site does not hold the
            tabular modality.
        tasks: Task name -> label column.
        num_classes: Task name -> number of classes (labels are in ``[0, num_classes)``).
        image_spatial_dims: 2 or 3 (see :func:`read_study`).
        image_size: Image size after resizing (see :func:`read_study`).
        image_window: Intensity window (see :func:`read_study`).
        extra_tabular: The federation's extra tabular modalities, name -> feature
            columns (:attr:`blossom_secure.config.ModelLayout.extra_tabular`); those in
            ``modalities`` are read like the tabular modality (present iff all of their
            cells are non-empty), the others are ignored.

    Returns:
        The site's :class:`SiteArrays`.

    Raises:
        DataError: The data cannot be used as declared. Lists every problem found, each
            with the file, the column or patient, and the reason.
        ValueError: The arguments contradict each other or are invalid (unknown modality,
            the tabular modality without features, a DICOM folder without the image
            modality, a task without ``num_classes``, ...).
    """
    _check_site_args(
        dicom_dir=dicom_dir,
        clinical_csv=clinical_csv,
        patient_id_column=patient_id_column,
        modalities=modalities,
        tabular_features=tabular_features,
        tasks=tasks,
        num_classes=num_classes,
        extra_tabular=dict(extra_tabular or {}),
    )
    if clinical_csv is None:  # also checked above; repeated so the type is narrowed
        raise ValueError("clinical_csv is required: the labels live in the clinical CSV")
    has_image = "image" in modalities
    has_tabular = "tabular" in modalities
    if has_image:
        _check_image_args(image_spatial_dims, image_size, image_window)
    features = tuple(tabular_features) if has_tabular else ()
    extras = {m: tuple(cols) for m, cols in (extra_tabular or {}).items() if m in modalities}
    tasks = dict(tasks)
    num_classes = {task: int(num_classes[task]) for task in tasks}

    rows, problems = _read_clinical_csv(
        Path(clinical_csv),
        patient_id_column=patient_id_column,
        tabular_features=features,
        tasks=tasks,
        num_classes=num_classes,
        extra_tabular=extras,
    )

    studies: dict[str, Path] = {}
    if has_image and dicom_dir is not None:
        studies, found = _find_studies(Path(dicom_dir))
        problems.extend(found)

    def is_labelled(pid: str) -> bool:
        return rows is not None and pid in rows and bool(rows[pid].labels)

    images: dict[str, np.ndarray] = {}
    if rows is None:
        studies = {}  # the CSV is unusable: which studies belong to whom is unknown; none is decoded
    for pid, study_path in studies.items():
        if pid not in rows:
            problems.append(
                Problem(str(study_path), f"patient {pid}", "a study for a patient who is not in the clinical CSV")
            )
            continue
        if not is_labelled(pid):
            continue  # dropped for want of a label: not read
        array, study, found = _load_study(
            study_path, spatial_dims=image_spatial_dims, size=image_size, window=image_window
        )
        problems.extend(found)
        if study is not None:
            wrong = [h for h in study.headers if h.patient_id != pid]
            if wrong:
                # the tag's value is patient data from the file: never echoed
                what = "is missing" if wrong[0].patient_id is None else "holds another patient id"
                problems.append(
                    Problem(
                        str(wrong[0].path),
                        "PatientID",
                        f"the PatientID tag {what}: it must equal the study's name {pid!r} "
                        f"({len(wrong)} of {len(study.headers)} files)",
                    )
                )
        if array is not None:
            images[pid] = array

    if problems or rows is None:
        raise DataError(bounded_problems(problems))

    kept: list[str] = []
    dropped_without_label = dropped_without_modality = 0
    for pid in sorted(rows):
        row = rows[pid]
        if not row.labels:
            dropped_without_label += 1
        elif not ((has_image and pid in images) or (has_tabular and row.features is not None)
                  or any(row.extra.get(m) is not None for m in extras)):
            dropped_without_modality += 1
        else:
            kept.append(pid)
    if not kept:
        raise DataError(
            [
                Problem(
                    str(clinical_csv),
                    "",
                    f"no usable patient: {dropped_without_label} without any label, "
                    f"{dropped_without_modality} without any modality",
                )
            ]
        )

    n = len(kept)
    image_present = np.array([pid in images for pid in kept], dtype=bool)
    image_arr: np.ndarray | None = None
    if has_image:
        image_arr = np.zeros((n, 1, *image_size), dtype=np.float32)
        for i, pid in enumerate(kept):
            if pid in images:
                image_arr[i] = images[pid]
    else:
        image_present[:] = False
    tabular_present = np.array([has_tabular and rows[pid].features is not None for pid in kept], dtype=bool)
    tabular_arr: np.ndarray | None = None
    if has_tabular:
        tabular_arr = np.zeros((n, len(features)), dtype=np.float32)
        for i, pid in enumerate(kept):
            values = rows[pid].features
            if values is not None:
                tabular_arr[i] = values
    extra_arr: dict[str, np.ndarray] = {}
    extra_present: dict[str, np.ndarray] = {}
    for m, cols in extras.items():
        extra_present[m] = np.array([rows[pid].extra.get(m) is not None for pid in kept], dtype=bool)
        extra_arr[m] = np.zeros((n, len(cols)), dtype=np.float32)
        for i, pid in enumerate(kept):
            values = rows[pid].extra.get(m)
            if values is not None:
                extra_arr[m][i] = values
    labels = {task: np.array([rows[pid].labels.get(task, -1) for pid in kept], dtype=np.int64) for task in tasks}
    site = SiteArrays(
        patient_ids=tuple(kept),
        image=image_arr,
        image_present=image_present,
        tabular=tabular_arr,
        tabular_present=tabular_present,
        labels=MappingProxyType(labels),
        num_classes=MappingProxyType(num_classes),
        tabular_features=features,
        patients_in_csv=len(rows),
        dropped_without_label=dropped_without_label,
        dropped_without_modality=dropped_without_modality,
        extra_tabular=MappingProxyType(extra_arr),
        extra_tabular_present=MappingProxyType(extra_present),
    )
    logger.info("site data loaded: %s", site.summary())
    return site


def load_site_data(site: SiteConfig, federation: FederationConfig) -> SiteArrays:
    """The site's data as arrays, as its site file and the federation's layout declare:
    what ``blossom-site check`` reads and what the site agent trains on.

    Raises:
        DataError: As :func:`load_site_arrays`.
    """
    layout = federation.layout
    return load_site_arrays(
        dicom_dir=site.dicom_dir if "image" in site.modalities else None,
        clinical_csv=site.clinical_csv,
        patient_id_column=site.patient_id_column,
        modalities=site.modalities,
        tabular_features=layout.tabular.features,
        tasks=site.tasks,
        num_classes={t: layout.tasks[t] for t in site.tasks},
        image_spatial_dims=layout.image.spatial_dims,
        image_size=layout.image.size,
        image_window=layout.image.window,
        extra_tabular={m: layout.extra_tabular[m].features for m in site.modalities if m in layout.extra_tabular},
    )


# --------------------------------------------------------------------------------------
# Held-out split


def split_holdout(patient_ids: Sequence[str], *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split patients into a training part and a held-out part, deterministically.

    Each patient id is hashed with keyed BLAKE2b (the key is derived from ``seed``) to a
    number uniform in [0, 1); the patient is held out iff that number is below
    ``fraction``. So whether a patient trains depends on **its own id only**: adding or
    removing one patient never moves another patient between the parts (a rank-based split
    would, and a neighbouring data set would then differ by two training patients, outside
    what the privacy ledger accounts). The held-out share is ``fraction`` on average, not
    exactly. The split depends only on the ids and the seed: not on their order, the
    machine or the Python process (no ``hash()``).

    Args:
        patient_ids: Distinct patient ids.
        fraction: Share of patients to hold out, in ``(0, 1)``.
        seed: Any non-negative int; different seeds give independent splits.

    Returns:
        ``(train_indices, holdout_indices)``: sorted ``int64`` indices into
        ``patient_ids``, disjoint and together covering every index (either may be
        empty for a handful of patients).

    Raises:
        ValueError: ``fraction`` is not in ``(0, 1)``, ``seed`` is not a non-negative int,
            or the ids are not distinct strings.
    """
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), not {fraction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, not {seed!r}")
    ids = list(patient_ids)
    if not all(isinstance(p, str) for p in ids):
        raise ValueError("patient ids must be strings")
    if len(set(ids)) != len(ids):
        raise ValueError("patient ids must be distinct")
    key = hashlib.sha256(b"blossom_secure/holdout-split/v2\x00" + str(seed).encode("ascii")).digest()
    threshold = math.floor(fraction * 2**64)
    held = [int.from_bytes(hashlib.blake2b(p.encode("utf-8", "surrogatepass"), key=key, digest_size=8).digest(), "big")
            < threshold for p in ids]
    holdout = np.array([i for i, h in enumerate(held) if h], dtype=np.int64)
    train = np.array([i for i, h in enumerate(held) if not h], dtype=np.int64)
    return train, holdout
