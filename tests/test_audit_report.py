"""Audit review: per-round and per-block summaries, rich tables that never obey markup from
the log, and a self-contained HTML page whose plots are valid inline PNGs and whose log
strings are escaped."""

from __future__ import annotations

import base64
import io
import re
import stat
from pathlib import Path

import pytest
from rich.console import Console

from blossom_secure import crypto
from blossom_secure.audit.log import AuditLog, read_verified_records
from blossom_secure.audit.report import PROTOCOL_BYTES, review_table, summarise, write_html
from blossom_secure.errors import AuditIntegrityError

KEY = crypto.generate_identity_key()
PUBLIC_KEY = crypto.identity_public_key(KEY)
SITE = "st-mary"
POLICY = "ab" * 32
NEW_POLICY = "ef" * 32
MALICIOUS = '<script>alert("x")</script> [bold red]styled[/] \x1b[2J\u202egnp.exe'
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def training(epsilon_round: float, epsilon_total: float) -> dict:
    return {
        "steps": 100,
        "epsilon_round": epsilon_round,
        "epsilon_total": epsilon_total,
        "delta": 1e-5,
        "noise_multiplier": 1.2,
        "sample_rate": 0.01,
    }


def egress(message_type: str, shapes: dict, payload_bytes: int, digest: str, **extra) -> dict:
    return {
        "message_type": message_type,
        "blocks": list(shapes),
        "shapes": shapes,
        "payload_bytes": payload_bytes,
        "payload_sha256": digest,
        **extra,
    }


EVENTS = [
    ("site_initialised", None, {"key_fingerprint": crypto.key_fingerprint(PUBLIC_KEY)}, None),
    ("policy_loaded", None, {"policy_sha256": POLICY, "shareable": ["encoder.*", "fusion"]}, POLICY),
    ("round_joined", 1, {}, POLICY),
    ("training_finished", 1, training(0.5, 0.5), POLICY),
    ("egress", 1, egress("advertise_keys", {}, 300, "01" * 32), POLICY),
    ("egress", 1, egress("masked_input", {"encoder.image": [10, 3], "fusion": [10]}, 4000, "02" * 32), POLICY),
    ("secagg_stage_completed", 1, {"stage": "unmask"}, POLICY),
    ("round_declined", 2, {"reason": MALICIOUS}, POLICY),
    ("policy_loaded", None, {"policy_sha256": NEW_POLICY, "shareable": ["fusion"]}, NEW_POLICY),
    ("round_joined", 3, {}, NEW_POLICY),
    ("training_finished", 3, training(0.75, 1.25), NEW_POLICY),
    (
        "egress",
        3,
        egress("masked_input", {"fusion": [10], "encoder.tabular": [5]}, 1000, "03" * 32, block_bytes={"fusion": 700}),
        NEW_POLICY,
    ),
    ("egress", 3, egress("masked_input", {"fusion": [10]}, 500, "04" * 32), NEW_POLICY),
    ("secagg_aborted", 3, {"stage": "unmask", "reason": "too few survivors"}, NEW_POLICY),
    ("error", None, {"message": MALICIOUS, "error_type": "ProtocolError"}, NEW_POLICY),
    ("egress", None, egress("hello", {}, 64, "05" * 32), NEW_POLICY),
]


def make_records(tmp_path: Path, events=EVENTS) -> list[dict]:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, site_id=SITE, signing_key=KEY) as log:
        for i, (event, round_id, details, policy) in enumerate(events):
            log._append_at_time(
                f"2026-03-01T{12 + i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000000Z", event, round_id=round_id,
                details=details, policy_sha256=policy
            )
    _, records = read_verified_records(path, public_key=PUBLIC_KEY)
    return records


@pytest.fixture
def review(tmp_path):
    return summarise(make_records(tmp_path))


def test_summarise_per_round(review):
    assert review.site_id == SITE
    assert review.records == len(EVENTS)
    assert review.key_fingerprints == (crypto.key_fingerprint(PUBLIC_KEY),)
    assert [p.policy_sha256 for p in review.policies] == [POLICY, NEW_POLICY]
    assert [r.round_id for r in review.rounds] == [1, 2, 3]
    one, two, three = review.rounds
    assert (one.status, two.status, three.status) == ("joined", "declined", "joined, aborted")
    assert two.decline_reasons == (MALICIOUS,)
    assert one.training.epsilon_round == 0.5 and three.training.epsilon_total == 1.25
    assert three.training.delta == 1e-5
    assert review.epsilon_total == 1.25
    assert [m.payload_sha256 for m in one.egress] == ["01" * 32, "02" * 32]
    assert one.egress[1].shapes == {"encoder.image": (10, 3), "fusion": (10,)}
    assert one.stages_completed == ("unmask",)
    assert [i.kind for i in three.incidents] == ["secagg_aborted"]
    assert [i.kind for i in review.incidents] == ["secagg_aborted", "error"]
    assert one.policy_sha256s == (POLICY,) and three.policy_sha256s == (NEW_POLICY,)
    assert [m.message_type for m in review.unrounded_egress] == ["hello"]


def test_bytes_per_block_add_up(review):
    one, _, three = review.rounds
    advertise, masked = one.egress
    assert advertise.block_bytes == {PROTOCOL_BYTES: 300} and not advertise.estimated
    # Split 4000 bytes by element count 30 : 10.
    assert masked.estimated and masked.block_bytes == {"encoder.image": 3000, "fusion": 1000}
    recorded, single = three.egress
    assert not recorded.estimated
    assert recorded.block_bytes == {"fusion": 700, "encoder.tabular": 0, PROTOCOL_BYTES: 300}
    assert single.block_bytes == {"fusion": 500}
    assert one.payload_bytes == 4300 and three.payload_bytes == 1500
    totals = {t.block: t for t in review.block_totals}
    assert totals["fusion"].payload_bytes == 1000 + 700 + 500
    assert totals["fusion"].rounds == (1, 3) and totals["fusion"].messages == 3
    assert totals["encoder.image"].estimated and not totals[PROTOCOL_BYTES].estimated
    assert totals[PROTOCOL_BYTES].payload_bytes == 300 + 300 + 64
    assert review.payload_bytes == 4300 + 1500 + 64
    assert review.block_totals[-1].block == PROTOCOL_BYTES


def test_uneven_split_is_exact(tmp_path):
    events = [
        ("egress", 1, egress("m", {"fusion": [1], "encoder.image": [1], "encoder.tabular": [1]}, 10, "00" * 32), POLICY)
    ]
    message = summarise(make_records(tmp_path, events)).rounds[0].egress[0]
    assert sum(message.block_bytes.values()) == 10
    assert sorted(message.block_bytes.values()) == [3, 3, 4]


def test_heads_that_left_the_site_are_flagged(tmp_path):
    events = [("egress", 1, egress("masked_input", {"head.malignancy": [2, 8]}, 64, "00" * 32), POLICY)]
    review = summarise(make_records(tmp_path, events))
    assert [m.seq for m in review.heads_sent] == [0]
    assert "seq 0: head.malignancy" in html_page(review, tmp_path)


def test_summarise_empty_log():
    review = summarise([])
    assert review.rounds == () and review.records == 0 and review.epsilon_total is None


def test_summarise_rejects_malformed_records(tmp_path):
    records = make_records(tmp_path)
    bad = dict(records[4])
    bad["details"] = {**bad["details"], "payload_bytes": "lots"}
    with pytest.raises(AuditIntegrityError) as info:
        summarise(records[:4] + [bad])
    assert (info.value.line, info.value.seq) == (5, 4)
    other_site = dict(records[1], site_id="st-john")
    with pytest.raises(AuditIntegrityError, match="differs"):
        summarise(records[:1] + [other_site])
    with pytest.raises(AuditIntegrityError):
        summarise(["not a record"])


def render(table) -> str:
    console = Console(record=True, width=400, force_terminal=True, color_system="truecolor")
    console.print(table)
    return console.export_text(styles=False)


def test_review_table_all_rounds(review):
    rounds, messages, blocks = review_table(review)
    assert (rounds.row_count, messages.row_count, blocks.row_count) == (3, 5, 4)
    text = render(rounds)
    assert "declined" in text and "too few survivors" in text
    assert "1.25" in render(rounds)
    assert "02" * 32 in render(messages)
    assert "~" in render(blocks)


def test_review_table_one_round(review):
    rounds, messages, blocks = review_table(review, round_id=3)
    assert (rounds.row_count, messages.row_count) == (1, 2)
    assert {row.strip() for row in render(blocks).splitlines() if "fusion" in row}
    with pytest.raises(ValueError, match="round 99"):
        review_table(review, round_id=99)


def test_review_table_does_not_obey_markup_or_escapes_from_the_log(review):
    console = Console(record=True, width=400, force_terminal=True, color_system="truecolor")
    for table in review_table(review):
        console.print(table)
    plain = console.export_text(styles=False)
    assert "[bold red]styled[/]" in plain  # shown literally, not applied
    assert "\x1b[2J" not in console.export_text(styles=True)
    assert "\\u001b[2J" in plain and "\\u202e" in plain
    assert "\u202e" not in plain


def html_page(review, tmp_path: Path, **kwargs) -> str:
    path = tmp_path / "report.html"
    write_html(review, path, site_id=SITE, epsilon_budget=kwargs.get("epsilon_budget", 2.0))
    return path.read_text(encoding="utf-8")


def test_html_report_has_three_valid_png_plots(review, tmp_path):
    from matplotlib import image

    page = html_page(review, tmp_path)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    for data in images:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG_SIGNATURE)
        pixels = image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    for title in ("Privacy spent over rounds", "Bytes out per block per round", "Rounds joined and declined"):
        assert title in page


def test_html_report_is_self_contained(review, tmp_path):
    page = html_page(review, tmp_path)
    lowered = page.lower()
    assert "<script" not in lowered
    assert "<link" not in lowered and "href=" not in lowered
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<style>" in page
    assert "default-src 'none'" in page


def test_html_report_escapes_log_strings(review, tmp_path):
    page = html_page(review, tmp_path)
    assert '<script>alert("x")</script>' not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "\x1b" not in page and "\u202e" not in page
    assert "\\u202egnp.exe" in page


def test_html_report_contains_the_tables(review, tmp_path):
    page = html_page(review, tmp_path)
    for digest in ("01" * 32, "02" * 32, "03" * 32, "04" * 32, "05" * 32):
        assert digest in page
    assert POLICY in page and NEW_POLICY in page
    assert "encoder.image [10, 3], fusion [10]" in page
    assert "too few survivors" in page


def test_html_report_for_an_empty_log_still_has_three_plots(tmp_path):
    page = html_page(summarise([]), tmp_path, epsilon_budget=None)
    assert page.count("data:image/png;base64,") == 3


def test_write_html_is_atomic_and_private(review, tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old")
    write_html(review, path, site_id=SITE, epsilon_budget=None)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.head.json", "audit.jsonl", "report.html"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_html_rejects_misuse(review, tmp_path):
    with pytest.raises(ValueError, match="st-john"):
        write_html(review, tmp_path / "r.html", site_id="st-john", epsilon_budget=1.0)
    for budget in (0.0, -1.0, float("nan"), float("inf"), True, "8"):
        with pytest.raises(ValueError):
            write_html(review, tmp_path / "r.html", site_id=SITE, epsilon_budget=budget)
    assert not (tmp_path / "r.html").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OSError):
        write_html(review, tmp_path / "a-file" / "r.html", site_id=SITE, epsilon_budget=None)


def test_ledger_rebuild_is_reviewed_as_an_incident(tmp_path):
    rebuilt = {
        "rounds": 2, "rounds_proven": 2, "rounds_kept": 0, "epsilon_total": 1.25, "delta": 1e-5,
        "accountant": "rdp", "ledger_sha256": "ef" * 32, "previous_ledger": "missing",
    }
    records = make_records(tmp_path, EVENTS + [("ledger_rebuilt", None, rebuilt, NEW_POLICY)])
    review = summarise(records)
    (incident,) = [i for i in review.incidents if i.kind == "ledger_rebuilt"]
    assert incident.round_id is None and incident.seq == len(EVENTS)
    assert "2 rounds" in incident.text and "1.25" in incident.text and "previous ledger missing" in incident.text
    Console(file=io.StringIO()).print(*review_table(review))
    page = tmp_path / "review.html"
    write_html(review, page, site_id=SITE, epsilon_budget=8.0)
    assert "ledger_rebuilt" in page.read_text() and "previous ledger missing" in page.read_text()


# -- round identity, the ledger beside the log, what was verified --------------------------

REUSED = [
    ("site_initialised", None, {"key_fingerprint": crypto.key_fingerprint(PUBLIC_KEY)}, None),
    ("policy_loaded", None, {"policy_sha256": POLICY, "shareable": ["encoder.*"]}, POLICY),
    ("round_joined", 0, {}, POLICY),
    ("training_finished", 0, training(3.91, 3.91), POLICY),
    ("round_joined", 1, {}, POLICY),
    ("training_finished", 1, training(1.5, 5.41), POLICY),
    # a second run of an old version numbered its rounds from 0 again
    ("round_joined", 0, {}, POLICY),
    ("training_finished", 0, training(1.2, 6.61), POLICY),
    ("round_declined", 1, {"reason": "privacy budget exceeded"}, POLICY),
]


def test_reused_round_numbers_are_never_merged_into_one_row(tmp_path):
    """A log written before round numbers were kept across runs: round 0 of the second run
    is its own row (not "joined and declined", not a zig-zag of totals), and the total is
    the last one the log recorded."""
    review = summarise(make_records(tmp_path, REUSED))
    assert [(r.round_id, r.occurrence, r.status) for r in review.rounds] == [
        (0, 1, "joined"), (1, 1, "joined"), (0, 2, "joined"), (1, 2, "declined")]
    assert [r.label for r in review.rounds] == ["0", "1", "0 (reused #2)", "1 (reused #2)"]
    assert review.epsilon_total == 6.61
    totals = [r.training.epsilon_total for r in review.rounds if r.training]
    assert totals == sorted(totals)  # log order: the spend only grows
    assert len(review.rounds_numbered(0)) == 2
    out = io.StringIO()
    Console(file=out, width=200).print(*review_table(review))
    assert "joined and declined" not in out.getvalue() and "0 (reused #2)" in out.getvalue()
    page = tmp_path / "r.html"
    write_html(review, page, site_id=SITE, epsilon_budget=8.0)
    assert "answered more than once" in page.read_text()


def test_html_legend_counts_equal_the_summary(tmp_path):
    review = summarise(make_records(tmp_path, REUSED))
    page = html_page(review, tmp_path, epsilon_budget=8.0)
    assert "<dt>Rounds joined / declined</dt><dd>3 / 1</dd>" in page


def ledger_view(*rounds) -> "LedgerView":
    from blossom_secure.audit.report import LedgerRound, LedgerView

    items = tuple(LedgerRound(round_id=r, epsilon_total=e) for r, e in rounds)
    return LedgerView(path="state/ledger.json", rounds=items, epsilon_spent=items[-1].epsilon_total)


def test_interrupted_round_shows_the_ledgers_reserved_spend(tmp_path):
    """Training interrupted after the spend was reserved: the log has no training record for
    the round, the ledger counts it; the review shows the ledger's number beside the log's,
    never a total below the ledger."""
    from blossom_secure.audit.report import epsilon_summary, ledger_only_rounds

    events = EVENTS[:4] + [
        ("round_joined", 2, {}, POLICY),
        ("error", 2, {"message": "interrupted (KeyboardInterrupt) during the round",
                      "error_type": "KeyboardInterrupt"}, POLICY),
    ]
    review = summarise(make_records(tmp_path, events))
    ledger = ledger_view((1, 0.5), (2, 0.9))
    assert [r.round_id for r in ledger_only_rounds(review, ledger)] == [2]
    assert review.round(2).status == "joined, error"
    out = io.StringIO()
    Console(file=out, width=250).print(*review_table(review, ledger=ledger))
    assert "0.900 (reserved in the ledger; no training record)" in out.getvalue()
    text = epsilon_summary(review, ledger, 8.0)
    assert text.startswith("0.900 of the budget 8") and "proves 0.500" in text and "round(s) 2" in text
    page = tmp_path / "r.html"
    write_html(review, page, site_id=SITE, epsilon_budget=8.0, ledger=ledger)
    assert "0.900 of the budget 8" in page.read_text()


def test_ledger_that_agrees_with_the_log_is_said_to(tmp_path):
    from blossom_secure.audit.report import epsilon_summary

    review = summarise(make_records(tmp_path))
    text = epsilon_summary(review, ledger_view((1, 0.5), (3, 1.25)), 8.0)
    assert text.startswith("1.250 of the budget 8") and text.endswith("the signed audit log proves the same")


def test_html_states_what_was_verified_with_which_key_and_when(review, tmp_path):
    from blossom_secure.audit.report import Verification

    fingerprint = crypto.key_fingerprint(PUBLIC_KEY)
    verification = Verification(key_fingerprint=fingerprint, key_source="roster roster.toml (site st-mary)",
                                verified_at="2026-03-02T09:00:00Z", records=len(EVENTS),
                                last_seq=len(EVENTS) - 1, last_hash="ab" * 32, pinned=True)
    path = tmp_path / "r.html"
    write_html(review, path, site_id=SITE, epsilon_budget=2.0, verification=verification)
    page = path.read_text()
    assert "VERIFIED at 2026-03-02T09:00:00Z" in page and fingerprint in page
    assert "roster roster.toml (site st-mary)" in page and "matched the fingerprint" in page
    assert "does not check" not in page and "NOT VERIFIED" not in page
    unverified = html_page(review, tmp_path)
    assert "NOT VERIFIED" in unverified


@pytest.mark.parametrize("key_from, says, never", [
    ("roster", "the roster's entry for the site", "recorded out of band (the federation roster"),
    ("key-file", "site folder's own key file", "the roster's entry"),
    ("public-key", "recorded out of band (the federation roster", "own key file"),
])
def test_html_says_what_the_key_is_checked_against_by_where_it_came_from(review, tmp_path, key_from, says, never):
    """A key taken from the roster is not checked against the roster again (a circular
    check); a key taken from the site's own folder is said to be no independent check."""
    from blossom_secure.audit.report import Verification

    verification = Verification(key_fingerprint=crypto.key_fingerprint(PUBLIC_KEY), key_source="somewhere",
                                verified_at="2026-03-02T09:00:00Z", records=len(EVENTS), last_seq=len(EVENTS) - 1,
                                last_hash="ab" * 32, key_from=key_from)
    path = tmp_path / "r.html"
    write_html(review, path, site_id=SITE, epsilon_budget=2.0, verification=verification)
    import html

    page = " ".join(html.unescape(path.read_text()).split())
    assert says in page and never not in page


def test_terminal_review_of_a_long_log_shows_the_last_messages_and_says_so(review):
    tables = review_table(review, max_messages=2)
    assert "the last 2 of 5" in str(tables[1].title)
    assert tables[1].row_count == 2 and tables[2].row_count == len(review.block_totals)


@pytest.mark.parametrize("rounds", [3, 12, 120], ids=["few_rounds", "a_dozen", "many_rounds"])
def test_plots_are_readable_no_legend_over_the_data_no_clipped_title(tmp_path, rounds):
    """What a reviewer must be able to read: every legend lies outside the plotting area
    (it covered the first bar), and every title, legend and axis label lies inside the
    image (none clipped). Measured on the rendered figure, in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from blossom_secure.audit.report import bytes_figure, epsilon_figure, participation_figure

    events = list(EVENTS[:2])
    for r in range(rounds):
        if r % 4 == 3:
            events.append(("round_declined", r, {"reason": "privacy budget exceeded"}, POLICY))
            continue
        events += [("round_joined", r, {}, POLICY), ("training_finished", r, training(0.3, 0.3 * (r + 1)), POLICY),
                   ("egress", r, egress("secagg.masked_input", {"encoder.image": [100], "fusion": [10]}, 600,
                                        "02" * 32, block_bytes={"encoder.image": 404, "fusion": 44}), POLICY)]
    review = summarise(make_records(tmp_path, events))
    for figure in (epsilon_figure(review, 50.0), bytes_figure(review), participation_figure(review)):
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        renderer = canvas.get_renderer()
        whole = figure.bbox
        (axes,) = figure.axes
        plot_area = axes.get_window_extent(renderer)
        legends = figure.legends + ([axes.get_legend()] if axes.get_legend() else [])
        assert legends, "every plot has a legend"
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not box.overlaps(plot_area), "the legend covers the data"
            assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and whole.y0 <= box.y0 and box.y1 <= whole.y1
        for text in (axes.title, axes.xaxis.label):
            box = text.get_window_extent(renderer)
            assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and whole.y0 <= box.y0 and box.y1 <= whole.y1, text
