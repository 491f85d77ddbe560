"""The bad-input catalogue: every operator mistake found in review, made on a federation
that has already run, ends with its documented exit code (2 for an input mistake, 3 for the
budget; never 70), one clear message and no traceback, and changes nothing: ledgers, audit
logs, keys, blocks and the coordinator's round counter are byte for byte as before, and no
folder was created on the way."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blossom_secure.cli import run
from blossom_secure.cli import blossom as blossom_cli
from blossom_secure.cli import site as site_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ran_once(tmp_path_factory, tiny_sites_with_data):
    """The tiny federation after one secure round (shared; every case works on a copy)."""
    from blossom_secure.runtimes.embedded.federation import simulate

    root = tmp_path_factory.mktemp("ran")
    shutil.copytree(tiny_sites_with_data.parent / "policies", root / "policies")
    shutil.copytree(tiny_sites_with_data, root / "sites")
    simulate(sites_root=root / "sites", rounds=1, out_dir=root / "out", seed=0)
    return root


@pytest.fixture
def fed(tmp_path, ran_once):
    for name in ("policies", "sites", "out"):
        shutil.copytree(ran_once / name, tmp_path / name)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the sites' state and keys and of the coordinator's folder, by digest;
    and every folder under the root (so a folder created on the way shows)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = "dir"
        elif any(part in ("state", "keys", "out") for part in path.relative_to(root).parts):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def in_process(capsys, tool: str, *args: str) -> tuple[int, str, str]:
    main = blossom_cli.main if tool == "blossom" else site_cli.main
    code = run(main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result, code: int, fragment: str) -> str:
    exit_code, out, err = result
    text = " ".join(err.split())
    assert exit_code == code, (exit_code, out, err)
    assert "Traceback" not in out + err and "internal error" not in err
    assert err.startswith("error:") and err.count("error:") == 1, err
    assert fragment in text, text
    return text


def simulate_args(fed: Path, *extra: str) -> list[str]:
    return ["simulate", "--sites", str(fed / "sites"), "--out", str(fed / "out"), "--rounds", "1", *extra]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


# -- the catalogue -------------------------------------------------------------------------------


def test_label_column_that_is_also_a_feature_column(fed, capsys):
    edit(fed / "sites" / "riverside" / "site.toml", 'malignancy = "malignant"', 'malignancy = "age"')
    before = snapshot(fed)
    assert_refused(in_process(capsys, "blossom-site", "check", fed / "sites" / "riverside"), 2,
                   "label column 'age' is also a tabular feature column")
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 2, "label column 'age' is also")
    assert snapshot(fed) == before


def test_html_report_pointing_at_a_folder_or_a_missing_folder(fed, capsys):
    before = snapshot(fed)
    site = fed / "sites" / "st-mary"
    assert_refused(in_process(capsys, "blossom-site", "audit", "review", site, "--html", fed), 2, "is a folder")
    assert_refused(in_process(capsys, "blossom-site", "audit", "review", site, "--html", fed / "nowhere" / "r.html"),
                   2, "does not exist (it is not created)")
    assert not (fed / "nowhere").exists()
    assert snapshot(fed) == before


def test_out_pointing_at_an_existing_file_is_refused_before_any_training(fed, capsys):
    (fed / "a-file").write_text("not a folder")
    before = snapshot(fed)
    args = simulate_args(fed)
    args[args.index("--out") + 1] = str(fed / "a-file")
    assert_refused(in_process(capsys, "blossom", *args), 2, "--out must be a folder")
    assert snapshot(fed) == before


def test_read_only_state_folder_is_refused_before_anything_is_written(fed, capsys, monkeypatch):
    import blossom_secure._fs as fs

    state = fed / "sites" / "riverside" / "state"
    real = fs.tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # EACCES, as a non-root operator gets it (root ignores 0500)
        if Path(kwargs.get("dir", "")) == state:
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(fs.tempfile, "mkstemp", mkstemp)
    os.chmod(state, 0o500)
    try:
        before = snapshot(fed)
        assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 2,
                       "the site's state cannot be written")
        assert snapshot(fed) == before
    finally:
        os.chmod(state, 0o700)


def test_plaintext_run_against_policies_that_require_secure_aggregation(fed, capsys):
    before = snapshot(fed)
    text = assert_refused(in_process(capsys, "blossom", *simulate_args(fed, "--plaintext")), 2,
                          "policy requires secure aggregation")
    assert "run without --plaintext" in text
    assert snapshot(fed) == before


def test_budget_that_stops_every_site_exits_3_before_anything(fed, capsys):
    for policy in (fed / "policies").glob("*.toml"):
        policy.write_text(re.sub(r"epsilon_budget = [0-9.]+", "epsilon_budget = 0.5", policy.read_text()))
    before = snapshot(fed)
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 3, "no site can afford another round")
    assert snapshot(fed) == before


def test_a_spent_budget_is_said_before_any_site_data_is_read(fed, capsys, monkeypatch):
    """With public sampling the plan needs no data: a run no site can afford stops at once,
    before the (slow) DICOM and CSV reading."""
    from blossom_secure.runtimes.embedded import federation as embedded

    for policy in (fed / "policies").glob("*.toml"):
        policy.write_text(re.sub(r"epsilon_budget = [0-9.]+", "epsilon_budget = 0.5", policy.read_text()))
    monkeypatch.setattr(embedded, "load_site_data", lambda *a, **k: pytest.fail("site data read before the budget"))
    monkeypatch.setattr(embedded, "ensure_site_data", lambda *a, **k: pytest.fail("site data made before the budget"))
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 3, "no site can afford another round")


def test_policy_typo_in_a_block_name(fed, capsys):
    edit(fed / "policies" / "standard.toml", '["encoder.*", "fusion"]', '["encoder.imaging", "fusion"]')
    before = snapshot(fed)
    assert_refused(in_process(capsys, "blossom-site", "check", fed / "sites" / "st-mary"), 2,
                   "'encoder.imaging' names no block of federation 'blossom-demo'")
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 2, "did you mean 'encoder.image'?")
    assert snapshot(fed) == before


def test_header_only_csv_is_one_message(fed, capsys):
    csv = fed / "sites" / "st-mary" / "data" / "clinical.csv"
    csv.write_text(csv.read_text().splitlines()[0] + "\n")
    before = snapshot(fed)
    text = assert_refused(in_process(capsys, "blossom-site", "check", fed / "sites" / "st-mary"), 2,
                          "header but no patient rows (header only)")
    assert "1 problem:" in text and "not in the clinical CSV" not in text
    assert snapshot(fed) == before


def test_wrong_csv_separator_is_one_message_that_says_so(fed, capsys):
    csv = fed / "sites" / "riverside" / "data" / "clinical.csv"
    csv.write_text(csv.read_text().replace(",", ":"))
    before = snapshot(fed)
    text = assert_refused(in_process(capsys, "blossom-site", "check", fed / "sites" / "riverside"), 2,
                          "wrong separator: no comma, semicolon, tab, vertical bar separates the header's column names")
    assert "1 problem:" in text and "column missing" not in text
    assert snapshot(fed) == before


def test_truncated_dicom_says_truncated(fed, capsys):
    study = sorted((fed / "sites" / "st-mary" / "data" / "dicom").glob("*/*.dcm"))[0]
    study.write_bytes(study.read_bytes()[:200])
    before = snapshot(fed)
    assert_refused(in_process(capsys, "blossom-site", "check", fed / "sites" / "st-mary"), 2,
                   "truncated: the file ends after 200 bytes")
    assert snapshot(fed) == before


def test_two_sites_with_the_same_id(fed, capsys):
    shutil.copytree(fed / "sites" / "riverside", fed / "sites" / "riverside-copy",
                    ignore=shutil.ignore_patterns("state", "keys"))
    before = snapshot(fed)
    text = assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 2, "'riverside' is also the id of")
    assert "riverside-copy" in text and "ledger belongs to" not in text
    assert snapshot(fed) == before


def test_patient_id_mismatch_never_echoes_the_tag(fed, capsys):
    import pydicom

    study = sorted((fed / "sites" / "st-mary" / "data" / "dicom").glob("*/*.dcm"))[0]
    ds = pydicom.dcmread(study)
    ds.PatientID = "SECRET-TAG-4711"
    ds.save_as(study)
    before = snapshot(fed)
    exit_code, out, err = in_process(capsys, "blossom-site", "check", fed / "sites" / "st-mary")
    assert_refused((exit_code, out, err), 2, "the PatientID tag holds another patient id")
    assert "SECRET-TAG-4711" not in out + err
    assert snapshot(fed) == before


def test_min_contributors_beyond_the_protocol_limit(fed, capsys):
    edit(fed / "policies" / "standard.toml", "min_contributors = 2", "min_contributors = 70000")
    before = snapshot(fed)
    assert_refused(in_process(capsys, "blossom-site", "check", fed / "sites" / "st-mary"), 2,
                   "secure_aggregation.min_contributors")
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 2, "min_contributors")
    assert snapshot(fed) == before


def test_min_contributors_no_group_can_meet_is_a_warning_in_check(fed, capsys):
    edit(fed / "policies" / "standard.toml", "min_contributors = 2", "min_contributors = 9")
    code, out, _ = in_process(capsys, "blossom-site", "check", fed / "sites" / "st-mary")
    assert code == 0 and "warning: no shared block can ever leave" in " ".join(out.split())


def test_coordinator_that_names_nothing_real(fed, capsys):
    edit(fed / "sites" / "federation.toml", 'coordinator = "embedded"', 'coordinator = "nowhere"')
    before = snapshot(fed)
    code, out, _ = in_process(capsys, "blossom-site", "check", fed / "sites" / "st-mary")
    assert code == 0 and "warning: the site would decline every round: coordinator 'nowhere'" in " ".join(out.split())
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 2, "would decline every round")
    assert snapshot(fed) == before


def test_counter_of_another_federation_and_bad_numbers(fed, capsys):
    before_counter = (fed / "out" / "coordinator-state.json").read_text()
    (fed / "out" / "coordinator-state.json").write_text('{"format": 1, "federation": "other", "next_round": 3}\n')
    before = snapshot(fed)
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 2, "for federation 'other'")
    assert snapshot(fed) == before
    (fed / "out" / "coordinator-state.json").write_text(before_counter)
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)[:-2], "--rounds", "0"), 2, "at least 1")
    assert_refused(in_process(capsys, "blossom-site", "audit", "review", fed / "sites" / "st-mary", "--round", "99"),
                   2, "no record for round 99")


def test_a_private_key_given_as_the_public_key(fed, capsys):
    site = fed / "sites" / "st-mary"
    before = snapshot(fed)
    assert_refused(in_process(capsys, "blossom-site", "audit", "verify", site / "state" / "audit.jsonl",
                              "--public-key", site / "keys" / "identity.pem"), 2, "this is a PRIVATE key")
    assert_refused(in_process(capsys, "blossom-site", "audit", "verify", site / "state" / "audit.jsonl"), 2,
                   "needs a key")
    assert snapshot(fed) == before


def test_missing_policy_file(fed, capsys):
    (fed / "policies" / "conservative.toml").unlink()
    before = snapshot(fed)
    assert_refused(in_process(capsys, "blossom", *simulate_args(fed)), 2, "conservative.toml")
    assert snapshot(fed) == before


def test_undecodable_study_prints_no_dependency_traceback(fed):
    """pydicom's decoders log each failed attempt with a traceback before raising: the
    operator sees one line per problem and no traceback (a real process, real logging)."""
    import pydicom
    from pydicom.data import get_testdata_file

    study = sorted((fed / "sites" / "st-mary" / "data" / "dicom").glob("*/*.dcm"))[0]
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    data = bytearray(ds.PixelData)
    data[40:-20] = bytes(len(data) - 60)  # the JPEG stream garbled, its encapsulation kept
    ds.PixelData = bytes(data)
    ds.PatientID = study.parent.name
    ds.save_as(study)
    before = snapshot(fed)
    env = {k: v for k, v in os.environ.items() if k != "BLOSSOM_DEBUG"}
    proc = subprocess.run([str(Path(sys.executable).parent / "blossom-site"), "check", str(fed / "sites" / "st-mary")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error:") and "pixel data could not be decoded" in " ".join(proc.stderr.split())
    assert snapshot(fed) == before
