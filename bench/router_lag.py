"""How long the mix-aware router's counts lag a finished request: the race its spill grace closes.

    python -m bench.router_lag                    # 2 Generator replicas, 200 back-to-back generations of one mix
    python -m bench.router_lag --calls 50 --no-write

The router counts a request until Serve runs its done-callback on the router's event loop, a moment after
the caller has its answer. A caller that sends its next request at once (a handle in a loop: cluster.probe,
a job consumer) finds the mix's holder still counted busy, and with an idle replica beside it the mix would
spill there (a load, a switch). The router holds such a request within ``spill_grace_s``, ranking it again
every millisecond (deployments/routing.py ``settle``), and records each hold in ``deskgen_router_hold_seconds``
(``stayed``: a holder took it once the callback landed; ``spilled``).

Here the grace is set far longer than any lag (``--grace-ms``, default 200), so that every race resolves as
``stayed`` and the hold times are the lag: one Ray instance, the app of serve_config.yaml on the tiny models
with 2 Generator replicas, one text-to-image request so that one replica holds the mix, then ``--calls``
generations (64x64, 2 steps) routed by the mix's id from this driver's handle, back to back. Reported: how many were held,
the hold times' distribution (the histogram's buckets), how many spilled, and which replicas answered. The
spill grace should cover the lag's tail with room to spare; anything it adds beyond that is paid by every
request that spills for real (bench.router).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import time

import httpx

from bench.common import Table, append_report, command_line, machine, render_section
from bench.cpu import ServeApp, bench_serve_config, free_port
from bench.router import held_counts, router_config, scrape_holds
from deployments.metrics import HOLD_BUCKETS
from deskgen.contracts import GenerationRequest
from deskgen.generator.params import GenerationParams
from deskgen.paths import models_dir

log = logging.getLogger("bench.router_lag")

#: The mix the calls are routed by.
MIX = "ott_3d"


def lag_table(held: dict[tuple[str, float], float], calls: int, grace_ms: float) -> Table:
    """The hold histogram of ``calls`` back-to-back calls as a table: per bucket bound, the holds that ended
    (stayed) within it, as a count and a share of the stayed holds."""
    stayed = {le: n for (outcome, le), n in held.items() if outcome == "stayed"}
    total, _ = held_counts(held)
    table = Table(f"Holds of {calls} back-to-back calls, spill grace {grace_ms:g} ms: how soon a holder took them",
                  ["held at most (ms)", "stayed (calls)", "share of the stayed"])  # fmt: skip
    for le in [*HOLD_BUCKETS, float("inf")]:
        n = stayed.get(le, 0.0)
        share = f"{100 * n / total:.1f} %" if total else "-"
        table.add("any" if le == float("inf") else f"{1000 * le:g}", f"{n:.0f}", share)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--grace-ms", type=float, default=200.0, help="the spill grace while measuring (default 200 ms)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, do not append them to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    tiny = models_dir()
    base = bench_serve_config(free_port(), tiny, tiny / "classifier" / "desk_gate.keras")
    config = router_config(base, 2, 0, args.grace_ms / 1000)
    with ServeApp(config, num_cpus=6, num_gpus=3, metrics_port=free_port()) as app:
        with httpx.Client(base_url=app.url, timeout=120) as client:
            mix = str(client.get("/v1/mixes").json()["named_mixes"][MIX]["id"])
            body = {"prompt": "a tidy desk", "mix": MIX, "seed": 1, "locate": False}
            holder = client.post("/v1/text2img", json=body).headers["x-deskgen-replica"]
        time.sleep(3.0)  # the replicas' routing stats and loaded mixes reach the routers
        handle = app.handle("Generator").options(multiplexed_model_id=mix)
        request = GenerationRequest(GenerationParams(prompt="a tidy desk", steps=2, width=64, height=64), mix_label=MIX)
        handle.generate.remote(request).result(timeout_s=60)  # this driver's router, built and fed
        time.sleep(3.0)
        before = scrape_holds(app)
        answered: collections.Counter[str] = collections.Counter()
        for _ in range(args.calls):
            answered[handle.generate.remote(request).result(timeout_s=60).replica] += 1
        held = {key: n - before.get(key, 0.0) for key, n in scrape_holds(app).items()}
    stayed, spilled = held_counts(held)
    table = lag_table(held, args.calls, args.grace_ms)
    table.notes += [
        f"{args.calls} calls: {stayed + spilled:.0f} held ({stayed:.0f} stayed, {spilled:.0f} spilled); answered by "
        f"the mix's holder {answered[holder]} times, by the other replica {args.calls - answered[holder]} times.",
        "A hold ends when the finished call's done-callback has lowered the router's count (a holder then takes "
        "the call) or when the grace has passed (the call spills to the idle replica).",
    ]
    section = render_section("Mix-aware router, count lag", [table], command=command_line(),
                             wall_s=time.perf_counter() - started, host=machine(),
                             preface=[f"Machine load (1-min) at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f}; "
                                      "the calls come from this driver, one at a time."])  # fmt: skip
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
