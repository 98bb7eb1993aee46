"""The experiments as HTML pages: the list of experiments, and one experiment's report (the plain data of
:meth:`~deskgen.experiments.report.ExperimentReport.public`) as a self-contained page — inline CSS, an
inline SVG chart of each event's rate per arm with its confidence interval, no script, no external asset,
readable at phone width. Every string from the configuration (ids, arm names, salts) is escaped; a figure
the report lacks (``None``, a NaN in the JSON) shows as "—" and is left out of the chart."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from deskgen_client.rules import FEEDBACK_EVENTS

#: What a missing figure shows.
MISSING = "—"
#: One colour per arm in the split's order (Okabe–Ito: told apart with the common colour-vision deficiencies).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#000000", "#f0e442")

_CSS = """
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1f24;background:#fff}
main{max-width:60rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;overflow-wrap:anywhere}h2{font-size:1.15rem;margin-top:2rem}
.meta{color:#57606a;overflow-wrap:anywhere}
.banner{padding:.75rem 1rem;border:1px solid #d0d7de;border-radius:6px;background:#f6f8fa}
.banner.alarm{background:#ffebe9;border-color:#cf222e;color:#82071e;font-weight:600}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.25rem 0}
th,td{padding:.35rem .6rem;border-bottom:1px solid #d0d7de;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
.ci{color:#57606a;font-size:.85em}
.swatch{display:inline-block;width:.75em;height:.75em;border-radius:50%;margin-right:.4em}
figure{margin:1rem 0}figcaption{color:#57606a;font-size:.9em}
svg{width:100%;max-width:44rem;height:auto;font:12px system-ui,sans-serif}svg text{fill:#1b1f24}
svg .grid{stroke:#d0d7de}svg .event{font-weight:600}
pre{overflow-x:auto;background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:.5rem .75rem}
"""


def _num(value: Any) -> float | None:
    """A finite number, or ``None`` (JSON null, NaN, absent)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _pct(value: Any) -> str:
    v = _num(value)
    return MISSING if v is None else f"{v * 100:.1f} %"


def _pp(value: Any) -> str:
    """A difference of rates in percentage points, signed."""
    v = _num(value)
    return MISSING if v is None else f"{v * 100:+.1f} pp"


def _seconds(value: Any) -> str:
    v = _num(value)
    return MISSING if v is None else f"{v:.2f} s"


def _p(value: Any) -> str:
    v = _num(value)
    return MISSING if v is None else f"{v:.3f}" if v >= 0.001 else f"{v:.1e}"


def _interval(low: Any, high: Any, fmt: Callable[[Any], str]) -> str:
    if _num(low) is None and _num(high) is None:
        return MISSING
    return f"[{fmt(low)}, {fmt(high)}]"


def _shares(split: Mapping[str, Any]) -> str:
    """``arm 70 % · arm 30 %``: the split's shares, normalised."""
    total = sum(v for v in map(_num, split.values()) if v is not None)
    return " · ".join(
        f"{escape(str(arm))} {MISSING if (s := _num(share)) is None or not total else f'{s / total * 100:.3g} %'}"
        for arm, share in split.items()
    )


def _events(arms: Sequence[Mapping[str, Any]]) -> list[str]:
    """The events of the report, the known ones in their usual order first."""
    names = dict.fromkeys(name for arm in arms for name in (arm.get("rates") or {}))
    order = {name: i for i, name in enumerate(FEEDBACK_EVENTS)}
    return sorted(names, key=lambda name: order.get(name, len(order)))


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")  # fmt: skip


def _table(caption: str, head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of already escaped cells; each row's first cell is its header."""
    th = "".join(f'<th scope="col">{h}</th>' for h in head)
    body = "".join(
        f'<tr><th scope="row">{row[0]}</th>{"".join(f"<td>{c}</td>" for c in row[1:])}</tr>\n' for row in rows
    )
    return f'<div class="scroll"><table>\n<caption>{caption}</caption>\n<thead><tr>{th}</tr></thead>\n<tbody>\n{body}</tbody></table></div>'


def _axis(top: float) -> tuple[float, int]:
    """A round upper end of the rate axis at or above ``top`` and its number of intervals."""
    if top <= 0.0:
        return 1.0, 5
    magnitude = 10.0 ** math.floor(math.log10(top))
    for mantissa, intervals in ((1.0, 5), (2.0, 4), (2.5, 5), (5.0, 5), (10.0, 5)):
        if mantissa * magnitude >= top * (1 - 1e-12):
            return mantissa * magnitude, intervals
    return 10.0 * magnitude, 5  # pragma: no cover - the loop ends at 10 x magnitude >= top


def _chart(arms: Sequence[Mapping[str, Any]], events: Sequence[str], colours: Mapping[str, str]) -> str:
    """Per event, one row per arm: a point at its rate and a horizontal bar over its confidence interval."""
    width, left, right, row, head, gap = 520, 130, 60, 18, 22, 10
    values = [v for a in arms for r in (a.get("rates") or {}).values() if r
              for v in (_num(r.get("rate")), _num(r.get("ci_high"))) if v is not None]  # fmt: skip
    top, intervals = _axis(max(values, default=0.0))
    plot = width - left - right

    def x(v: float) -> float:
        return left + plot * min(max(v, 0.0), top) / top

    parts: list[str] = []
    lx, ly = left, 16  # the legend, wrapped at the chart's width
    for arm in arms:
        name = str(arm.get("arm"))
        w = 24 + 7 * len(name)
        if lx + w > width and lx > left:
            lx, ly = left, ly + 18
        parts.append(f'<g class="legend"><circle cx="{lx + 5}" cy="{ly - 4}" r="5" fill="{colours[name]}"/>'
                     f'<text x="{lx + 14}" y="{ly}">{escape(name)}</text></g>')  # fmt: skip
        lx += w
    y = ly + 16
    axis_top, grid_at = y, len(parts)
    for event in events:
        parts.append(f'<text class="event" x="4" y="{y + 14}">{escape(event)}</text>')
        y += head
        for arm in arms:
            name = str(arm.get("arm"))
            label = name if len(name) <= 16 else name[:15] + "…"
            cy = y + row / 2
            parts.append(f'<text x="14" y="{cy + 4}">{escape(label)}<title>{escape(name)}</title></text>')
            r = (arm.get("rates") or {}).get(event) or {}
            rate, low, high = _num(r.get("rate")), _num(r.get("ci_low")), _num(r.get("ci_high"))
            if rate is None:
                parts.append(f'<text x="{left + 4}" y="{cy + 4}">{MISSING}</text>')
            else:
                c = colours[name]
                tip = f"{name}, {event}: {_pct(rate)}, 95 % CI {_interval(low, high, _pct)}"
                bar = ""
                if low is not None and high is not None:
                    x0, x1 = x(low), x(high)
                    bar = (f'<line x1="{x0:.1f}" y1="{cy}" x2="{x1:.1f}" y2="{cy}" stroke="{c}" stroke-width="2"/>'
                           f'<line x1="{x0:.1f}" y1="{cy - 4}" x2="{x0:.1f}" y2="{cy + 4}" stroke="{c}" stroke-width="2"/>'
                           f'<line x1="{x1:.1f}" y1="{cy - 4}" x2="{x1:.1f}" y2="{cy + 4}" stroke="{c}" stroke-width="2"/>')  # fmt: skip
                end = max(x(rate), x(high) if high is not None else 0.0)
                parts.append(f'<g class="errbar" data-arm="{escape(name)}" data-event="{escape(event)}">'
                             f"<title>{escape(tip)}</title>{bar}"
                             f'<circle cx="{x(rate):.1f}" cy="{cy}" r="4" fill="{c}"/>'
                             f'<text x="{end + 6:.1f}" y="{cy + 4}">{escape(_pct(rate))}</text></g>')  # fmt: skip
            y += row
        y += gap
    parts[grid_at:grid_at] = [  # under the points
        f'<line class="grid" x1="{x(v):.1f}" y1="{axis_top}" x2="{x(v):.1f}" y2="{y}"/>'
        f'<text x="{x(v):.1f}" y="{y + 14}" text-anchor="middle">{v * 100:.3g} %</text>'
        for v in (top * i / intervals for i in range(intervals + 1))
    ]
    height = y + 22
    return (f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="chart-title" '
            f'xmlns="http://www.w3.org/2000/svg">\n<title id="chart-title">Rate per exposure of each event, '
            f"per arm, with 95 % confidence intervals</title>\n"
            + "\n".join(parts) + "\n</svg>")  # fmt: skip


def render_report_page(report: Mapping[str, Any]) -> str:
    """The report of one experiment (``ExperimentReport.public()``) as a complete HTML5 page."""
    experiment_id = str(report.get("experiment_id"))
    split: Mapping[str, Any] = report.get("split") or {}
    arms: list[Mapping[str, Any]] = list(report.get("arms") or [])
    control = str(report.get("control"))
    events = _events(arms)
    colours = {str(a.get("arm")): PALETTE[i % len(PALETTE)] for i, a in enumerate(arms)}
    srm: Mapping[str, Any] = report.get("sample_ratio") or {}
    observed: Mapping[str, Any] = srm.get("observed") or {}
    expected: Mapping[str, Any] = srm.get("expected") or {}
    counts = ", ".join(
        f"{escape(arm)} {observed.get(arm, MISSING)} (expected {MISSING if (e := _num(expected.get(arm))) is None else f'{e:.1f}'})"
        for arm in split
    )
    if srm.get("alarm"):
        banner = (f'<div class="banner alarm" role="alert"><strong>SRM alarm</strong>: the users per arm do not match '
                  f"the split (p = {_p(srm.get('p_value'))} &lt; 0.001): {counts}. The arms are not comparable "
                  f"until the assignment is fixed.</div>")  # fmt: skip
    else:
        banner = f'<div class="banner">Sample ratio: p = {_p(srm.get("p_value"))}; users: {counts}.</div>'
    sections: list[str] = []
    for arm in arms:
        name = str(arm.get("arm"))
        rates: Mapping[str, Any] = arm.get("rates") or {}
        diffs: Mapping[str, Any] | None = arm.get("vs_control")
        always: Mapping[str, Any] = arm.get("vs_control_sequential") or {}
        rows = []
        for event in events:
            r, d, a = rates.get(event) or {}, (diffs or {}).get(event) or {}, always.get(event) or {}
            rate = f'{_pct(r.get("rate"))} <span class="ci">{_interval(r.get("ci_low"), r.get("ci_high"), _pct)}</span>'
            if diffs is None:
                rows.append((escape(event), rate, "control", MISSING, "control", MISSING))
                continue
            rows.append((
                escape(event), rate,
                f'{_pp(a.get("estimate"))} <span class="ci">{_interval(a.get("ci_low"), a.get("ci_high"), _pp)}</span>',
                _p(a.get("p_value")),
                f'{_pp(d.get("estimate"))} <span class="ci">{_interval(d.get("ci_low"), d.get("ci_high"), _pp)}</span>',
                _p(d.get("p_value")),
            ))  # fmt: skip
        role = " (control)" if name == control else ""
        caption = (f'<span class="swatch" style="background:{colours[name]}"></span>{escape(name)}{role} — '
                   f"users {arm.get('users', MISSING)}, exposures {arm.get('exposures', MISSING)}, "
                   f"P(best) {_pct(arm.get('p_best'))}, share of new users {_pct(arm.get('weight'))}")  # fmt: skip
        sections.append(_table(caption, ("Event", "Rate (95 % CI)", "Δ vs control, always valid", "p, always valid",
                                         "Δ vs control, fixed horizon (95 % CI)", "p, fixed horizon"), rows))  # fmt: skip
    guard = [
        (escape(str(a.get("arm"))), str((g := a.get("guardrails") or {}).get("requests", MISSING)),
         _seconds(g.get("p50_total_s")), _seconds(g.get("p95_total_s")),
         _pct(g.get("error_rate")), _pct(g.get("gate_rejection_rate")),
         f'{_pct(g.get("mean_found_fraction"))} <span class="ci">of {g.get("located_images", 0)} images</span>')
        for a in arms
    ]  # fmt: skip
    by_concept = [
        (escape(str(a.get("arm"))), escape(str(name)), str(c.get("exposures", MISSING)),
         *(_pct((c.get("rates") or {}).get(event)) for event in events), _pct(c.get("mean_found_fraction")))
        for a in arms
        for name, c in (a.get("by_concept") or {}).items()
    ]  # fmt: skip
    body = "\n".join([
        f"<h1>Experiment {escape(experiment_id)}</h1>",
        f'<p class="meta">Split: {_shares(split)}<br>Salt: <code>{escape(str(report.get("salt")))}</code><br>'
        f"Control: {escape(control)}</p>",
        banner,
        _decision(report.get("decision") or {}, report.get("promotion")),
        "<h2>Event rates per arm</h2>",
        _reading(report.get("methods") or {}),
        *sections,
        "<h2>Chart</h2>",
        f"<figure>{_chart(arms, events, colours)}<figcaption>Rate per exposure, users as the unit; bars: 95 % "
        f"confidence intervals.</figcaption></figure>",
        "<h2>Allocation</h2>",
        _allocation(report.get("allocation") or {}, [str(a.get("arm")) for a in arms]),
        "<h2>Guardrails</h2>",
        _table("Latency of delivered images, errors and gate rejections over all requests; the share of the "
               "products asked for that the locator found in delivered images",
               ("Arm", "Requests", "p50 total", "p95 total", "Error rate", "Gate rejections", "Products found"), guard),
        "<h2>By concept</h2>",
        _table("Delivered images per arm and concept preset: events per image and products found",
               ("Arm", "Concept", "Images", *events, "Products found"), by_concept)
        if by_concept else "<p>No delivered image yet.</p>",
    ])  # fmt: skip
    return _page(f"Experiment {experiment_id}", body)


VERDICTS = {"winner": "Winner", "no_difference": "No difference larger than the MDE", "keep_running": "Keep running"}


def _decision(decision: Mapping[str, Any], promotion: Mapping[str, Any] | None) -> str:
    """The decision on the primary metric in one banner, and the config change that acts on it."""
    if not decision:
        return ""
    verdict = str(decision.get("verdict"))
    head = escape(VERDICTS.get(verdict, verdict))
    if verdict == "winner":
        head += (f": <strong>{escape(str(decision.get('winner')))}</strong>, "
                 f"{_pp(decision.get('effect'))} {_interval(decision.get('ci_low'), decision.get('ci_high'), _pp)}")  # fmt: skip
    elif verdict == "keep_running" and decision.get("users_needed") is not None:
        head += f": at most about {escape(str(decision.get('users_needed')))} more users"
    policy = (f"Primary metric {escape(str(decision.get('metric')))} rate, alpha {escape(str(decision.get('alpha')))}, "
              f"minimum detectable effect {_pp(decision.get('mde'))}.")  # fmt: skip
    parts = [f'<div class="banner decision" data-verdict="{escape(verdict)}"><strong>Decision</strong> — {head}.<br>'
             f'{escape(str(decision.get("reason", "")))} <span class="ci">{policy}</span></div>']  # fmt: skip
    if promotion:
        parts.append(f"<p>To act on it, change <code>serve_config.yaml</code> and run "
                     f"<code>{escape(str(promotion.get('apply')))}</code>:</p>"
                     f'<pre class="promotion">{escape(str(promotion.get("yaml")))}</pre>')  # fmt: skip
    return "\n".join(parts)


def _reading(methods: Mapping[str, Any]) -> str:
    """Which figures may be read when."""
    if not methods:
        return ""
    items = "".join(f"<li><strong>{escape(str(k))}</strong>: {escape(str(v))}</li>" for k, v in methods.items())
    return (f'<p class="reading">Read the <em>always valid</em> columns at any time, as often as you like; the '
            f"<em>fixed horizon</em> columns only once, at a number of users chosen in advance.</p><ul>{items}</ul>")


def _allocation(allocation: Mapping[str, Any], arms: Sequence[str]) -> str:
    """The allocation policy and the weights over time (one row per stored epoch, the latest 30)."""
    history: list[Mapping[str, Any]] = list(allocation.get("history") or [])
    head = (f'<p class="meta">Allocation: {escape(str(allocation.get("policy", "fixed")))}, phase '
            f'{escape(str(allocation.get("phase", MISSING)))}; share of new users now: '
            f'{_shares(allocation.get("weights") or {})}</p>')  # fmt: skip
    if not history:
        return head
    rows = [
        (escape(str(h.get("computed_at", MISSING))), escape(str(h.get("phase"))),
         *(f'{_pct((h.get("weights") or {}).get(arm))} <span class="ci">P(best) {_pct((h.get("p_best") or {}).get(arm))}</span>'
           for arm in arms))
        for h in history[-30:]
    ]  # fmt: skip
    return head + _table(f"Weights over time ({len(history)} updates; the latest 30)",
                         ("Computed at", "Phase", *(escape(a) for a in arms)), rows)  # fmt: skip


def render_experiment_list_page(experiments: Sequence[Mapping[str, Any]]) -> str:
    """Every experiment (``id``, ``split``, ``salt``, ``created_at``), each linked to its report."""
    rows = []
    for e in experiments:
        eid = str(e.get("id"))
        link = f'<a href="/v1/experiments/{escape(quote(eid, safe=""))}">{escape(eid)}</a>'
        salt = f"<code>{escape(str(e.get('salt')))}</code>"
        rows.append((link, _shares(e.get("split") or {}), salt, escape(str(e.get("created_at")))))
    table = _table(f"{len(rows)} experiment{'' if len(rows) == 1 else 's'}",
                   ("Experiment", "Split", "Salt", "Started"), rows) if rows else "<p>No experiment yet.</p>"  # fmt: skip
    return _page("Experiments", f"<h1>Experiments</h1>\n{table}")
