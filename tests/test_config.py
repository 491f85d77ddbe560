"""Federation and site files: every problem reported, with file, key and reason."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from blossom_secure.config import load_federation

from blossom_secure.site.config import load_site, site_dirs
from blossom_secure.errors import PolicyError

ROOT = Path(__file__).resolve().parents[1]
DEMO_GROUPS = {"encoder.image": ("lakeside", "northgate", "st-mary"),
               "encoder.tabular": ("lakeside", "riverside", "st-mary"),
               "fusion": ("northgate", "riverside", "st-mary")}


def without_tables(text: str, *names: str) -> str:
    """``text`` without the ``[aggregation.<name>]`` tables (header and entries)."""
    for name in names:
        text = re.sub(rf"^\[aggregation\.{name}\]\n(?:(?!\[)[^\n]+\n)*", "", text, flags=re.M)
    return text


@pytest.fixture
def sites(tmp_path) -> Path:
    shutil.copytree(ROOT / "sites", tmp_path / "sites", ignore=shutil.ignore_patterns("data", "keys", "state"))
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    return tmp_path / "sites"


def test_example_federation_and_sites_are_valid(sites):
    fed = load_federation(sites / "federation.toml")
    loaded = [load_site(d, federation=fed) for d in site_dirs(sites)]
    assert len(loaded) >= 4
    kinds = {s.modalities for s in loaded}
    assert {("image",), ("tabular",), ("image", "tabular")} <= kinds
    assert len({t for s in loaded for t in s.tasks}) >= 2
    for s in loaded:
        assert not any(s.policy.is_shareable(b) for b in s.blocks if b.startswith("head."))


def test_site_file_problems_reported_together(sites):
    path = sites / "st-mary" / "site.toml"
    text = path.read_text().replace('modalities = ["image", "tabular"]', 'modalities = ["image", "genome"]')
    text = text.replace('malignancy = "malignant"', 'malignancy = "malignant"\nunknown_task = "x"')
    text = text.replace("patients = 600", "patients = 1") + "\n[extra]\n"
    path.write_text(text)
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(PolicyError) as info:
        load_site(sites / "st-mary", federation=fed)
    found = {(p.key, p.reason.split(" (")[0]) for p in info.value.problems}
    assert ("data.modalities", "unknown modality 'genome'") in found
    assert any(k == "tasks.unknown_task" and "not a task of federation" in r for k, r in found)
    assert ("synth.patients", "must be at least 2, not 1") in found
    assert ("extra", "unknown key") in found
    assert all(p.file.endswith("site.toml") for p in info.value.problems)


def test_policy_problems_surface_through_site(sites):
    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace('"fusion"', '"head.malignancy"'))
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(PolicyError) as info:
        load_site(sites / "st-mary", federation=fed)
    assert any(p.file.endswith("standard.toml") and "task heads never leave" in p.reason for p in info.value.problems)


def test_policy_for_other_federation_refused(sites):
    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace('federation = "blossom-demo"', 'federation = "elsewhere"'))
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(PolicyError, match="allows federation 'elsewhere'"):
        load_site(sites / "st-mary", federation=fed)


def test_missing_site_folder_and_file(tmp_path):
    with pytest.raises(PolicyError, match="site folder not found"):
        load_site(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match="file not found"):
        load_site(tmp_path / "empty")


def test_federation_problems(sites):
    path = sites / "federation.toml"
    text = (path.read_text().replace('id = "blossom-demo"', 'id = "Blossom Demo!"')
            .replace("size = [32, 32]", "size = [32]").replace("severity = 3", "severity = 1")
            .replace("ring_bits = 32", "ring_bits = 48").replace("channels = [4, 8, 8]", "channels = [6, 16]"))
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    keys = {p.key for p in info.value.problems}
    assert {"federation.id", "model.image.size", "model.tasks.severity", "aggregation.ring_bits",
            "model.image.channels"} <= keys


def test_example_federation_declares_public_secure_aggregation_terms(sites):
    """max_sites and the Shamir threshold are in the file (whose hash every protocol
    message carries), never taken from what the coordinator shows of a round."""
    import hashlib

    path = sites / "federation.toml"
    fed = load_federation(path)
    assert fed.aggregation.max_sites == 4 and fed.aggregation.threshold == 3
    assert dict(fed.aggregation.groups) == DEMO_GROUPS
    assert dict(fed.aggregation.thresholds) == {"encoder.image": 2, "encoder.tabular": 2, "fusion": 2}
    assert fed.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    text = without_tables(path.read_text(), "groups", "thresholds")
    path.write_text(text + '\n[aggregation.thresholds]\n"fusion" = 4\n"encoder.image" = 3\n')
    fed = load_federation(path)
    assert dict(fed.aggregation.thresholds) == {"encoder.image": 3, "fusion": 4}
    assert dict(fed.aggregation.groups) == {}


@pytest.mark.parametrize(("edit", "key", "reason"), [
    (("threshold = 3", "threshold = 2"), "aggregation.threshold", "more than half of max_sites"),
    (("threshold = 3", "threshold = 5"), "aggregation.threshold", "must not exceed max_sites"),
    (("threshold = 3", "threshold = 1"), "aggregation.threshold", "at least 2"),
    (("threshold = 3", 'threshold = "3"'), "aggregation.threshold", "must be an integer"),
    (("min_contributors = 2", "min_contributors = 4"), "aggregation.threshold", "at least min_contributors"),
    (("min_contributors = 2", "min_contributors = 5"), "aggregation.min_contributors", "must not exceed max_sites"),
    (("max_sites = 4 ", "max_sites = 1 "), "aggregation.max_sites", "at least 2"),
    (("max_sites = 4 ", "max_sites = 6 "), "aggregation.threshold", "more than half of max_sites"),
    (("max_sites = 4 ", "#"), "aggregation.threshold", "needs max_sites"),
])
def test_secure_aggregation_terms_refused_with_file_key_and_reason(sites, edit, key, reason):
    path = sites / "federation.toml"
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    found = [p for p in info.value.problems if p.key == key]
    assert found and reason in found[0].reason and found[0].file == str(path), info.value.problems


@pytest.mark.parametrize(("entry", "key", "reason"), [
    ('"fusion" = 2', "aggregation.thresholds.fusion", "more than half of max_sites"),
    ('"fusion" = 9', "aggregation.thresholds.fusion", "must not exceed max_sites"),
    ('"head.malignancy" = 3', "aggregation.thresholds.head.malignancy", "not a shared block"),
    ('"encoder.genome" = 3', "aggregation.thresholds.encoder.genome", "not a shared block"),
])
def test_per_block_thresholds_refused_with_file_key_and_reason(sites, entry, key, reason):
    """Blocks without a declared group: checked against max_sites."""
    path = sites / "federation.toml"
    path.write_text(without_tables(path.read_text(), "groups", "thresholds")
                    + f"\n[aggregation.thresholds]\n{entry}\n")
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    found = [p for p in info.value.problems if p.key == key]
    assert found and reason in found[0].reason, info.value.problems


def test_federation_without_secure_aggregation_terms_still_loads(sites):
    """Older files (no max_sites, no threshold) load: the roster's size stands in for
    max_sites and the default threshold floor(2 n / 3) + 1 applies (secagg_params)."""
    path = sites / "federation.toml"
    text = "\n".join(line for line in without_tables(path.read_text(), "groups", "thresholds").splitlines()
                     if not line.startswith(("max_sites", "threshold")))
    path.write_text(text)
    fed = load_federation(path)
    assert fed.aggregation.max_sites is None and fed.aggregation.threshold is None
    assert dict(fed.aggregation.groups) == {}


# -- public block groups ([aggregation.groups]) --------------------------------------------


def _with_groups(path: Path, groups: str, thresholds: str = "", *, replace: tuple[str, str] = ("", ""),
                 ten_sites: bool = False) -> None:
    text = without_tables(path.read_text(), "groups", "thresholds").replace(*replace)
    if ten_sites:
        text = text.replace("max_sites = 4 ", "max_sites = 10 ").replace("threshold = 3", "# default threshold")
    text += f"\n[aggregation.groups]\n{groups}\n"
    if thresholds:
        text += f"\n[aggregation.thresholds]\n{thresholds}\n"
    path.write_text(text)


def test_group_lets_a_block_held_by_half_the_sites_have_a_threshold_below_a_majority_of_max_sites(sites):
    """10 sites, encoder.image held by 5 of them: against max_sites t would have to be at
    least 6 > 5 holders; against the declared group, 3 (2 * 3 > 5) is accepted and the
    default is floor(2 * 5 / 3) + 1 = 4."""
    from blossom_secure.secagg.terms import secagg_params

    path = sites / "federation.toml"
    five = '"encoder.image" = ["s0", "s1", "s2", "s3", "s4"]'
    _with_groups(path, five, '"encoder.image" = 3', ten_sites=True)
    fed = load_federation(path)
    assert dict(fed.aggregation.groups) == {"encoder.image": ("s0", "s1", "s2", "s3", "s4")}
    params = secagg_params(fed, roster_size=10)
    assert params.block_threshold("encoder.image") == 3 and params.block_threshold("fusion") == 7
    _with_groups(path, five, ten_sites=True)
    params = secagg_params(load_federation(path), roster_size=10)
    assert params.block_threshold("encoder.image") == 4
    assert params.block_group("encoder.image") == ("s0", "s1", "s2", "s3", "s4")
    assert params.block_group("fusion") is None
    # Without the group, the same threshold is refused (a majority of max_sites is needed).
    path.write_text(without_tables(path.read_text(), "groups") + '\n[aggregation.thresholds]\n"encoder.image" = 3\n')
    with pytest.raises(PolicyError, match="more than half of max_sites"):
        load_federation(path)


def test_demo_group_thresholds_follow_the_group_rule(sites):
    from blossom_secure.secagg.terms import secagg_params

    path = sites / "federation.toml"
    params = secagg_params(load_federation(path), roster_size=4)
    for block, members in DEMO_GROUPS.items():
        assert params.block_group(block) == members and params.block_threshold(block) == 2
        assert 2 * params.block_threshold(block) > len(members)
    # Without the per-block thresholds, the default for a group of 3 is 3.
    path.write_text(without_tables(path.read_text(), "thresholds"))
    params = secagg_params(load_federation(path), roster_size=4)
    assert all(params.block_threshold(block) == 3 for block in DEMO_GROUPS)


@pytest.mark.parametrize(("groups", "key", "reason"), [
    ('"head.malignancy" = ["st-mary", "lakeside"]', "aggregation.groups.head.malignancy", "not a shared block"),
    ('"encoder.genome" = ["st-mary", "lakeside"]', "aggregation.groups.encoder.genome", "not a shared block"),
    ('"fusion" = ["st-mary", "st-mary", "lakeside"]', "aggregation.groups.fusion", "same value twice"),
    ('"fusion" = ["st-mary"]', "aggregation.groups.fusion", "at least 2 sites"),
    ('"fusion" = []', "aggregation.groups.fusion", "must not be empty"),
    ('"fusion" = ["a", "b", "c", "d", "e"]', "aggregation.groups.fusion", "more than max_sites (4)"),
    ('"fusion" = ["St Mary", "lakeside"]', "aggregation.groups.fusion", "not a list of site ids"),
    ('"fusion" = "st-mary"', "aggregation.groups.fusion", "must be a list"),
    ('"fusion" = ["st-mary", 3]', "aggregation.groups.fusion", "list of non-empty strings"),
])
def test_bad_groups_refused_with_file_key_and_reason(sites, groups, key, reason):
    path = sites / "federation.toml"
    _with_groups(path, groups)
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    found = [p for p in info.value.problems if p.key == key]
    assert found and reason in found[0].reason and found[0].file == str(path), info.value.problems


def test_groups_need_max_sites(sites):
    path = sites / "federation.toml"
    path.write_text(path.read_text().replace("max_sites = 4 ", "#", 1).replace("threshold = 3", "#", 1))
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    keys = {p.key: p.reason for p in info.value.problems}
    assert all("needs max_sites" in keys[f"aggregation.groups.{block}"] for block in DEMO_GROUPS)


@pytest.mark.parametrize(("thresholds", "replace", "key", "reason"), [
    # A group of 3: t = 1 is below the file's floor, 4 exceeds the group.
    ('"fusion" = 1', ("", ""), "aggregation.thresholds.fusion", "at least 2"),
    ('"fusion" = 4', ("", ""), "aggregation.thresholds.fusion", "must not exceed the 3 sites of its group"),
    # min_contributors 3 with t = 2 for a group of 3.
    ('"fusion" = 2', ("min_contributors = 2", "min_contributors = 3"), "aggregation.thresholds.fusion",
     "at least min_contributors (3)"),
])
def test_group_thresholds_refused_with_file_key_and_reason(sites, thresholds, replace, key, reason):
    path = sites / "federation.toml"
    _with_groups(path, '"fusion" = ["st-mary", "northgate", "riverside"]', thresholds, replace=replace)
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    found = [p for p in info.value.problems if p.key == key]
    assert found and reason in found[0].reason and found[0].file == str(path), info.value.problems


def test_group_threshold_at_half_of_its_group_refused(sites):
    """A group of 4 with t = 2: two disjoint pairs of members could each pass the
    consistency check."""
    path = sites / "federation.toml"
    _with_groups(path, '"fusion" = ["st-mary", "northgate", "riverside", "lakeside"]', '"fusion" = 2')
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    found = [p for p in info.value.problems if p.key == "aggregation.thresholds.fusion"]
    assert found and "more than half of the 4 sites of its group (4), at least 3" in found[0].reason


def test_refused_group_gets_no_second_problem_for_its_threshold(sites):
    path = sites / "federation.toml"
    _with_groups(path, '"fusion" = ["st-mary", "st-mary", "northgate"]', '"fusion" = 2')
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    assert [p.key for p in info.value.problems] == ["aggregation.groups.fusion"]


# -- the policy's block names and the site's columns, against the federation file ------------


def test_policy_typo_in_a_block_name_is_refused_naming_the_federations_blocks(sites):
    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace('["encoder.*", "fusion"]', '["encoder.imaging", "encoder.tabluar"]'))
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(PolicyError) as info:
        load_site(sites / "st-mary", federation=fed)
    reasons = {p.reason for p in info.value.problems if p.key == "sharing.shareable"}
    assert any(r.startswith("'encoder.imaging' names no block of federation 'blossom-demo'")
               and "did you mean 'encoder.image'?" in r for r in reasons)
    assert any("'encoder.tabluar'" in r and "did you mean 'encoder.tabular'?" in r for r in reasons)
    assert load_site(sites / "st-mary").policy.shareable == ("encoder.imaging", "encoder.tabluar")  # no federation: not checked


def test_block_valid_for_the_federation_but_not_held_by_the_site_is_accepted(sites):
    """A policy shared by sites with different modalities names blocks some of them lack."""
    fed = load_federation(sites / "federation.toml")
    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace('["encoder.*", "fusion"]', '["encoder.image", "fusion"]'))
    riverside = load_site(sites / "riverside", federation=fed)  # tabular only
    assert not riverside.policy.is_shareable("encoder.tabular")


def test_wildcard_that_matches_no_block_is_a_warning(sites):
    from blossom_secure.site.config import shareable_pattern_warnings

    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace('["encoder.*", "fusion"]', '["encoder.genom*", "fusion"]'))
    fed = load_federation(sites / "federation.toml")
    site = load_site(sites / "st-mary", federation=fed)
    (warning,) = shareable_pattern_warnings(site.policy, fed)
    assert "'encoder.genom*' matches no block of federation 'blossom-demo'" in warning


@pytest.mark.parametrize("column,fragment", [
    ("age", "label column 'age' is also a tabular feature column of the federation"),
    ("patient_id", "label column 'patient_id' is the patient id column"),
])
def test_label_column_that_is_a_model_input_or_the_id_is_refused(sites, column, fragment):
    path = sites / "st-mary" / "site.toml"
    path.write_text(path.read_text().replace('malignancy = "malignant"', f'malignancy = "{column}"'))
    fed = load_federation(sites / "federation.toml")
    with pytest.raises(PolicyError) as info:
        load_site(sites / "st-mary", federation=fed)
    assert [(p.key, fragment in p.reason) for p in info.value.problems] == [("tasks.malignancy", True)]


def test_min_contributors_beyond_the_protocol_limit_is_refused(sites):
    policy = sites.parent / "policies" / "standard.toml"
    policy.write_text(policy.read_text().replace("min_contributors = 2", "min_contributors = 70000"))
    with pytest.raises(PolicyError, match="secure_aggregation.min_contributors: must be at most 65535, not 70000"):
        load_site(sites / "st-mary")


# -- [training] max_physical_batch_size (memory only) --------------------------------------------


def _with_physical(path: Path, value: str) -> None:
    """Uncomment the example federation's ``max_physical_batch_size`` line with ``value``."""
    text = path.read_text()
    assert "# max_physical_batch_size = 8\n" in text
    path.write_text(text.replace("# max_physical_batch_size = 8\n", f"max_physical_batch_size = {value}\n"))


def test_example_federation_leaves_max_physical_batch_size_unset(sites):
    assert load_federation(sites / "federation.toml").training.max_physical_batch_size is None


@pytest.mark.parametrize("value", ["8", "1", "4096"])
def test_max_physical_batch_size_is_read_from_the_training_table(sites, value):
    """Any positive integer, larger than batch_size too (such a value never splits a batch)."""
    path = sites / "federation.toml"
    _with_physical(path, value)
    assert load_federation(path).training.max_physical_batch_size == int(value)


@pytest.mark.parametrize(("value", "reason"), [
    ("0", "must be at least 1, not 0"),
    ("-1", "must be at least 1, not -1"),
    ("true", "must be an integer"),
    ("2.5", "must be an integer"),
    ('"8"', "must be an integer"),
])
def test_max_physical_batch_size_that_is_not_a_positive_integer_is_one_problem(sites, value, reason):
    path = sites / "federation.toml"
    _with_physical(path, value)
    with pytest.raises(PolicyError) as info:
        load_federation(path)
    (problem,) = info.value.problems
    assert problem.key == "training.max_physical_batch_size" and problem.file == str(path)
    assert reason in problem.reason, problem
