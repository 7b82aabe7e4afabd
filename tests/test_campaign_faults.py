"""The fast part of campaigns/faults.py: qsm-serve and qsm-sim as separate processes on a small
model at 100 Hz. kill -9 of the robot -> the node safe-stops within its configured periods; a
restarted robot is served again after one ARM; a restarted node serves the robot again; injected
latency spikes are misses answered by fallbacks, and consecutive ones safe-stop the node.
(kill -9 of the node -> the robot's watchdog is tests/test_closed_loop.py's.)"""

import json

import pytest
from conftest import profile_data

from campaigns.faults import fault_kill_robot, fault_restart_robot, fault_restart_serve, fault_spikes, fault_spikes_consecutive

PERIOD_MS = 10.0
STALE_PERIODS, MAX_STALE, MAX_MISSES, BUDGET_MS = 3, 10, 10, 2.0
PROFILE = profile_data(
    "faults-test", rate_hz=1e3 / PERIOD_MS, latency_budget_ms=BUDGET_MS, require_calibration=False,
    stale_periods=STALE_PERIODS, max_consecutive_misses=MAX_MISSES, max_consecutive_stale=MAX_STALE,
    max_delta_per_tick=None, robot={"watchdog_periods": 5, "episode_steps": 1000},
)  # endpoints: each fault run puts private ipc endpoints into its copy


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "base.json"
    path.write_text(json.dumps(PROFILE))
    return path


def test_kill_9_of_the_robot_safe_stops_the_node_within_its_configured_periods(tiny_model, profile, tmp_path):
    row = fault_kill_robot(tiny_model, tmp_path / "w", profile)
    limit_ms = (STALE_PERIODS + MAX_STALE) * PERIOD_MS
    assert row["limit_ms"] == limit_ms
    # The SAFE_STOP lies between the last poll that saw RUNNING (value_ms) and the first reply in
    # SAFE_STOP (upper_ms); polls come back to back, so that window is normally well under a
    # period, but this VM has descheduled the polling process for 10.6 ms at that moment once (a
    # fresh-clone CI with nothing else running): the measurement's own resolution, not the node's.
    assert row["upper_ms"] - row["value_ms"] < 2 * PERIOD_MS, row["notes"]
    # The node decides on its own absolute schedule: that decision must fall inside the limit. Seen
    # from outside, the switch can come later by however long the node was descheduled (8 ms once
    # on this 2-vCPU VM): up to one period of that is the machine's, not the node's.
    assert row["node_reported_ms"] <= limit_ms, row["notes"]
    assert row["value_ms"] <= limit_ms + PERIOD_MS, row["notes"]
    # Not early either: the node safe-stops at its last once-a-period check inside the limit
    # (at least one period before it), and the last state came up to a period before the kill.
    assert row["upper_ms"] > (STALE_PERIODS + MAX_STALE - 3) * PERIOD_MS, row["notes"]
    assert row["reason"].startswith("no fresh state for") and row["pass"], row["notes"]


def test_a_restarted_robot_is_served_again_after_one_arm(tiny_model, profile, tmp_path):
    row = fault_restart_robot(tiny_model, tmp_path / "w", profile)
    assert row["pass"], row["notes"]
    assert row["value_ms"] <= STALE_PERIODS * PERIOD_MS and row["end_state"] == "RUNNING"
    assert row["trips_after_arm"] == 0
    assert row["policy_commands_after_arm"] >= 0.9 * row["ticks_after_arm"] > 0
    assert row["robot_commands_applied"] >= 0.95 * row["robot_steps"]


@pytest.fixture(scope="module")
def restart_serve_row(tiny_model, profile, tmp_path_factory):
    return fault_restart_serve(tiny_model, tmp_path_factory.mktemp("restart-serve"), profile)


def test_a_restarted_node_brings_the_robots_commands_back(restart_serve_row):
    row = restart_serve_row
    assert row["value_ms"] is not None, row["notes"]  # the robot's watchdog cleared after the restart
    assert row["value_ms"] <= row["limit_ms"], row["notes"]
    # Fresh policy commands flow again (after at most the one ARM the campaign sends if needed).
    assert row["end_state"] == "RUNNING" and row["policy_fraction_last_0_5s"] >= 0.9, row["notes"]


def test_a_restarted_node_resyncs_by_itself_without_acting_on_old_states(restart_serve_row):
    row = restart_serve_row
    assert row["stale_states_acted_on"] == 0, row["notes"]
    assert row["settled_state"] == "RUNNING", row["notes"]


def test_latency_spikes_beyond_the_budget_are_misses_answered_by_fallbacks(tiny_model, profile, tmp_path):
    row = fault_spikes(tiny_model, tmp_path / "w", profile, every=20, run_s=2.0)
    assert row["spike_ms"] == 3 * BUDGET_MS
    assert row["injected_stalls"] >= 5 and row["stalled_ticks"] == row["injected_stalls"], row["notes"]
    assert row["stalled_misses_with_fallback"] == row["injected_stalls"], row["notes"]
    assert row["misses_with_fallback"] == row["flight_misses"] == row["misses"], row["notes"]
    assert row["internal_errors"] == 0 and row["final_state"] == "RUNNING", row["notes"]
    assert row["robot_trips_in_run"] == 0 and row["pass"], row["notes"]


def test_a_spike_on_every_call_safe_stops_the_node_after_max_consecutive_misses(tiny_model, profile, tmp_path):
    row = fault_spikes_consecutive(tiny_model, tmp_path / "w", profile)
    assert row["misses"] == MAX_MISSES, row["notes"]
    # a miss without a stall only when the VM descheduled the node past a state's whole budget
    assert row["injected_stalls"] + row["natural_misses"] == MAX_MISSES, row["notes"]
    assert row["injected_stalls"] >= MAX_MISSES - 2, row["notes"]
    assert row["misses_with_fallback"] == MAX_MISSES and row["internal_errors"] == 0, row["notes"]
    assert row["final_state"] == "SAFE_STOP" and row["pass"], row["notes"]
