"""Shared plumbing of the benchmark suites: statistics, the machine, and BENCHMARKS.md.

Every suite measures, then calls :func:`append_report`, which APPENDS one section to
``BENCHMARKS.md`` holding the date, the machine (CPU model, cores, RAM, GPU), the exact command and
the tables. Nothing here imports torch, TensorFlow or Ray at module level.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deskgen.errors import InvalidParameter
from deskgen.paths import PROJECT_ROOT

BENCHMARKS_MD = PROJECT_ROOT / "BENCHMARKS.md"

#: Where bench.fullsize writes (and the suites look for) the full-size random-weight models. Never
#: inside the repository: the SDXL folder alone is ~7 GB.
DEFAULT_FULLSIZE_DIR = Path(os.environ.get("DESKGEN_FULLSIZE", "/tmp/deskgen-fullsize"))


# --------------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------------


def parse_choices(spec: str | None, choices: Sequence[str], *, option: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), each one of ``choices``; None -> all of them. Else InvalidParameter."""
    if spec is None:
        return tuple(choices)
    picked = tuple(p.strip() for p in spec.split(",") if p.strip())
    if not picked or any(p not in choices for p in picked):
        raise InvalidParameter(f"`{option}` must name some of {list(choices)} but is {spec!r}.", field=option.lstrip("-"))
    return picked


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of a non-empty sample: an observed value, never an
    interpolation, so the p99 of 20 samples is honestly their maximum."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def p50(values: Sequence[float]) -> float:
    """The median (the mean of the two middle values for an even count)."""
    return statistics.median(values)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    point: float
    low: float
    high: float
    level: float


def p50_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> Interval:  # fmt: skip
    """How far ``b``'s p50 lies from ``a``'s, relative to the smaller one: ``(p50(b) - p50(a)) / min(p50(a),
    p50(b))``, signed (its magnitude is max/min - 1), with the p50s nearest-rank as :func:`percentile`.
    The interval is scipy's percentile bootstrap, the two samples resampled independently and seeded; two
    p50s of a few hundred latencies each move by several per cent from run to run, which the point alone
    hides (tests/unit/test_bench_common.py checks its coverage by simulation)."""
    import numpy as np
    from scipy import stats

    def statistic(x: Any, y: Any, axis: int = -1) -> Any:
        px = np.percentile(x, 50, axis=axis, method="inverted_cdf")  # = nearest rank
        py = np.percentile(y, 50, axis=axis, method="inverted_cdf")
        return (py - px) / np.minimum(px, py)

    data = (np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    result = stats.bootstrap(data, statistic, vectorized=True, paired=False, confidence_level=level,
                             n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    point = float(statistic(*data))
    return Interval(point, float(result.confidence_interval.low), float(result.confidence_interval.high), level)


def metric_total(metrics_text: str, name: str, labels: Mapping[str, str]) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``, in Prometheus text (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(metrics_text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())  # fmt: skip


def time_calls(fn: Callable[[], Any], n: int, *, warmup: int = 1) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``n`` times; the seconds of each timed call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


@dataclass(frozen=True)
class Process:
    """One process of this machine as a bench reads it: its command line and CPU time so far (user + system,
    its threads included; None where it could not be read)."""

    pid: int
    cmdline: str
    cpu_s: float | None


def ray_processes(*, with_self: bool = False) -> list[Process]:
    """This machine's Ray processes (a ``ray`` in the command line: Ray titles its workers ``ray::<actor>``, so a
    Serve replica reads ``ray::ServeReplica:<app>:<deployment>``), and this process too with ``with_self``.
    A process that ends while they are listed is left out."""
    import psutil

    out = []
    for process in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "ray" in cmdline or (with_self and process.pid == os.getpid()):
            times = process.info["cpu_times"]
            out.append(Process(process.pid, cmdline, None if times is None else times.user + times.system))
    return out


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...; elapsed()`` -> seconds since the block began."""
    start = time.perf_counter()
    yield lambda: time.perf_counter() - start


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def s(seconds: float, digits: int = 2) -> str:
    return f"{seconds:.{digits}f}"


def desk_photo(width: int = 1024, height: int = 768) -> Any:
    """A deterministic RGB "upload" of a desk scene (:func:`deskgen.tools.samples.desk_scene`), phone-photo sized."""
    import numpy as np
    from PIL import Image

    from deskgen.tools.samples import desk_scene

    scene = desk_scene(np.random.default_rng(0), size=512)
    return scene.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


def jpeg_bytes(image: Any, quality: int = 90) -> bytes:
    """``image`` as JPEG bytes, as a client would upload it."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def _gpus() -> list[str]:
    """GPU names with their memory, as torch sees them ([] without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append(f"{props.name} ({props.total_memory / 1024**3:.0f} GiB)")
        return out
    except Exception:  # a broken CUDA setup must not stop a CPU report
        return []


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    ram_gib: float | None
    gpus: tuple[str, ...]
    python: str
    versions: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        ram = f"{self.ram_gib:.0f} GiB RAM" if self.ram_gib else "RAM unknown"
        gpu = ", ".join(self.gpus) if self.gpus else "no GPU"
        return f"{self.cpu}, {self.cores} cores, {ram}; {gpu}"


def machine() -> Machine:
    """The machine this process runs on, and the versions of the libraries that matter."""
    from importlib import metadata

    versions = {}
    for package in ("torch", "diffusers", "transformers", "peft", "tensorflow", "keras", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    gpus = tuple(_gpus())
    if gpus:
        import torch

        versions["cuda"] = str(torch.version.cuda)
    return Machine(
        cpu=_cpu_model(),
        cores=os.cpu_count() or 0,
        ram_gib=_ram_gib(),
        gpus=gpus,
        python=platform.python_version(),
        versions=versions,
    )


def command_line() -> str:
    """The exact command that is running, as a user would retype it (``python -m bench.cpu --quick``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"-m {spec.name}" if spec is not None and spec.name else shlex.quote(sys.argv[0])
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k in _REPORTED_ENV)
    return " ".join(part for part in (env, f"python {program}", shlex.join(sys.argv[1:])) if part)


#: Environment variables that change what a suite measures, shown in front of the command.
_REPORTED_ENV = ("DESKGEN_MODELS", "DESKGEN_FULLSIZE", "CUDA_VISIBLE_DEVICES", "RAY_OVERRIDE_RESOURCES")


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A markdown table: a title, a header row and rows of already formatted cells."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.header):
            raise ValueError(f"table {self.title!r}: a row of {len(cells)} cells for {len(self.header)} columns")
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"#### {self.title}", "", "| " + " | ".join(self.header) + " |"]
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "header": self.header, "rows": self.rows, "notes": self.notes}


def render_section(title: str, tables: Sequence[Table], *, command: str, wall_s: float, host: Machine,
                   preface: Sequence[str] = ()) -> str:
    """One dated section: machine, command, wall time, then the tables."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(f"{k} {v}" for k, v in host.versions.items())
    parts = [
        f"### {title} — {now}",
        "",
        f"- Machine: {host.describe()}",
        f"- Software: Python {host.python}; {versions}",
        f"- Command: `{command}` (wall {wall_s:.0f} s)",
        *[f"- {line}" for line in preface],
        "",
    ]
    parts += [table.markdown() for table in tables]
    return "\n".join(parts) + "\n"


def append_report(section: str, *, path: Path = BENCHMARKS_MD) -> None:
    """Append ``section`` to BENCHMARKS.md (created with its header if absent)."""
    if not path.exists():
        path.write_text(BENCHMARKS_HEADER)
    with path.open("a") as f:
        f.write("\n" + section)


def write_out_dir(name: str, section: str, payload: dict[str, Any]) -> list[Path]:
    """If ``$OUT`` is set (the GPU machine's result folder), also write ``name.md`` and ``name.json`` there."""
    out = os.environ.get("OUT")
    if not out:
        return []
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / f"{name}.md", folder / f"{name}.json"
    md.write_text(section)
    js.write_text(json.dumps(payload, indent=2, default=str))
    return [md, js]


BENCHMARKS_HEADER = """# deskgen benchmarks

Results are appended by the suites, one dated section per run, with the machine and the exact command:

    make bench-cpu    # python -m bench.cpu  — serving overhead, mix switching, VGG16 gate, BLIP-base on the CPU
    make bench-gpu    # python -m bench.gpu  — SDXL + LoRA mix at 1024 px: diffusers baseline vs production settings

Full-size models have the real architectures and parameter counts but random weights (no download:
`python -m bench.fullsize --out DIR`), so timings are real and images are noise.
"""
