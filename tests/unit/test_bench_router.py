"""The router bench's bookkeeping (bench/router.py): rounds pooled per router, each round kept for the spread
and compared with Serve's default round by round."""

from __future__ import annotations

import argparse
import collections
import os
import random
import threading
import time

import pytest

from bench import router

pytestmark = pytest.mark.unit


def one_round(name: str, waits: list[float], requests: int, wall_s: float) -> dict:
    latencies = {"ott_3d": [1.0, 2.0], "dalle_ott": [1.5]}
    parts = {"ott_3d": [(0.1, 0.0, 0.3, 0.01), (0.2, 0.01, 0.4, 0.03)], "dalle_ott": [(0.1, 0.01, 0.3, 0.02)]}
    spread = {"ott_3d": collections.Counter({"r1": 1, "r2": 1}), "dalle_ott": collections.Counter({"r1": 1})}
    return {"router": name, "requests": requests, "ok": requests, "switches": 10, "loads": 2, "wall_s": wall_s,
            "waits": waits, "latencies": latencies, "parts": parts, "spread": spread,
            "rounds": [{"wait_p95": max(waits), "rps": requests / wall_s}],
            "generate_s": [0.3, 0.4], "switch_s": [0.01], "load_s": 2.5, "adapter_loads": 2, "adapter_load_s": 2.0,
            "held": {}, "busy": [(1.0, 0.3), (2.0, 0.4)], "cpu": {"Ingress (and its routers)": 1.5, "Generator replicas": 20.0},
            "replica_threads": {"pipeline": 15.0, "requests": 2.0, "adapter watch": 0.0, router.SERVE_AND_RAY: 3.0}}  # fmt: skip


def test_rounds_are_pooled_and_each_is_kept_in_order_for_the_paired_comparison() -> None:
    runs = router.merged([
        one_round("serve (default)", [0.1, 0.4], 100, 20.0),  # 5 req/s, p95 0.4
        one_round("mix-aware, spill_queue 0", [0.1, 0.3], 100, 25.0),  # lower p95, slower
        one_round("serve (default)", [0.1, 0.2], 100, 25.0),  # 4 req/s, p95 0.2
        one_round("mix-aware, spill_queue 0", [0.1, 0.5], 100, 20.0),  # higher p95, faster
        one_round("serve (default)", [0.1, 0.6], 100, 20.0),
        one_round("mix-aware, spill_queue 0", [0.1, 0.5], 100, 10.0),  # lower p95, faster
    ])  # fmt: skip
    serve, aware = runs
    assert (serve["requests"], serve["switches"], len(serve["waits"])) == (300, 30, 6)
    assert [x["wait_p95"] for x in aware["rounds"]] == [0.3, 0.5, 0.5]
    assert router.paired(runs) == ["mix-aware, spill_queue 0 against serve (default), round by round: a lower wait "
                                   "p95 in 2 of 3 rounds, a higher throughput in 2 of 3."]  # fmt: skip
    args = argparse.Namespace(replicas=3, rounds=3, requests=100, clients=4, zipf=1.1, seed=7, workload="zipf")
    main, per_mix, busy, cpu, threads = router.tables(runs, args)
    assert "Zipf s=1.1 over 7 named + 3 ad-hoc mixes (seed 7)" in main.title
    # Each round's replicas are new ones: a mix's replicas are counted per round, not over the rounds.
    assert per_mix.rows[0] == ["ott_3d", "1000 (2 repl.)", "1000 (2 repl.)"]  # nearest-rank p50 of 1, 2 x 3
    assert main.rows[1][-2:] == ["300 / 500 / 500", "4.00 / 5.00 / 10.00"]
    assert main.rows[1][5] == "20 / 30"  # outside the replica: 10, 30, 20 ms x 3 rounds; p50 is the 5th of 9
    assert main.rows[1][6] == "1500 / 2000"  # latency, every mix pooled: 1, 2 and 1.5 s x 3 rounds
    assert busy.rows[1] == ["mix-aware, spill_queue 0", "1.50", "50 % / 300", "50 % / 400", "0 % / -"]
    # 3 rounds x (20 s on the replicas, 1.5 on the Ingress) over 300 requests; 64.5 s of CPU in 55 s of wall.
    cores = os.cpu_count() or 1
    assert cpu.rows[1] == ["mix-aware, spill_queue 0", "200.0", "15.0", "0.0", "0.0", "0.0", "0.0", "0.0", "215.0",
                           f"{100 * 64.5 / (cores * 55.0):.0f} %"]  # fmt: skip
    # The replicas' 20 s per round by thread: 3 rounds x (15 + 2 + 0 + 3) s over 300 requests.
    assert threads.rows[1] == ["mix-aware, spill_queue 0", "150.0", "20.0", "0.0", "30.0", "200.0"]
    assert main.notes == [*router.paired(runs), "mix-aware, spill_queue 0: held no request within its spill grace.",
                          router.costs(runs)]  # fmt: skip
    # Every round of every router pooled: 6 x (2 images, 1 switch, 2 loads of 1.0 s each, 0.5 s of the rest).
    assert router.costs(runs) == (
        "Costs on the replicas, every router's rounds (the inputs of bench.router_sim's model with shared cores): "
        "a generation p50 0.30 s (p95 0.40, 12 images, the switch not included); a switch p50 10 ms (p95 10, "
        "6 switches); 12 mix loads read 12 adapter files (1.00 s per file); the rest of a load (trim, "
        "bookkeeping): 250 ms per mix load.")  # fmt: skip


def test_each_arm_s_own_loads_are_read_per_replica_between_readings_and_pooled_over_rounds() -> None:
    control, other = router.ARMS

    def counts(loads: int, seconds: float, reads: int, read_s: float) -> dict:
        return dict(zip(router.LOAD_COUNTERS, (loads, seconds, reads, read_s), strict=True))

    before = {"r1": {"loads_by_label": {control: counts(1, 1.0, 2, 0.8)}}}
    after = {"r1": {"loads_by_label": {control: counts(2, 1.5, 2, 0.8), other: counts(1, 0.7, 1, 0.6)}},
             "r2": {"loads_by_label": {other: counts(3, 2.1, 3, 1.8)}}}  # a replica new since the first reading
    deltas = router.label_deltas(before, after)
    assert deltas == {control: counts(1, 0.5, 0, 0.0), other: counts(4, 2.8, 4, 2.4)}
    rounds = [{**one_round("r", [0.1], 3, 1.0), "loads_by_label": deltas} for _ in range(2)]
    merged = router.merged(rounds)[0]
    assert merged["loads_by_label"][other] == counts(8, 5.6, 8, 4.8)
    # 2 rounds: the control answered 4 requests, the other arm 2 (one_round's latencies).
    assert router.arm_loads_note(merged) == (
        f"r: each arm's own mix loads (inside its queue wait): {control} 50.0 loads per 100 of its requests, "
        f"reading 0.0 files, 250 ms per request; {other} 400.0 loads per 100 of its requests, reading 400.0 files, "
        f"2800 ms per request.")  # fmt: skip


def test_which_router_goes_first_alternates_round_by_round() -> None:
    routers = ["serve", "aware-0", "aware-1"]
    assert [router.round_order(routers, r) for r in range(3)] == [routers, routers[::-1], routers]
    assert routers == ["serve", "aware-0", "aware-1"]  # not reordered in place


def test_the_ab_workload_draws_the_default_experiment_s_arms_in_its_split() -> None:
    drawn = router.workload(4000, 7, 1.1, "ab")
    assert set(drawn) == set(router.ARMS) == set(router.workload_mixes("ab"))
    counts = collections.Counter(drawn)
    for arm, share in router.AB_SPLIT.items():
        # 4000 draws: 4 binomial standard errors of a share of 0.3 are 0.029.
        assert abs(counts[arm] / 4000 - share) < 0.03
    assert router.workload(50, 7, 1.1, "ab") == router.workload(50, 7, 1.1, "ab")  # seeded
    # The Zipf workload keeps every mix, the arms most drawn.
    zipf = collections.Counter(router.workload(4000, 7, 1.1))
    assert set(zipf) == set(router.NAMED + router.ADHOC) and [m for m, _ in zipf.most_common(2)] == list(router.ARMS)
    args = argparse.Namespace(replicas=2, rounds=1, requests=10, clients=4, zipf=1.1, seed=7, workload="ab")
    title = router.tables(router.merged([one_round("serve (default)", [0.1], 10, 2.0) for _ in range(3)]), args)[0].title
    split = ", ".join(f"{arm} {100 * share:g} %" for arm, share in router.AB_SPLIT.items())
    assert f"the default experiment's split ({split}; seed 7)" in title


def test_replicas_busy_weighs_each_other_replica_by_its_overlap_and_counts_a_replica_once() -> None:
    def done(replica: str, began: float, ended: float, generate_s: float) -> dict:
        return {"ok": True, "replica": replica, "began": began, "ended": ended, "generate_s": generate_s}

    results = [
        done("a", 0.0, 4.0, 0.3),
        done("b", 1.0, 3.0, 0.4),
        done("c", 2.0, 2.5, 0.5),
        done("c", 2.5, 6.0, 0.6),  # touches c's first span: merged into one span 2-6
        done("b", 5.0, 8.0, 0.7),
        {"ok": False, "mix": "ott_3d"},  # refused: no span
    ]
    busy = router.replicas_busy(results)
    assert [g for _, g in busy] == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert busy[0][0] == pytest.approx(1 + (2.0 + 2.0) / 4)  # a 0-4: b 1-3, c 2-4 (of its merged 2-6)
    assert busy[1][0] == pytest.approx(1 + (2.0 + 1.0) / 2)  # b 1-3: a all along, c 2-3
    assert busy[2][0] == pytest.approx(1 + (0.5 + 0.5) / 0.5)  # c 2-2.5: a and b all along -> 3 at once
    assert busy[3][0] == pytest.approx(1 + (1.5 + 0.5 + 1.0) / 3.5)  # c 2.5-6: a 2.5-4, b 2.5-3 and 5-6
    assert busy[4][0] == pytest.approx(1 + 1.0 / 3.0)  # b 5-8: c 5-6


def test_the_concurrency_table_groups_generations_by_replicas_at_once() -> None:
    runs = [{"router": "serve (default)", "busy": [(1.2, 0.2), (1.6, 0.3), (2.5, 0.5), (3.0, 0.7)]},
            {"router": "mix-aware, spill_queue 0", "busy": [(1.0, 0.2), (1.4, 0.4)]}]  # fmt: skip
    table = router.concurrency_table(runs, 3)
    # 2.5 rounds up to 3 (half up, not to even).
    assert table.rows == [["serve (default)", "2.08", "25 % / 200", "25 % / 300", "50 % / 600"],
                          ["mix-aware, spill_queue 0", "1.20", "100 % / 300", "0 % / -", "0 % / -"]]  # fmt: skip


def test_cpu_time_is_counted_per_role_for_processes_alive_at_both_readings() -> None:
    before = {1: ("Ingress (and its routers)", 10.0), 2: ("Generator replicas", 5.0), 3: ("proxy", 1.0)}
    after = {1: ("Ingress (and its routers)", 10.5), 2: ("Generator replicas", 9.0), 4: ("Generator replicas", 7.0),
             5: (router.RAY, 0.2)}  # fmt: skip
    # pid 3 ended and pids 4 and 5 started between the readings: left out, not counted with their start-up.
    assert router.cpu_by_role(before, after) == {"Ingress (and its routers)": 0.5, "Generator replicas": 4.0}
    # This process is found, as the bench's clients, and its CPU time grows with work done.
    first = router.cpu_seconds()
    assert first[os.getpid()][0] == router.CLIENTS
    sum(i * i for i in range(2_000_000))
    assert router.cpu_by_role(first, router.cpu_seconds())[router.CLIENTS] > 0


def test_the_arms_note_reads_the_difference_against_the_goal_only_as_far_as_its_interval_allows() -> None:
    rng = random.Random(5)
    control, other = router.ARMS

    def run(control_s: list[float], other_s: list[float]) -> dict:
        return {"router": "r", "latencies": {control: control_s, other: other_s},
                "parts": {control: [(0.1, 0.0, 0.3, 0.01), (0.2, 0.02, 0.4, 0.03)], other: [(0.0, 0.0, 0.2, 0.04)]}}  # fmt: skip

    def sample(median: float, n: int, spread: float) -> list[float]:
        return [median * rng.lognormvariate(0, spread) for _ in range(n)]

    apart = router.arms_note(run(sample(0.25, 300, 0.05), sample(0.30, 150, 0.05)))
    assert apart.startswith("r: the A/B arms' p50 differ by ")
    assert apart.endswith(f"): more than 5 % apart; mean queue + switch + generation + outside the replica: {control} "
                          f"150 + 10 + 350 + 20 ms (50 % switched), {other} 0 + 0 + 200 + 40 ms (0 % switched).")  # fmt: skip
    assert f"({other} against {control}: +" in apart and "300 and 150 requests" in apart
    close = router.arms_note(run(sample(0.25, 300, 0.05), sample(0.25, 300, 0.05)))
    assert "): within 5 %; " in close
    # The same true difference as "close", but few and spread-out latencies: the interval straddles the goal.
    noisy = router.arms_note(run(sample(0.25, 30, 0.4), sample(0.25, 30, 0.4)))
    assert "): not resolved against 5 % by this sample; " in noisy


#: What Ray's metrics agent serves for the router's hold histogram (two Ingress replicas' series, one outcome
#: each), as Prometheus text: the buckets are cumulative.
HOLD_TEXT = """\
# HELP ray_deskgen_router_hold_seconds Generator requests held by the mix-aware router
# TYPE ray_deskgen_router_hold_seconds histogram
ray_deskgen_router_hold_seconds_bucket{replica="i1",outcome="stayed",le="0.001"} 6.0
ray_deskgen_router_hold_seconds_bucket{replica="i1",outcome="stayed",le="0.002"} 8.0
ray_deskgen_router_hold_seconds_bucket{replica="i1",outcome="stayed",le="0.005"} 9.0
ray_deskgen_router_hold_seconds_bucket{replica="i1",outcome="stayed",le="+Inf"} 10.0
ray_deskgen_router_hold_seconds_count{replica="i1",outcome="stayed"} 10.0
ray_deskgen_router_hold_seconds_sum{replica="i1",outcome="stayed"} 0.02
ray_deskgen_router_hold_seconds_bucket{replica="i2",outcome="stayed",le="0.001"} 2.0
ray_deskgen_router_hold_seconds_bucket{replica="i2",outcome="stayed",le="0.002"} 2.0
ray_deskgen_router_hold_seconds_bucket{replica="i2",outcome="stayed",le="0.005"} 2.0
ray_deskgen_router_hold_seconds_bucket{replica="i2",outcome="stayed",le="+Inf"} 10.0
ray_deskgen_router_hold_seconds_bucket{replica="i2",outcome="spilled",le="0.02"} 0.0
ray_deskgen_router_hold_seconds_bucket{replica="i2",outcome="spilled",le="+Inf"} 5.0
"""


def test_the_router_s_holds_are_read_from_the_metrics_and_summed_over_series() -> None:
    held = router.holds(HOLD_TEXT)
    assert held[("stayed", 0.001)] == 8.0 and held[("stayed", float("inf"))] == 20.0
    assert held[("spilled", float("inf"))] == 5.0
    run = {"router": "mix-aware, spill_queue 0", "requests": 100, "held": held}
    assert router.held_note(run) == ("mix-aware, spill_queue 0: held 25.0 requests per 100 within its spill grace: "
                                     "20 stayed on a holder of their mix (40 % within 1 ms, 50 % within 2 ms, "
                                     "55 % within 5 ms), 5 spilled.")  # fmt: skip
    # Every held request spilled: no share of the stayed ones to give.
    run["held"] = {("spilled", 0.001): 3.0, ("spilled", float("inf")): 5.0}
    assert router.held_note(run) == ("mix-aware, spill_queue 0: held 5.0 requests per 100 within its spill grace: "
                                     "0 stayed on a holder of their mix, 5 spilled.")  # fmt: skip


def test_the_lag_bench_tabulates_the_stayed_holds_by_bucket() -> None:
    from bench import router_lag

    table = router_lag.lag_table(router.holds(HOLD_TEXT), calls=40, grace_ms=200)
    rows = {row[0]: row[1:] for row in table.rows}
    # Cumulative over both series: 8 within 1 ms, 10 within 2 ms, 11 within 5 ms, 20 in all; a bucket a
    # series lacks counts as none of its holds.
    assert rows["1"] == ["8", "40.0 %"] and rows["2"] == ["10", "50.0 %"] and rows["5"] == ["11", "55.0 %"]
    assert rows["any"] == ["20", "100.0 %"] and rows["0.5"] == ["0", "0.0 %"]


def test_a_replica_s_cpu_time_is_split_by_the_threads_it_reports_and_the_rest_of_its_process() -> None:
    """Read by psutil for real: a thread that works gains CPU time, one that waits gains less, and the
    process's time less the named threads' is the rest (here this test's own thread)."""
    started, worked, done = threading.Event(), threading.Event(), threading.Event()
    tids: dict[str, int] = {}

    def busy() -> None:  # alive until the second reading: an ended thread leaves /proc
        tids["pipeline"] = threading.get_native_id()
        started.wait()
        sum(i * i for i in range(3_000_000))
        worked.set()
        done.wait()

    def idle() -> None:
        tids["requests"] = threading.get_native_id()
        done.wait()

    workers = [threading.Thread(target=busy), threading.Thread(target=idle)]
    for worker in workers:
        worker.start()
    while len(tids) < 2:
        time.sleep(0.01)
    # A pid above Linux's largest: no such process, left out.
    infos = {"r1": {"pid": os.getpid(), "threads": dict(tids)},
             "gone": {"pid": 2**22 + 1, "threads": {"pipeline": 1}}}  # fmt: skip
    before = router.replica_thread_seconds(infos)
    started.set()
    worked.wait()
    sum(i * i for i in range(1_000_000))  # this thread: part of the rest
    after = router.replica_thread_seconds(infos)
    done.set()
    for worker in workers:
        worker.join()
    delta = router.replica_threads_delta(before, after)
    assert set(delta) == {*router.REPLICA_THREADS, router.SERVE_AND_RAY}
    assert delta["pipeline"] > delta["requests"] >= 0 and delta["adapter watch"] == 0
    assert delta[router.SERVE_AND_RAY] > 0
    assert sum(delta.values()) == pytest.approx(after["all"] - before["all"])
