"""The experiment pages rendered from real reports (a SQLite store): well-formed HTML, the figures of the
table, one error bar per defined rate, the SRM banner, escaping and missing figures."""

from __future__ import annotations

from html import escape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from deskgen.experiments.page import MISSING, render_experiment_list_page, render_report_page
from deskgen.experiments.records import Experiment, Exposure, Feedback
from deskgen.experiments.report import build_report
from deskgen.experiments.store import ExperimentStore

pytestmark = pytest.mark.unit

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Balance(HTMLParser):
    """Parses a page and checks every element it opens is closed, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()

    def count(self, tag: str, **attrs: str) -> int:
        return sum(1 for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items()))


def parse(page: str) -> Balance:
    parser = Balance()
    parser.feed(page)
    parser.close()
    assert page.startswith("<!DOCTYPE html>") and not parser.errors and not parser.open
    assert parser.count("html", lang="en") == 1 and parser.count("meta", name="viewport") == 1
    assert (
        parser.count("svg") <= 1
        and parser.count("script") == 0
        and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )  # self-contained: no external asset
    return parser


def report(
    tmp_path: Path, split: dict[str, float], users: dict[str, int], salt: str = "s1"
) -> dict[str, Any]:
    """A real report: ``users[arm]`` users in each arm with 1..4 images, likes and downloads that differ by arm."""
    experiment = Experiment(split=split, salt=salt, mixes={arm: {"dalle": 0.7} for arm in split})
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'e.db'}")
    store.ensure_experiment(experiment)
    exposures, feedback = [], []
    for a, (arm, n_users) in enumerate(users.items()):
        for u in range(n_users):
            user = f"{a}-u{u}"
            for i in range(1 + u % 4):
                image = f"{user}-i{i}"
                exposures.append(Exposure(image, experiment.id, user, arm, arm, "ab", "ok", 200,
                                          timings={"total_s": 0.5 + 0.1 * i}))  # fmt: skip
                if (u + i) % (2 + a) == 0:
                    feedback.append(Feedback(image, "like", user_id=user))
                if i == 0 and u % 2 == 0:
                    feedback.append(Feedback(image, "download", user_id=user))
        if n_users:
            exposures.append(
                Exposure(f"{arm}-timeout", experiment.id, f"{a}-u0", arm, arm, "ab", "timeout", 504)
            )
    store.record_exposures(exposures)
    for fb in feedback:
        store.record_feedback(fb)
    built = build_report(store, experiment.id)
    assert built is not None
    return built.public()


def test_a_report_page_shows_each_arm_its_rates_and_one_error_bar_per_rate(tmp_path: Path) -> None:
    body = report(tmp_path, {"dalle_ott": 0.5, "ott_3d": 0.5}, {"dalle_ott": 12, "ott_3d": 12})
    page = render_report_page(body)
    parsed = parse(page)
    assert parsed.count("svg") == 1 and parsed.count("title") >= 1 + 8
    assert (
        body["experiment_id"] in page and "dalle_ott 50 % · ott_3d 50 %" in page and "<code>s1</code>" in page
    )
    for arm in body["arms"]:
        like = arm["rates"]["like"]
        assert f"{arm['arm']} (control)" in page if arm["arm"] == "dalle_ott" else arm["arm"] in page
        assert f"users {arm['users']}, exposures {arm['exposures']}" in page
        assert f'{like["rate"] * 100:.1f} % <span class="ci">[{like["ci_low"] * 100:.1f} %, ' in page
        for event, rate in arm["rates"].items():
            assert parsed.count("g", **{"class": "errbar", "data-arm": arm["arm"], "data-event": event}) == (
                rate["rate"] is not None
            )
    diff = body["arms"][1]["vs_control"]["like"]
    p = (
        f"{diff['p_value']:.3f}" if diff["p_value"] >= 0.001 else f"{diff['p_value']:.1e}"
    )  # small ones: 1.2e-05
    assert f'{diff["estimate"] * 100:+.1f} pp <span class="ci">[{diff["ci_low"] * 100:+.1f} pp, ' in page
    assert f"</span></td><td>{p}</td></tr>" in page
    g = body["arms"][0]["guardrails"]
    assert f"{g['p95_total_s']:.2f} s" in page and f"{g['error_rate'] * 100:.1f} %" in page
    assert parsed.count("g", **{"class": "errbar"}) == 8
    assert "SRM alarm" not in page and 'role="alert"' not in page
    assert f"Sample ratio: p = {body['sample_ratio']['p_value']:.3f}" in page


def test_a_sample_ratio_mismatch_raises_the_alarm(tmp_path: Path) -> None:
    body = report(tmp_path, {"a": 0.5, "b": 0.5}, {"a": 90, "b": 10})
    assert body["sample_ratio"]["alarm"]
    page = render_report_page(body)
    parse(page)
    assert '<div class="banner alarm" role="alert"><strong>SRM alarm</strong>' in page
    assert "a 90 (expected 50.0), b 10 (expected 50.0)" in page


def test_names_from_the_configuration_are_escaped(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    body = report(tmp_path, {"ok": 0.5, evil: 0.5}, {"ok": 5, evil: 5}, salt='"><b>salt</b>')
    page = render_report_page(body)
    parsed = parse(page)
    assert evil not in page and "<b>" not in page and escape(evil) in page
    assert parsed.count("script") == 0 and parsed.count("b") == 0
    assert parsed.count("g", **{"class": "errbar", "data-arm": evil}) == 4  # the parser unescapes attributes


def test_missing_figures_show_as_a_dash_and_stay_out_of_the_chart(tmp_path: Path) -> None:
    # "once" has one user (a rate, and an interval: Korn-Graubard needs no second user); "never" none (no rate,
    # no guardrails).
    split = {"a": 0.48, "b": 0.48, "once": 0.02, "never": 0.02}
    body = report(tmp_path, split, {"a": 12, "b": 12, "once": 1, "never": 0})
    never = body["arms"][3]
    assert never["rates"]["like"]["rate"] is None and never["guardrails"]["p50_total_s"] is None
    once = body["arms"][2]["rates"]["like"]
    assert once["rate"] is not None and once["se"] is None and 0 <= once["ci_low"] < once["ci_high"] <= 1
    page = render_report_page(body)
    parsed = parse(page)
    assert parsed.count("g", **{"class": "errbar", "data-arm": "never"}) == 0
    assert parsed.count("g", **{"class": "errbar", "data-arm": "once"}) == 4
    assert parsed.count("g", **{"class": "errbar"}) == 3 * 4
    assert f'<td>{MISSING} <span class="ci">{MISSING}</span></td>' in page  # "never": no rate, no interval
    assert f'<th scope="row">never</th><td>0</td><td>{MISSING}</td><td>{MISSING}</td>' in page  # guardrails
    assert "nan" not in page.lower()


def test_the_list_page_links_each_experiment_to_its_report() -> None:
    experiments = [
        {
            "id": "exp-0123456789ab",
            "split": {"a": 0.7, "b": 0.3},
            "salt": "v1",
            "created_at": "2025-01-02T03:04:05+00:00",
        },
        {"id": "exp-<i>", "split": {"a": 1.0}, "salt": "<v2>", "created_at": "2025-02-01T00:00:00+00:00"},
    ]
    page = render_experiment_list_page(experiments)
    parsed = parse(page)
    assert parsed.count("a", href="/v1/experiments/exp-0123456789ab") == 1
    assert parsed.count("a", href="/v1/experiments/exp-%3Ci%3E") == 1 and parsed.count("i") == 0
    assert "a 70 % · b 30 %" in page and "2025-01-02T03:04:05+00:00" in page and "&lt;v2&gt;" in page
    assert "No experiment yet." in render_experiment_list_page([])


def test_the_page_states_the_decision_and_which_figures_may_be_read_when(tmp_path: Path) -> None:
    body = report(tmp_path, {"dalle_ott": 0.5, "ott_3d": 0.5}, {"dalle_ott": 12, "ott_3d": 12})
    page = render_report_page(body)
    parsed = parse(page)
    verdict = body["decision"]["verdict"]
    assert parsed.count("div", **{"class": "banner decision", "data-verdict": verdict}) == 1
    assert "always valid" in page and "fixed horizon" in page
    assert "Read the <em>always valid</em> columns at any time" in page
    seq = body["arms"][1]["vs_control_sequential"]["like"]
    assert f'{seq["estimate"] * 100:+.1f} pp <span class="ci">[{seq["ci_low"] * 100:+.1f} pp, ' in page
    assert "Allocation: fixed" in page
    # A concluded experiment shows the config change to apply.
    concluded = dict(body, decision=dict(body["decision"], verdict="winner", winner="ott_3d", effect=0.1,
                                         ci_low=0.02, ci_high=0.18),
                     promotion={"yaml": "default_mix: ott_3d\nab_split: {}\n", "apply": "serve deploy serve_config.yaml"})
    shown = render_report_page(concluded)
    assert "Winner: <strong>ott_3d</strong>, +10.0 pp [+2.0 pp, +18.0 pp]" in shown
    assert '<pre class="promotion">default_mix: ott_3d\nab_split: {}\n</pre>' in shown
