"""Caption decoding: plain greedy against the loop guards (``no_repeat_ngram_size``, ``repetition_penalty``).

    python -m bench.captions [--only tiny,fullsize] [--repeats N] [--threads T] [--no-write]

For each decode setting, the same photos are captioned with the production prompts (unconditional + the
three default prefixes, the vision encoder once per photo, :class:`deskgen.captioner.Captioner`) and we
report the median seconds per caption set, the tokens decoded, and how many captions hold a loop (a
3-gram of words twice). Two models:

- ``tiny``: the tiny BLIP of ``make models`` (``$DESKGEN_MODELS``/blip). Its steered random decoder never
  emits [SEP] and loops like greedy BLIP does, so the loop column means something; the timing is mostly
  Python overhead.
- ``fullsize``: BLIP-base's architecture (``BlipConfig()``: 224 M params, ViT-B/16 at 384 px, BERT-base
  decoder) with seeded random weights, built in memory as :mod:`bench.fullsize` builds it (its config and
  30,524-id vocabulary), fp32 on the CPU. Random weights run every prompt to ``max_new_tokens``, so equal
  token counts make the per-token cost of the guards directly comparable.

- ``processors``: the guards alone — transformers' ``NoRepeatNGramLogitsProcessor`` and
  ``RepetitionPenaltyLogitsProcessor`` on one decoding step of BLIP-base's shape (4 rows, 30,524 logits,
  40 tokens so far), the per-token price independent of the model and of the machine's load.

The table is appended to BENCHMARKS.md unless ``--no-write``. Nothing is asserted; about 2 minutes on two
shared cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from bench.common import Table, append_report, command_line, machine, p50, parse_choices, render_section, s

log = logging.getLogger(__name__)

MODELS = ("tiny", "fullsize", "processors")


@dataclass(frozen=True)
class Variant:
    label: str
    no_repeat_ngram_size: int
    repetition_penalty: float


VARIANTS = (
    Variant("plain greedy", 0, 1.0),
    Variant("no_repeat_ngram_size=3 (default)", 3, 1.0),
    Variant("no_repeat_ngram_size=3 + repetition_penalty=1.2", 3, 1.2),
)


def _photos(n: int) -> list[Any]:
    import numpy as np

    from deskgen.tools.samples import desk_scene

    return [desk_scene(np.random.default_rng(100 + i), 256) for i in range(n)]


def _fullsize_captioner(max_new_tokens: int) -> Any:
    import torch
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    from bench.fullsize import SEED, blip_config, blip_vocabulary
    from deskgen.captioner import Captioner

    tokenizer = BertTokenizer(vocab=blip_vocabulary(), do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    torch.manual_seed(SEED)
    model = BlipForConditionalGeneration(blip_config()).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(), tokenizer=tokenizer)
    return Captioner(model, processor, device="cpu", max_new_tokens=max_new_tokens)


def _tiny_captioner(max_new_tokens: int) -> Any:
    from deskgen.captioner import Captioner
    from deskgen.paths import models_dir

    return Captioner.from_pretrained(str(models_dir() / "blip"), device="cpu", max_new_tokens=max_new_tokens)


def _loops(text: str) -> bool:
    words = text.split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(trigrams) != len(set(trigrams))


def bench_model(name: str, captioner: Any, photos: list[Any], repeats: int) -> tuple[Table, dict[str, Any]]:
    from deskgen.captioner import DecodeSettings

    max_new = captioner.max_new_tokens
    table = Table(
        f"Caption decoding — {name}, fp32, CPU, {1 + len(captioner.prefixes)} prompts per photo, "
        f"max_new_tokens={max_new}",
        ["decoding", "N", "p50 s / caption set", "vs plain", "words / caption", "distinct captions with a loop"],
    )
    settings = {
        v.label: DecodeSettings(max_new, v.no_repeat_ngram_size, v.repetition_penalty) for v in VARIANTS
    }
    seconds: dict[str, list[float]] = {v.label: [] for v in VARIANTS}
    texts: dict[str, set[str]] = {v.label: set() for v in VARIANTS}
    captioner.caption(photos[0])  # warm-up
    # Round-robin over the settings, so that the load of a shared machine drifts over all of them alike.
    for _ in range(repeats):
        for variant in VARIANTS:
            captioner.set_decoding(settings[variant.label])
            for photo in photos:
                start = time.perf_counter()
                result = captioner.caption(photo)
                seconds[variant.label].append(time.perf_counter() - start)
                texts[variant.label].update(result.texts())
    base = p50(seconds[VARIANTS[0].label])
    raw: dict[str, Any] = {}
    for variant in VARIANTS:
        median, distinct = p50(seconds[variant.label]), texts[variant.label]
        loops = sum(_loops(t) for t in distinct)
        words = sum(len(t.split()) for t in distinct) / len(distinct)
        table.add(variant.label, len(seconds[variant.label]), s(median, 3), f"{median / base:.2f}x", f"{words:.1f}",
                  f"{loops} / {len(distinct)}")
        raw[variant.label] = {"seconds": seconds[variant.label], "loops": loops, "captions": len(distinct)}
    return table, raw


def bench_processors(repeats: int) -> Table:
    import torch
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from bench.common import time_calls

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 30524, (4, 40), generator=generator)
    scores = torch.randn(4, 30524, generator=generator)
    table = Table(
        "Loop guards alone — one decoding step, 4 rows x 30,524 logits, 40 tokens so far",
        ["logits processor", "N", "p50 ms / step", "max ms / step"],
    )
    for label, processor in (
        ("NoRepeatNGramLogitsProcessor(3)", NoRepeatNGramLogitsProcessor(3)),
        ("RepetitionPenaltyLogitsProcessor(1.2)", RepetitionPenaltyLogitsProcessor(1.2)),
    ):
        times = time_calls(lambda p=processor: p(input_ids, scores.clone()), 50 * repeats, warmup=5)
        table.add(label, len(times), f"{p50(times) * 1e3:.3f}", f"{max(times) * 1e3:.3f}")
    times = time_calls(lambda: scores.clone(), 50 * repeats, warmup=5)
    table.add("(the clone of the scores both rows include)", len(times), f"{p50(times) * 1e3:.3f}", f"{max(times) * 1e3:.3f}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated models of {','.join(MODELS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the photos per setting (default 3)")
    parser.add_argument("--photos", type=int, default=2, help="generated desk photos (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in the Captioner replica: num_cpus 1)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--no-write", action="store_true", help="print the table, do not append it to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = parse_choices(args.only, MODELS, option="--only")

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    photos = _photos(args.photos)
    tables = []
    for name in models:
        if name == "processors":
            tables.append(bench_processors(args.repeats))
            continue
        build = _tiny_captioner if name == "tiny" else _fullsize_captioner
        start = time.perf_counter()
        captioner = build(args.max_new_tokens)
        log.info("%s captioner ready in %.1f s", name, time.perf_counter() - start)
        label = "tiny BLIP (models/tiny/blip)" if name == "tiny" else "BLIP-base architecture, random weights (224 M)"
        table, _ = bench_model(label, captioner, photos, args.repeats)
        tables.append(table)
        del captioner
    preface = [
        f"torch threads {args.threads}; machine load (1-min average) at start {load_before:.1f}, at end "
        f"{os.getloadavg()[0]:.1f}: compare rows of one table, measured side by side."
    ]
    section = render_section(
        "Caption decoding", tables, command=command_line(), wall_s=time.perf_counter() - started, host=machine(),
        preface=preface,
    )
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
