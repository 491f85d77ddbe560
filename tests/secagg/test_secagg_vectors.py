"""The library against the JSON vectors, and the vectors against an independent reference."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import secagg_reference as ref

from blossom_secure import crypto
from blossom_secure.secagg import kdf, shamir
from blossom_secure.secagg.masking import apply_masks, expand_mask
from blossom_secure.secagg.params import SecAggParams
from blossom_secure.secagg.quantize import dequantize_sum, quantize_into

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


KDF = load("secagg_kdf.json")
MASKS = load("secagg_masks.json")
QUANTIZE = load("secagg_quantize.json")
SHAMIR = load("secagg_shamir.json")


@pytest.mark.parametrize("case", KDF["rfc5869"], ids=lambda c: c["name"])
def test_hkdf_matches_rfc5869(case: dict) -> None:
    ikm, salt, info = (bytes.fromhex(case[k]) for k in ("ikm", "salt", "info"))
    assert crypto.hkdf_sha256(ikm, salt=salt, info=info, length=case["length"]).hex() == case["okm"]
    assert ref.hkdf_reference(ikm, salt, info, case["length"]).hex() == case["okm"]


@pytest.mark.parametrize("case", KDF["labels"], ids=lambda c: c["purpose"])
def test_kdf_labels_match_vectors_and_reference(case: dict) -> None:
    args = (case["purpose"], case["federation_id"], case["round_id"], case["block"], case["parties"])
    label = kdf.kdf_label(
        purpose=kdf.Purpose(case["purpose"]),
        federation_id=case["federation_id"],
        round_id=case["round_id"],
        block=case["block"],
        parties=case["parties"],
    )
    assert label.hex() == case["label"] == ref.label_reference(*args).hex()
    salt = kdf.round_salt(federation_id=case["federation_id"], round_id=case["round_id"])
    assert salt.hex() == case["salt"] == ref.round_salt_reference(case["federation_id"], case["round_id"]).hex()
    ikm = bytes.fromhex(case["ikm"])
    okm = crypto.hkdf_sha256(ikm, salt=salt, info=label)
    assert okm.hex() == case["okm"] == ref.hkdf_reference(ikm, salt, label, 32).hex()


def test_key_derivations_match_vectors() -> None:
    case = KDF["derivations"]
    secret = bytes.fromhex(case["secret"])
    context = {"federation_id": case["federation_id"], "round_id": case["round_id"]}
    assert (
        kdf.pairwise_mask_key(secret, block=case["block"], sites=tuple(case["sites"]), **context).hex()
        == case["pairwise_mask_key"]
    )
    assert kdf.self_mask_key(secret, block=case["block"], site=case["site"], **context).hex() == case["self_mask_key"]
    assert (
        kdf.share_encryption_key(secret, sender=case["sender"], recipient=case["recipient"], **context).hex()
        == case["share_encryption_key"]
    )
    assert (
        kdf.seed_commitment(secret, block=case["block"], site=case["site"], **context).hex() == case["seed_commitment"]
    )
    digest = bytes.fromhex(case["federation_sha256"])
    assert (
        kdf.share_associated_data(
            federation_sha256=digest, sender=case["sender"], recipient=case["recipient"], **context
        ).hex()
        == case["share_associated_data"]
    )
    assert (
        kdf.consistency_payload(
            federation_sha256=digest, block=case["block"], survivors=tuple(case["survivors"]), **context
        ).hex()
        == case["consistency_payload"]
    )
    assert case["consistency_payload"].endswith(case["federation_sha256"])


def test_labels_differ_for_every_context_field() -> None:
    base = dict(purpose=kdf.Purpose.PAIRWISE_MASK, federation_id="f", round_id=1, block="fusion", parties=("a", "b"))
    variants = [
        {"purpose": kdf.Purpose.SELF_MASK},
        {"federation_id": "g"},
        {"round_id": 2},
        {"block": "encoder.image"},
        {"parties": ("a", "c")},
        {"parties": ("ab",)},
        {"parties": ("a", "b", "")},
    ]
    labels = {kdf.kdf_label(**{**base, **v}) for v in variants} | {kdf.kdf_label(**base)}
    assert len(labels) == len(variants) + 1


@pytest.mark.parametrize("case", MASKS["expansions"], ids=lambda c: f"{c['count']}x{c['ring_bits']}")
def test_mask_expansion_matches_vectors_and_ecb_reference(case: dict) -> None:
    key = bytes.fromhex(case["key"])
    dtype = "<u4" if case["ring_bits"] == 32 else "<u8"
    mask = expand_mask(key, count=case["count"], dtype=dtype)
    assert mask[:8].tolist() == case["head"]
    assert mask[-3:].tolist() == case["tail"]
    assert hashlib.sha256(mask.tobytes()).hexdigest() == case["sha256"]
    reference = ref.mask_reference(key, case["count"], case["ring_bits"])
    assert (
        hashlib.sha256(b"".join(v.to_bytes(case["ring_bits"] // 8, "little") for v in reference)).hexdigest()
        == case["sha256"]
    )


@pytest.mark.parametrize("case", MASKS["combined"])
def test_signed_mask_sum_matches_vectors(case: dict) -> None:
    vector = np.array(case["start"], dtype="<u4")
    apply_masks(vector, [(bytes.fromhex(k), s) for k, s in zip(case["keys"], case["signs"], strict=True)])
    assert vector.tolist() == case["result"]


@pytest.mark.parametrize(
    "case", QUANTIZE["quantize"], ids=lambda c: f"{c['params']['ring_bits']}-{c['params']['clip']}-w{c['weight']}"
)
def test_quantisation_matches_vectors_and_fraction_reference(case: dict) -> None:
    params = SecAggParams(**case["params"])
    assert params.scale_bits == case["resolved_scale_bits"]
    values = [float.fromhex(v) for v in case["values"]]
    out = np.empty(len(values) + 1, dtype=params.ring_dtype)
    quantize_into(np.array(values, dtype=np.float32), weight=case["weight"], params=params, out=out)
    assert out.tolist() == case["ring"]
    reference = ref.quantize_reference(
        values, clip=params.clip, scale_bits=params.scale_bits, weight=case["weight"], ring_bits=params.ring_bits
    )
    assert reference == case["ring"]


@pytest.mark.parametrize("case", QUANTIZE["dequantize"], ids=lambda c: str(c["params"]["ring_bits"]))
def test_dequantisation_matches_vectors_and_reference(case: dict) -> None:
    params = SecAggParams(**case["params"])
    weighted, weight_sum = dequantize_sum(np.array(case["ring"], dtype=params.ring_dtype), params=params)
    assert [v.hex() for v in weighted.tolist()] == case["weighted"]
    assert weight_sum == case["weight_sum"]
    fractions, weight = ref.dequantize_reference(case["ring"], scale_bits=params.scale_bits, ring_bits=params.ring_bits)
    assert [float(f).hex() for f in fractions] == case["weighted"] and weight == case["weight_sum"]


@pytest.mark.parametrize("case", QUANTIZE["invalid_params"], ids=lambda c: c["reason"])
def test_invalid_parameters_refused_with_reason(case: dict) -> None:
    with pytest.raises(ValueError, match=case["reason"]):
        SecAggParams(**case["params"])


@pytest.mark.parametrize("case", SHAMIR["split"], ids=lambda c: f"t{c['threshold']}-n{len(c['xs'])}")
def test_shamir_matches_vectors_and_reference(case: dict) -> None:
    secret = int(case["secret"], 16)
    coefficients = [int(c, 16) for c in case["coefficients"]]
    shares = [shamir.share_from_bytes(bytes.fromhex(s)) for s in case["shares"]]
    assert shamir._split_with_coefficients(secret, coefficients, case["xs"]) == shares
    assert [ref.shamir_eval_reference(secret, coefficients, x) for x in case["xs"]] == shares
    for subset in case["subsets"]:
        ys = [shares[case["xs"].index(x)] for x in subset]
        assert shamir.reconstruct(subset, ys) == secret
        assert ref.shamir_reconstruct_reference(list(zip(subset, ys, strict=True))) == secret
    if case["threshold"] > 1:
        short = case["xs"][: case["threshold"] - 1]
        ys = [shares[case["xs"].index(x)] for x in short]
        assert shamir.reconstruct(short, ys) != secret


def test_vector_files_record_how_they_were_made() -> None:
    for document in (KDF, MASKS, QUANTIZE, SHAMIR):
        assert "make_secagg_vectors.py" in document["how"]
