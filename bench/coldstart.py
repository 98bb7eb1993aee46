"""Cold start of `make serve` and /v1/generate latency over real HTTP, with the tiny models.

    python -m bench.coldstart [--runs 20] [--port 8000]

Starts `make serve` (venv and tiny models already built), times the first 200 of /readyz and of a
full /v1/generate, then the p50/p90 of /v1/generate at the config's defaults and at a small size,
and stops the server with SIGINT (which removes the app). Appends a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

import httpx

from bench.common import (
    Table,
    append_report,
    command_line,
    desk_photo,
    jpeg_bytes,
    machine,
    ms,
    p50,
    percentile,
    render_section,
)
from deskgen.paths import PROJECT_ROOT


def wait_for(client: httpx.Client, path: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if client.get(path).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{path} never answered 200")


def timed_generate(client: httpx.Client, photo: bytes, **fields: str) -> float:
    start = time.perf_counter()
    response = client.post("/v1/generate", files={"image": ("desk.jpg", photo, "image/jpeg")}, data=fields)
    response.raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    photo = jpeg_bytes(desk_photo(256, 256))
    started = time.monotonic()
    server = subprocess.Popen(["make", "serve"], cwd=PROJECT_ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    table = Table("/v1/generate over HTTP, tiny models (multipart 256 px JPEG, mix ott_3d, one client)",
                  ["size, steps", "N", "p50 ms", "p90 ms"])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300) as client:
            wait_for(client, "/readyz", started + 600)
            ready_s = time.monotonic() - started
            timed_generate(client, photo, seed="1")
            first_generate_s = time.monotonic() - started
            for label, fields, runs in (
                ("config defaults: 1024x1024, 30 steps", {}, 3),
                ("256x256, 4 steps", {"width": "256", "height": "256", "steps": "4"}, args.runs),
                ("64x64, 2 steps", {"width": "64", "height": "64", "steps": "2"}, args.runs),
            ):
                times = [timed_generate(client, photo, seed=str(i), mix="ott_3d", **fields) for i in range(runs)]
                table.add(label, runs, ms(p50(times)), ms(percentile(times, 90)))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
    preface = [
        f"`make serve` cold start (venv and tiny models present): /readyz 200 after {ready_s:.1f} s, "
        f"first /v1/generate 200 after {first_generate_s:.1f} s"
    ]
    section = render_section("Cold start and /v1/generate latency", [table], command=command_line(),
                             wall_s=time.monotonic() - started, host=machine(), preface=preface)
    append_report(section)
    print(section)


if __name__ == "__main__":
    main()
