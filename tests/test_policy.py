"""Policy validation: every error path names file, key and reason; all problems at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from blossom_secure.errors import PolicyError
from blossom_secure.site.policy import load_policy

VALID = """
[policy]
version = 1
federation = "blossom-demo"
coordinators = ["embedded"]

[sharing]
shareable = ["encoder.*", "fusion"]

[privacy]
accountant = "rdp"
delta = 1e-5
max_grad_norm = 1.0
noise_multiplier = 1.0
epsilon_budget = 8.0

[secure_aggregation]
required = true
min_contributors = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, text))
    for p in info.value.problems:
        assert p.file.endswith("policy.toml")
        assert p.reason
    return [(p.key, p.reason) for p in info.value.problems]


def test_valid_policy_loads(tmp_path):
    policy = load_policy(write(tmp_path, VALID))
    assert policy.federation == "blossom-demo"
    assert policy.is_shareable("encoder.image")
    assert policy.is_shareable("encoder.tabular")
    assert policy.is_shareable("fusion")
    assert not policy.is_shareable("head.malignancy")
    assert policy.privacy.noise_multiplier == 1.0
    assert len(policy.sha256) == 64


def test_policy_hash_changes_with_bytes(tmp_path):
    a = load_policy(write(tmp_path, VALID)).sha256
    b = load_policy(write(tmp_path, VALID + "\n# comment\n")).sha256
    assert a != b


def test_default_deny(tmp_path):
    policy = load_policy(write(tmp_path, VALID.replace('["encoder.*", "fusion"]', '["encoder.image"]')))
    assert policy.is_shareable("encoder.image")
    assert not policy.is_shareable("encoder.tabular")
    assert not policy.is_shareable("fusion")


def test_empty_shareable_list_shares_nothing(tmp_path):
    policy = load_policy(write(tmp_path, VALID.replace('["encoder.*", "fusion"]', "[]")))
    assert not any(policy.is_shareable(b) for b in ("encoder.image", "fusion", "head.x"))


@pytest.mark.parametrize("entry", ["head.malignancy", "head.*", "head", "*", "h*", "*.malignancy", "fus*", "[eh]*"])
def test_head_or_head_matching_pattern_is_refused(tmp_path, entry):
    probs = problems_of(tmp_path, VALID.replace('"encoder.*", "fusion"', f'"encoder.*", "{entry}"'))
    assert [k for k, _ in probs] == ["sharing.shareable"]
    assert entry in probs[0][1]


def test_unknown_block_name_is_refused(tmp_path):
    probs = problems_of(tmp_path, VALID.replace('"fusion"', '"Fusion Block"'))
    assert probs[0][0] == "sharing.shareable" and "not a block name" in probs[0][1]


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "nope.toml")
    assert "file not found" in str(info.value)


def test_not_toml(tmp_path):
    probs = problems_of(tmp_path, "[policy\nfederation = ")
    assert "not valid TOML" in probs[0][1]


def test_not_utf8(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_bytes(b"\xff\xfe[policy]")
    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy(path)


def test_too_large(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(VALID + "#" * (1 << 20))
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(path)


def test_unknown_keys_everywhere(tmp_path):
    text = VALID.replace("[sharing]", "colour = 'red'\n[sharing]").replace(
        "[privacy]", "[privacy]\nepsilon = 3") + "\n[extras]\nx = 1\n"
    probs = dict(problems_of(tmp_path, text))
    assert probs == {"policy.colour": "unknown key", "privacy.epsilon": "unknown key", "extras": "unknown key"}


def test_missing_sections_and_fields(tmp_path):
    probs = problems_of(tmp_path, "[policy]\nversion = 1\n")
    keys = {k for k, _ in probs}
    assert {"policy.federation", "policy.coordinators", "sharing", "privacy", "secure_aggregation"} <= keys
    assert all(r == "required key is missing" for _, r in probs)


def test_wrong_types(tmp_path):
    text = (VALID.replace('federation = "blossom-demo"', "federation = 3")
            .replace("delta = 1e-5", 'delta = "small"')
            .replace("required = true", 'required = "yes"')
            .replace("min_contributors = 2", "min_contributors = 2.5")
            .replace('coordinators = ["embedded"]', 'coordinators = "embedded"'))
    probs = dict(problems_of(tmp_path, text))
    assert probs["policy.federation"] == "must be a string, not an integer"
    assert probs["privacy.delta"] == "must be a number, not a string"
    assert probs["secure_aggregation.required"] == "must be a boolean, not a string"
    assert probs["secure_aggregation.min_contributors"] == "must be an integer, not a number"
    assert probs["policy.coordinators"] == "must be a list, not a string"


def test_boolean_is_not_a_number(tmp_path):
    probs = dict(problems_of(tmp_path, VALID.replace("max_grad_norm = 1.0", "max_grad_norm = true")))
    assert probs["privacy.max_grad_norm"] == "must be a number, not a boolean"


@pytest.mark.parametrize(("old", "new", "key", "fragment"), [
    ("delta = 1e-5", "delta = 0.0", "privacy.delta", "greater than 0"),
    ("delta = 1e-5", "delta = 0.5", "privacy.delta", "less than 0.01"),
    ("max_grad_norm = 1.0", "max_grad_norm = -1.0", "privacy.max_grad_norm", "greater than 0"),
    ("noise_multiplier = 1.0", "noise_multiplier = 0", "privacy.noise_multiplier", "greater than 0"),
    ("epsilon_budget = 8.0", "epsilon_budget = -2", "privacy.epsilon_budget", "greater than 0"),
    ("epsilon_budget = 8.0", "epsilon_budget = inf", "privacy.epsilon_budget", "finite"),
    ("min_contributors = 2", "min_contributors = 1", "secure_aggregation.min_contributors", "at least 2"),
    ('accountant = "rdp"', 'accountant = "gdp"', "privacy.accountant", "must be one of rdp, prv"),
    ("version = 1", "version = 7", "policy.version", "unsupported policy version 7"),
    ('coordinators = ["embedded"]', "coordinators = []", "policy.coordinators", "must not be empty"),
    ('federation = "blossom-demo"', 'federation = ""', "policy.federation", "must not be empty"),
    ('shareable = ["encoder.*", "fusion"]', 'shareable = ["fusion", "fusion"]', "sharing.shareable", "twice"),
])
def test_impossible_values(tmp_path, old, new, key, fragment):
    probs = dict(problems_of(tmp_path, VALID.replace(old, new)))
    assert key in probs and fragment in probs[key], probs


def test_noise_and_target_are_exclusive(tmp_path):
    probs = dict(problems_of(tmp_path, VALID.replace("noise_multiplier = 1.0",
                                                     "noise_multiplier = 1.0\ntarget_epsilon_per_round = 1.0")))
    assert "exactly one" in probs["privacy.noise_multiplier"]
    probs = dict(problems_of(tmp_path, VALID.replace("noise_multiplier = 1.0\n", "")))
    assert "exactly one" in probs["privacy.noise_multiplier"]


def test_target_epsilon_mode(tmp_path):
    policy = load_policy(write(tmp_path, VALID.replace("noise_multiplier = 1.0", "target_epsilon_per_round = 1.5")))
    assert policy.privacy.noise_multiplier is None and policy.privacy.target_epsilon_per_round == 1.5


def test_target_over_budget(tmp_path):
    probs = dict(problems_of(tmp_path, VALID.replace("noise_multiplier = 1.0", "target_epsilon_per_round = 9.0")))
    assert "exceeds epsilon_budget" in probs["privacy.target_epsilon_per_round"]


def test_all_problems_reported_together(tmp_path):
    text = (VALID.replace('"fusion"', '"head.x"').replace("delta = 1e-5", "delta = 2.0")
            .replace("min_contributors = 2", "min_contributors = 0") + "\nsurprise = 1\n")
    keys = [k for k, _ in problems_of(tmp_path, text)]
    assert set(keys) == {"sharing.shareable", "privacy.delta", "secure_aggregation.min_contributors",
                         "secure_aggregation.surprise"}


def test_policy_error_message_lists_file_key_reason(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, VALID.replace("delta = 1e-5", "delta = 2.0")))
    text = str(info.value)
    assert "policy.toml: privacy.delta: must be less than 0.01" in text
