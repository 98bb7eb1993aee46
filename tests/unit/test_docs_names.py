"""The documentation's examples name concepts and mixes that exist: a copied example that names a concept the
service lacks is answered 404 (an example once batched a "focus-friday" concept that was never shipped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deskgen.concepts import DEFAULT_CONCEPTS
from deskgen.mixes import BASE_MIX_ID, NAMED_MIXES, parse_mix_spec
from deskgen.paths import PROJECT_ROOT

pytestmark = pytest.mark.unit

DOCS = sorted([PROJECT_ROOT / "README.md", PROJECT_ROOT / "client" / "README.md", *(PROJECT_ROOT / "docs").glob("*.md")])
#: The adapters `make models` builds, and those the documentation trains itself (`train_lora --name X`).
SHIPPED_ADAPTERS = {"dalle", "ott", "3d"}
NAME = r"[A-Za-z0-9_.:+-]+"
Q = r'\\?"'  # a quote, escaped or not (JSON inside a shell string)
CONCEPT_PATTERNS = [rf"{Q}concept{Q}: {Q}({NAME})", rf"\bconcept=({NAME})", rf'\bconcept="({NAME})"', rf"--concept ({NAME})"]
CONCEPT_LISTS = [r'"concepts": \[([^]]*)\]', r"concepts=\[([^]]*)\]"]
MIX_PATTERNS = [rf"{Q}mix{Q}: {Q}({NAME})", rf"\bmix=({NAME})", rf'\bmix="({NAME})"', rf"--mix ({NAME})",
                rf"serve_multiplexed_model_id: ({NAME})"]  # fmt: skip


def named(patterns: list[str], text: str) -> set[str]:
    """What the patterns name in ``text``, less placeholders in capitals (``--mix ID``, ``--concept NAME``)."""
    found = {m.group(1).rstrip(".:") for p in patterns for m in re.finditer(p, text)}
    return {n for n in found if not re.fullmatch(r"[A-Z_]+", n)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_concept_an_example_names_is_shipped(doc: Path) -> None:
    text = doc.read_text()
    names = named(CONCEPT_PATTERNS, text)
    for pattern in CONCEPT_LISTS:
        for m in re.finditer(pattern, text):
            names |= set(re.findall(r'"([^"]+)"', m.group(1)))
    unknown = sorted(n for n in names if n != "auto" and n not in DEFAULT_CONCEPTS)
    assert not unknown, f"{doc.name} names concepts that deskgen/concepts.py does not ship: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_mix_an_example_names_is_named_or_made_of_known_adapters(doc: Path) -> None:
    text = doc.read_text()
    adapters = SHIPPED_ADAPTERS | set(re.findall(r"train_lora --name ([A-Za-z0-9_-]+)", text))
    bad = []
    for mix in named(MIX_PATTERNS, text):
        if mix in NAMED_MIXES or mix == BASE_MIX_ID:
            continue
        if ":" not in mix and "+" not in mix:
            bad.append(mix)  # a bare name that is no named mix (a file name alone means weight 1: write it so)
        elif not set(parse_mix_spec(mix)) <= adapters:
            bad.append(mix)
    assert not bad, f"{doc.name} names mixes that are neither named nor made of known adapters: {sorted(bad)}"


def test_the_patterns_find_what_the_readme_names() -> None:
    text = (PROJECT_ROOT / "README.md").read_text()
    assert {"gaming-rgb", "auto"} <= named(CONCEPT_PATTERNS, text)
    assert {"ott_3d", "dalle_only", "ott:0.7+3d:0.5", "mydesk:0.8+ott:0.4"} <= named(MIX_PATTERNS, text)
