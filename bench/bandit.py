"""Thompson allocation against the fixed equal split, on simulated users with known like rates.

Users arrive in batches, one batch per weight update. Each new user is assigned an arm by the current
weights (a uniform draw against their cumulative sum, as a salted hash of the user id would be) and keeps
it; they see 1 + Poisson(2) images and like each with their own rate: the arm's like rate times a user
factor ~ Gamma(4, 1/4) (mean 1, sd 0.5; some users like more than others, whatever the arm), so an
arm's images are clustered by user as in production. Every policy sees the SAME user stream per seed
(same users, image counts, user factors, assignment draws and like draws: common random numbers); only
the arms differ. ``thompson`` runs a burn-in on the equal split until every arm has ``--burn-in`` users,
then :func:`deskgen.experiments.bandit.allocate` recomputes the weights before each batch from every
user so far (floor 1 %); ``top-two`` is the same with ``top_two=True``.

Reported per scenario and policy: the share of all images served by the best arm, the regret (expected
likes lost against always serving the best arm: the sum over images of best rate - arm rate), its
reduction against the fixed split on the same seeds, and whether the arm with the highest p_best at the
end is the true best.

    python -m bench.bandit [--seeds 20] [--updates 30] [--batch 200] [--only 3,7] [--no-write]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.common import Table, append_report, command_line, machine, parse_choices, render_section
from deskgen.experiments.bandit import ArmEvidence, allocate, p_best
from deskgen.experiments.stats import ratio_estimate

#: name -> the arms' like rates; the best arm is the last.
SCENARIOS: dict[str, tuple[float, ...]] = {
    "3": (0.10, 0.12, 0.15),
    "7": (0.10, 0.10, 0.11, 0.11, 0.12, 0.13, 0.15),
}
POLICIES = ("fixed", "thompson", "top-two")
#: The updates at which the weights-over-time table shows the best arm's share of new users.
SHOWN_UPDATES = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30)


@dataclass(frozen=True)
class Stream:
    """One seed's users: everything random about them, whatever arm they get."""

    images: np.ndarray  # (users,) images each user sees
    assign: np.ndarray  # (users,) uniform draw that picks the arm from the weights
    likes: np.ndarray  # (users, arms) likes the user gives if in that arm (same like draws for every arm)


def stream(seed: int, rates: Sequence[float], users: int) -> Stream:
    rng = np.random.default_rng(seed)
    images = 1 + rng.poisson(2.0, size=users)
    factor = rng.gamma(4.0, 0.25, size=users)
    assign = rng.random(users)
    draws = rng.random((users, int(images.max())))
    shown = np.arange(draws.shape[1])[None, :] < images[:, None]
    likes = np.stack([((draws < np.minimum(1.0, rate * factor)[:, None]) & shown).sum(axis=1) for rate in rates],
                     axis=1)  # fmt: skip
    return Stream(images, assign, likes)


@dataclass
class Run:
    best_image_share: float
    regret: float
    leader_is_best: bool
    p_best_of_best: float
    best_weight: list[float]  # the best arm's share of new users at each update
    design_effects: list[float]  # per arm at the end


def run(policy: str, s: Stream, rates: Sequence[float], *, seed: int, updates: int, batch: int, burn_in: int,
        floor: float, draws: int) -> Run:  # fmt: skip
    arms = [f"arm{i}" for i in range(len(rates))]
    split = {a: 1.0 for a in arms}
    floors = {a: floor for a in arms}
    best = int(np.argmax(rates))
    assigned = np.full(len(s.images), -1)

    def evidence(upto: int) -> dict[str, ArmEvidence]:
        out = {}
        for k, arm in enumerate(arms):
            idx = np.flatnonzero(assigned[:upto] == k)
            out[arm] = ArmEvidence(s.likes[idx, k].tolist(), s.images[idx].tolist())
        return out

    best_weight = []
    for update in range(updates):
        lo, hi = update * batch, (update + 1) * batch
        if policy == "fixed":
            weights = {a: 1.0 / len(arms) for a in arms}
        else:
            weights = allocate("thompson", evidence(lo), split, burn_in_users=burn_in, floors=floors,
                               seed=seed * 1000 + update, draws=draws, top_two=policy == "top-two").weights  # fmt: skip
        best_weight.append(weights[arms[best]])
        edges = np.cumsum([weights[a] for a in arms])
        assigned[lo:hi] = np.minimum(np.searchsorted(edges, s.assign[lo:hi] * edges[-1], side="right"),
                                     len(arms) - 1)  # fmt: skip
    n = len(s.images)
    served = np.asarray(rates)[assigned[:n]]
    final = evidence(n)
    pb = p_best(final, seed=seed * 1000 + updates, draws=draws)
    leader = max(pb, key=pb.__getitem__)
    deffs = [ratio_estimate(ev.events, ev.exposures).design_effect for ev in final.values() if len(ev.events) > 1]
    return Run(
        best_image_share=float(s.images[assigned == best].sum() / s.images.sum()),
        regret=float((s.images * (max(rates) - served)).sum()),
        leader_is_best=leader == arms[best],
        p_best_of_best=pb[arms[best]],
        best_weight=best_weight,
        design_effects=deffs,
    )


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def spread(values: Sequence[float], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return f"{fmt.format(scale * float(np.mean(values)))} ({fmt.format(scale * min(values))}–{fmt.format(scale * max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--updates", type=int, default=30, help="weight updates, one batch of users each")
    parser.add_argument("--batch", type=int, default=200, help="new users per batch")
    parser.add_argument("--burn-in", type=int, default=100, help="users per arm before thompson starts")
    parser.add_argument("--floor", type=float, default=0.01)
    parser.add_argument("--draws", type=int, default=20_000, help="Monte-Carlo draws of p_best")
    parser.add_argument("--only", help=f"some of {list(SCENARIOS)} (arms)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    started = time.perf_counter()
    users = args.updates * args.batch
    results = Table(
        f"Bandit vs fixed split: {args.updates} updates x {args.batch} new users, {args.seeds} seeds "
        f"(the same user stream for every policy)",
        ["arms (like rates)", "policy", "images on the best arm, mean (min–max)",
         "regret: likes lost, mean (min–max)", "regret vs fixed, mean (min–max)", "final p_best leader is the best",
         "p_best of the best at the end, mean"],
    )  # fmt: skip
    over_time = Table("Best arm's share of new users by update (mean over seeds)",
                      ["arms", "policy", *[f"u{u}" for u in SHOWN_UPDATES if u <= args.updates]])  # fmt: skip
    deffs: list[float] = []
    images_per_run: list[float] = []
    for name in parse_choices(args.only, list(SCENARIOS), option="--only"):
        rates = SCENARIOS[name]
        runs: dict[str, list[Run]] = {p: [] for p in POLICIES}
        for seed in range(args.seeds):
            s = stream(seed, rates, users)
            images_per_run.append(float(s.images.sum()))
            for policy in POLICIES:
                runs[policy].append(run(policy, s, rates, seed=seed, updates=args.updates, batch=args.batch,
                                        burn_in=args.burn_in, floor=args.floor, draws=args.draws))  # fmt: skip
        deffs += [d for r in runs["fixed"] for d in r.design_effects]
        fixed_regret = [r.regret for r in runs["fixed"]]
        label = f"{len(rates)} ({' '.join(f'{r:.2f}' for r in rates)})"
        for policy, rs in runs.items():
            reduction = [1.0 - r.regret / f for r, f in zip(rs, fixed_regret, strict=True)]
            overall = 1.0 - float(np.mean([r.regret for r in rs]) / np.mean(fixed_regret))
            results.add(
                label, policy, spread([r.best_image_share for r in rs], "{:.1f} %", 100.0),
                spread([r.regret for r in rs], "{:.0f}"),
                "-" if policy == "fixed" else f"{pct(overall)} ({pct(min(reduction))}–{pct(max(reduction))})",
                f"{sum(r.leader_is_best for r in rs)} / {len(rs)}", f"{np.mean([r.p_best_of_best for r in rs]):.3f}",
            )  # fmt: skip
            over_time.add(len(rates), policy,
                          *[pct(float(np.mean([r.best_weight[u - 1] for r in rs]))) for u in SHOWN_UPDATES
                            if u <= args.updates])  # fmt: skip
    results.notes += [
        f"{users:,} users per run, {np.mean(images_per_run):,.0f} images on average; each user sees 1 + Poisson(2) "
        "images and likes each with the arm's rate times a user factor ~ Gamma(4, 1/4); users keep their arm",
        f"thompson: burn-in on the equal split until every arm has {args.burn_in} users, then floor "
        f"{args.floor:g} + the rest by p_best ({args.draws:,} draws), recomputed before every batch from all "
        "users so far; top-two: top_two=True (half of the non-floor traffic to the leader, half to its challenger)",
        "regret = sum over images of (best rate - rate of the image's arm): expected likes lost against serving "
        "the best arm to everyone; regret vs fixed = 1 - regret / regret of the fixed split (pooled over "
        "seeds; the range is per seed)",
        f"clustering by user in this data: design effect per arm at the end of the fixed runs {np.mean(deffs):.2f} "
        f"on average ({min(deffs):.2f}–{max(deffs):.2f}), so n_eff is ~{100 / np.mean(deffs):.0f} % of the images",
    ]  # fmt: skip
    section = render_section("Bandit allocation (issue 22)", [results, over_time], command=command_line(),
                             wall_s=time.perf_counter() - started, host=machine())  # fmt: skip
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
