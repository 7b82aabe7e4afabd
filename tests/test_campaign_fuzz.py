"""The fast part of campaigns/fuzz.py: every attack class, a few thousand messages in all, against
qsm-serve on the tiny model with qsm-sim as the legitimate robot (one robot run for all classes)."""

import numpy as np
import zmq

from campaigns.attacks import ATTACKS, CLASS_NAMES, MIN_PER_CLASS, allocate, frame
from campaigns.fuzz import Monitor, build_profile, run_campaign
from campaigns.invariants import RateCheck
from qsm_robot.serve import protocol as P

EXACT_CONTROL = ("c_random_bytes", "c_multipart", "c_wrong_type")
"""Control-channel classes the node reads one by one (no conflation): each message is one malformed."""


def test_allocation_covers_every_class_and_the_total():
    counts = allocate(3000, ATTACKS)
    assert set(counts) == set(CLASS_NAMES) and min(counts.values()) >= MIN_PER_CLASS
    assert sum(counts.values()) >= 3000
    assert sum(allocate(100_000, ATTACKS).values()) == 100_000


def test_profile_turns_the_rate_limiter_on_and_keeps_endpoints_private(tmp_path):
    endpoints = {k: f"ipc://{tmp_path}/{k}.sock" for k in ("state", "command", "control")}
    p = build_profile(100, endpoints, None)
    assert p["max_delta_per_tick"] == [0.2] and p["endpoints"] == endpoints and p["check_control_period"]
    p = build_profile(500, endpoints, 0.1)
    assert p["max_delta_per_tick"] == [0.1] and not p["check_control_period"] and p["latency_budget_ms"] <= 1.0
    assert build_profile(100, endpoints, 0)["max_delta_per_tick"] is None


def test_the_monitor_flags_bad_commands_and_the_rate_check_catches_a_jump(tmp_path):
    ctx = zmq.Context()
    mon = Monitor(ctx, f"ipc://{tmp_path}/none.sock", [-1.0], [1.0])
    try:
        mon._take(P.encode(P.MsgType.COMMAND, 1, [0.5], ref=1))
        mon._take(P.encode(P.MsgType.COMMAND, 2, [1.5], ref=2))  # out of bounds
        mon._take(P.encode(P.MsgType.COMMAND, 3, [np.nan], ref=3))
        mon._take(P.encode(P.MsgType.COMMAND, 4, [0.0, 0.0], ref=4))  # wrong size
        mon._take(frame(P.MsgType.COMMAND, [0.0], count=2))  # malformed frame
        mon._take(P.encode(P.MsgType.STATUS, 5, [0.0]))
        assert len(mon.bad) == 5 and mon.last_ref == 4
    finally:
        mon.sock.close(0)
        ctx.term()
    c = lambda seq, v, flags=0, ref=None: (seq, seq, seq if ref is None else ref, flags, np.array([v]))  # noqa: E731
    check, cmds = RateCheck([0.2]), [c(1, 0.0), c(2, 0.2), c(3, 0.5), c(4, 0.0, flags=int(P.CommandFlag.SAFE)), c(5, 0.1)]
    out = check.run(cmds)  # run() takes the growing list and checks what is new
    assert out["rate_viol"] == 1 and out["rate_checked"] == 3  # 0.2 -> 0.5 jumps; the SAFE command may jump
    cmds += [c(6, 0.3), c(8, 0.9)]
    out = check.run(cmds)  # 5 -> 6 is contiguous; 6 -> 8 lost a command, so it cannot be judged
    assert out["rate_viol"] == 0 and out["rate_checked"] == 1 and out["rate_unverified_exceed"] == 1
    # The robot's view: commands answering its seqs 20 and 21 differ by more than the limit.
    out = RateCheck([0.2]).run([c(1, 0.0, ref=20), c(2, 0.2, ref=0), c(3, 0.4, ref=21)])
    assert out["rate_viol"] == 0 and out["robot_view_exceed"] == 1


def test_fuzz_campaign_every_class_no_crash_no_violation(tiny_model, tmp_path):
    result = run_campaign(tiny_model, tmp_path, messages=3000, seed=1, rate_hz=100, baseline_s=1.0, flood_s=0.3,
                          min_class_s=0.2, robot_per_class=False, log=lambda m: None)
    rows = {r["class"]: r for r in result["rows"]}
    t = result["totals"]
    assert set(CLASS_NAMES) <= set(rows) and rows["baseline"]["messages"] == 0
    assert t["messages"] >= 3000
    failed = {c: r["notes"] for c, r in rows.items() if not r["alive"] or r["violations"] or not r["expect_ok"]}
    assert not failed
    assert t["crashes"] == 0 and t["violations"] == 0 and t["internal_errors"] == 0 and t["exit_codes"] == [0]
    assert t["rate_checked"] > 100  # the rate limit was checked on real consecutive commands
    assert rows["baseline"]["legit_frac"] > 0.5  # the loop ran before the attack
    # Deterministic counters: each control message is read and counted as malformed exactly once.
    for name in EXACT_CONTROL:
        assert rows[name]["d_malformed"] == rows[name]["messages"] >= MIN_PER_CLASS
    bad_header = rows["c_bad_header"]  # another version is counted apart from malformed
    assert bad_header["d_malformed"] + bad_header["d_wrong_version"] == bad_header["messages"] >= MIN_PER_CLASS
    assert bad_header["d_wrong_version"] > 0
    assert rows["c_heartbeat_payload"]["d_malformed"] == rows["c_heartbeat_payload"]["messages"]  # no payload allowed
    assert rows["c_oversize"]["d_malformed"] == 0 and rows["s_oversize"]["d_malformed"] == 0  # dropped by ZeroMQ unread
    # The state channel conflates: at least some frames were evaluated, never more than were sent.
    for name in ("s_random_bytes", "s_truncated", "s_bad_magic", "s_reserved_nonzero", "s_unknown_type",
                 "s_count_mismatch", "s_wrong_type", "s_flood_garbage"):
        assert 0 < rows[name]["d_malformed"] <= rows[name]["messages"]
    assert 0 < rows["s_bad_version"]["d_wrong_version"] <= rows["s_bad_version"]["messages"]
    assert rows["s_bad_version"]["d_malformed"] == 0
    for name in ("s_nan", "s_inf", "s_wrong_size"):
        assert rows[name]["d_state_invalid"] > 0 and rows[name]["d_malformed"] == 0
    for name in ("s_huge_1e30", "s_denormal", "s_replayed_seq", "s_out_of_order_seq"):
        assert rows[name]["d_state_invalid"] == 0 and rows[name]["d_malformed"] == 0
    assert result["summary"]["replayed"] > 0  # replayed and out-of-order seqs were dropped, and counted
