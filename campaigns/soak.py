"""Soak: qsm-serve against qsm-sim for minutes at the profile's rate: memory, rate, latency, misses.

    python -m campaigns.soak [--model deploy/models/cartpole-ref-k1.onnx]
                             [--profile deploy/profiles/cartpole-500hz.json] [--minutes 10] [--sample-s 5]

(from the repository root; ``python campaigns/soak.py`` works too).
``qsm-serve run --arm`` and ``qsm-sim`` (episodes of the profile's episode_steps, as many as the
soak needs) run as separate processes on a copy of the profile with private ipc endpoints. The node's
resident memory (RSS) is sampled every --sample-s seconds; every minute (and at the end) a row
records: the node's RSS and its growth, the states answered in the window and the rate they make,
the misses, fallbacks and stale states in the window, and the node's latency (state received ->
command sent) p50/p99/max over its last 5000 ticks, from its status reply. At the end both get
SIGTERM; the node's summary JSON gives the whole run's latency (p50/p99/p99.9/max), misses and
fallbacks, the robot's report its achieved rate, latency (state sent -> command received) and late
ticks.

Pass criteria: RSS growth from the minute-1 sample to the end under 5% (from the first sample
when the soak is shorter than 2 minutes); the robot's achieved rate within 0.5% of the profile's;
every miss answered by a fallback (per tick in the flight record, which holds the last
flight_record_ticks ticks; fallbacks >= misses in every window and in the whole-run counters); no
internal error, never FAULT; and the node RUNNING at every sample (no safe-stop). The processes
are run as faults.py runs them; the checks on misses, fallbacks and faults are invariants.py's.

Prints the table, writes benchmarks/results/soak_<time>.csv (the minute rows and a whole-run row;
work files in benchmarks/results/soak-<time>/), exits 1 if a criterion fails.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # python campaigns/soak.py: the repo root on sys.path
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import sys
import time
from pathlib import Path

from campaigns.faults import DEFAULT_PROFILE, FaultError, Session, start_running, stop
from campaigns.harness import DEFAULT_MODEL, RESULTS, load_inputs, print_table, rss_kib, status, write_csv
from campaigns.invariants import fallback_problems, fallbacks_cover_misses, flight_counts, health_problems

RSS_GROWTH_PCT, RATE_TOL_PCT = 5.0, 0.5
COLUMNS = ["minute", "node_state", "rss_kib", "rss_max_kib", "rss_growth_pct", "rate_hz", "ticks", "misses",
           "fallbacks", "stale", "p50_us", "p99_us", "max_us"]


def soak(model: Path, work_dir: Path, profile_path: Path, minutes: float, sample_s: float, log=print) -> dict:
    """Run the soak; returns {"rows", "run" (whole-run row), "summary", "robot", "ticks", "samples", "profile"}."""
    s = Session(model, work_dir, profile_path)
    rows, samples = [], []
    try:
        serve, sim, _ = start_running(s, run_s=0.0)
        pid = serve.proc.pid
        t0 = time.monotonic()
        prev = {"t": t0, **status(s.control)}
        samples.append((0.0, rss_kib(pid)))
        end = minutes * 60.0
        events = sorted({round(k * sample_s, 6) for k in range(1, int(end / sample_s) + 1)}
                        | {60.0 * m for m in range(1, int(end // 60) + 1)} | {end})
        window_start = 0
        for at in events:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            s.check_alive()
            samples.append((at, rss_kib(pid)))
            if not (at % 60.0 == 0 or at == end):
                continue
            st = {"t": time.monotonic(), **status(s.control)}
            dt = st["t"] - prev["t"]
            window = [r for _, r in samples[window_start:]]
            window_start = len(samples)
            rows.append({"minute": round(at / 60.0, 2), "elapsed_s": round(st["t"] - t0, 1), "node_state": st["node_state"],
                         "rss_kib": samples[-1][1], "rss_max_kib": max(window),
                         "ticks": int(st["ticks"] - prev["ticks"]), "rate_hz": round((st["ticks"] - prev["ticks"]) / dt, 2),
                         "misses": int(st["misses"] - prev["misses"]), "fallbacks": int(st["fallbacks"] - prev["fallbacks"]),
                         "stale": int(st["stale"] - prev["stale"]), "p50_us": round(st["p50_us"], 1),
                         "p99_us": round(st["p99_us"], 1), "max_us": round(st["max_us"], 1)})
            log(f"soak: minute {rows[-1]['minute']}: {rows[-1]['node_state']}, RSS {rows[-1]['rss_kib']} KiB, "
                f"{rows[-1]['rate_hz']} Hz, misses {rows[-1]['misses']}, p99 {rows[-1]['p99_us']} us")
            prev = st
        stop(serve, sim)
        summary, ticks = s.serve_outputs("rec")
        robot = s.robot_report("robot")
    finally:
        s.close()
    base_rss = rows[0]["rss_kib"] if minutes >= 2 else samples[0][1]
    for r in rows:
        r["rss_growth_pct"] = round(100.0 * (r["rss_kib"] / base_rss - 1), 3)
    lat, rlat = summary.get("node_latency_us", {}), robot.get("latency_us", {})
    run = {"minute": "run", "node_wall_s": summary.get("wall_s"), "node_state": summary["final_state"],
           "rss_kib": samples[-1][1], "rss_max_kib": max(r for _, r in samples),
           "rss_growth_pct": round(100.0 * (samples[-1][1] / base_rss - 1), 3),
           "ticks": summary["states_answered"], "rate_hz": round(robot["achieved_rate_hz"], 3),
           "misses": summary["misses"], "fallbacks": summary["fallbacks"], "stale": summary["stale"],
           "p50_us": lat.get("p50"), "p99_us": lat.get("p99"), "max_us": lat.get("max"), "p99.9_us": lat.get("p99.9"),
           "node_mean_rate_hz": summary.get("mean_rate_hz"),
           **{f"robot_{k}_us": round(v, 1) for k, v in rlat.items()},
           "robot_steps": robot["steps"], "robot_late": robot["commands_late"], "robot_ticks_late": robot["ticks_late"],
           "robot_watchdog_trips": robot["watchdog_trips"], "internal_errors": summary["internal_errors"],
           "safe_stops": summary.get("safe_stops"), "rss_baseline_kib": base_rss}
    return {"rows": rows, "run": run, "summary": summary, "robot": robot, "ticks": ticks, "samples": samples,
            "profile": s.profile}


def criteria(result: dict, minutes: float) -> list[tuple[str, bool, str]]:
    rows, run, summary, p = result["rows"], result["run"], result["summary"], result["profile"]
    fc = flight_counts(result["ticks"])
    rate_err = 100.0 * (run["rate_hz"] / p.rate_hz - 1)
    bad_windows = [r["minute"] for r in rows if not fallbacks_cover_misses(r)]
    states = sorted({r["node_state"] for r in rows})
    base = "the minute-1 sample" if minutes >= 2 else "the first sample (soak shorter than 2 minutes)"
    return [
        (f"RSS growth < {RSS_GROWTH_PCT:g}%", run["rss_growth_pct"] < RSS_GROWTH_PCT,
         f"{run['rss_growth_pct']:+.2f}% ({run['rss_baseline_kib']} -> {run['rss_kib']} KiB, from {base}; max "
         f"{run['rss_max_kib']} KiB)"),
        (f"achieved rate within {RATE_TOL_PCT:g}% of {p.rate_hz:g} Hz", abs(rate_err) <= RATE_TOL_PCT,
         f"robot {run['rate_hz']:.3f} Hz ({rate_err:+.3f}%); node answered {run['node_mean_rate_hz']} Hz"),
        ("every miss answered by a fallback",
         not fallback_problems(fc) and not bad_windows and fallbacks_cover_misses(summary),
         f"flight record (last {fc['ticks']} ticks): {fc['misses_with_fallback']}/{fc['misses']} misses with a fallback; "
         f"whole run: {summary['misses']} misses, {summary['fallbacks']} fallbacks; windows with fewer fallbacks "
         f"than misses: {bad_windows or 'none'}"),
        ("no internal error, never FAULT",
         not health_problems(summary, states),
         f"internal errors {summary['internal_errors']}, final state {summary['final_state']}, states seen {states}"),
        ("RUNNING throughout (no safe-stop)", states == ["RUNNING"] and not summary.get("safe_stops"),
         f"states at the samples {states}, safe-stops {summary.get('safe_stops')} {summary.get('safe_stop_reasons', [])[:2]}"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX policy (task of the profile)")
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="deployment profile (endpoints are replaced)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sample period, seconds")
    args = p.parse_args(argv)
    profile = load_inputs("soak.py", args.model, args.profile)
    if args.minutes <= 0 or args.sample_s <= 0:
        p.error("--minutes and --sample-s must be > 0")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RESULTS / f"soak-{stamp}"
    print(f"soak: {args.model} on {profile.name} ({profile.rate_hz:g} Hz) for {args.minutes:g} min, RSS every "
          f"{args.sample_s:g} s; work files in {work}", file=sys.stderr)
    try:
        result = soak(args.model, work, args.profile, args.minutes, args.sample_s,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    except (FaultError, OSError, RuntimeError) as exc:
        print(f"soak.py: error: the soak could not run to its end: {exc}", file=sys.stderr)
        return 1
    rows, run = result["rows"], result["run"]
    print()
    print_table(rows + [run], COLUMNS)
    rates = [r["rate_hz"] for r in rows]
    p99s = [r["p99_us"] for r in rows]
    print(f"\nper-minute rate {min(rates):.2f}-{max(rates):.2f} Hz; node p99 {min(p99s):.0f}-{max(p99s):.0f} us "
          f"(median {statistics.median(p99s):.0f}); whole run node p50/p99/p99.9/max {run['p50_us']}/{run['p99_us']}/"
          f"{run['p99.9_us']}/{run['max_us']} us; robot latency p50/p99/p99.9/max {run.get('robot_p50_us')}/"
          f"{run.get('robot_p99_us')}/{run.get('robot_p99.9_us')}/{run.get('robot_max_us')} us, late "
          f"{run['robot_late']} of {run['robot_steps']} ticks, watchdog trips {run['robot_watchdog_trips']}")
    checks = criteria(result, args.minutes)
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    out = RESULTS / f"soak_{stamp}.csv"
    write_csv(out, rows + [run])
    print(f"wrote {out}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
