"""A throwaway Prometheus server for tests: :func:`running_prometheus` starts Debian's ``prometheus``
(``make system-deps``, run by ``make test``, installs it where missing) in a temp dir, scraping the given targets every :data:`SCRAPE_S` seconds, and yields
a small client for its HTTP query API; it stops the server and removes the dir on exit."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

READY_TIMEOUT_S = 60.0
#: Seconds between scrapes (and each scrape's timeout, which may not exceed it). Late in the serve tier Ray's
#: metrics endpoint carries every series the shared app and the training runs made, served by a Python agent
#: on a 2-core host that is also generating; a scrape that times out marks every series of the target stale.
#: Production scrapes every 10 s (observability/prometheus.yml).
SCRAPE_S = 5


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now, or at unix time ``at`` (``[]`` when it has no data); raises on a
        PromQL error."""
        params: dict[str, str | float] = {"query": expr} if at is None else {"query": expr, "time": at}
        r = self.http.get("/api/v1/query", params=params)
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"PromQL error for {expr!r}: {body.get('error', r.text)}")
        return list(body["data"]["result"])

    def values(self, expr: str, label: str, at: float | None = None) -> dict[str, float]:
        """``expr``'s value now (or at ``at``) per value of ``label``."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr, at)}

    def scraped_at(self, at: float) -> bool:
        """Whether the latest scrape of every target before ``at`` succeeded: only then does an instant query
        at ``at`` show what the targets exported (a failed scrape marks all of a target's series stale, and
        a query then answers as if they did not exist)."""
        up = self.query("up", at)
        return bool(up) and all(float(s["value"][1]) == 1.0 for s in up)

    def scrape_report(self, window: str = "10m") -> str:
        """Scrapes that failed and the slowest scrape over ``window``: what a failed wait prints."""
        failed = self.query(f"count_over_time(up[{window}]) - sum_over_time(up[{window}])")
        total = self.query(f"count_over_time(up[{window}])")
        slowest = self.query(f"max_over_time(scrape_duration_seconds[{window}])")
        value = lambda v: float(v[0]["value"][1]) if v else float("nan")  # noqa: E731
        return (f"over the last {window}: {value(failed):.0f} of {value(total):.0f} scrapes failed, slowest "
                f"{value(slowest):.2f} s (timeout {SCRAPE_S} s); targets now: {self.targets_health()}")  # fmt: skip

    def targets(self) -> list[dict[str, Any]]:
        """The scrape targets as Prometheus reports them (health, lastError, lastScrapeDuration, ...)."""
        return list(self.http.get("/api/v1/targets").json()["data"]["activeTargets"])

    def targets_up(self) -> bool:
        active = self.targets()
        return bool(active) and all(t["health"] == "up" for t in active)

    def targets_health(self) -> str:
        """One line per target: what a failed wait for ``targets_up`` prints."""
        return "; ".join(f"{t['scrapeUrl']} {t['health']} ({t.get('lastError') or 'no error'}, last scrape "
                         f"{t.get('lastScrapeDuration', 0):.2f} s)" for t in self.targets())  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_prometheus(targets: list[str]) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("no `prometheus` binary: run `make system-deps` or `apt-get install prometheus`")
    folder = Path(tempfile.mkdtemp(prefix="deskgen-prom-"))
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "deskgen", "static_configs": [{"targets": targets}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if prom.http.get("/-/ready").status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus never became ready:\n{(folder / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
