"""The node's state machine: one table ``(state, event) -> next state`` (stdlib only).

Every state change of ``ServeNode`` goes through ``next_state``. A pair whose entry is the state
itself is a transition to the same state (the node re-enters it: nothing is logged or counted);
a pair whose entry is None is ignored (the event has no effect in that state).

    state \\ event  ARM      DISARM  ESTOP      GOOD_STATE  MISSES     STALE      RESYNC     ERROR
    IDLE           ARMED    IDLE    SAFE_STOP  -           -          -          -          FAULT
    ARMED          -        IDLE    SAFE_STOP  RUNNING     -          -          SAFE_STOP  FAULT
    RUNNING        -        IDLE    SAFE_STOP  -           SAFE_STOP  SAFE_STOP  SAFE_STOP  FAULT
    SAFE_STOP      ARMED    IDLE    SAFE_STOP  -           -          -          -          FAULT
    FAULT          refused  -       FAULT      -           -          -          -          FAULT

FAULT (an internal error) is left only by a restart of the node: it answers with the safe command
until then, and an e-stop there is accepted (the node already sends the safe command) but does not
open a way back to ARM.
"""

from __future__ import annotations

from enum import Enum

from qsm_robot.serve.protocol import NodeState


class Event(Enum):
    ARM = "arm"                 # an operator's ARM (or --arm at start)
    DISARM = "disarm"           # an operator's DISARM
    ESTOP = "e-stop"            # an operator's ESTOP
    GOOD_STATE = "good state"   # a usable state was answered (in ARMED: the first one since arming)
    MISSES = "misses"           # max_consecutive_misses deadline misses or bad actions in a row
    STALE = "stale"             # max_consecutive_stale stale or invalid states in a row, or no fresh state
    RESYNC = "re-sync"          # max_consecutive_stale states in a row rejected for their seq or clock
    ERROR = "internal error"    # an exception inside the loop


S = NodeState
TRANSITIONS: dict[tuple[NodeState, Event], NodeState | None] = {
    (S.IDLE, Event.ARM): S.ARMED,
    (S.IDLE, Event.DISARM): S.IDLE,
    (S.IDLE, Event.ESTOP): S.SAFE_STOP,
    (S.IDLE, Event.GOOD_STATE): None,
    (S.IDLE, Event.MISSES): None,
    (S.IDLE, Event.STALE): None,
    (S.IDLE, Event.RESYNC): None,
    (S.IDLE, Event.ERROR): S.FAULT,

    (S.ARMED, Event.ARM): None,
    (S.ARMED, Event.DISARM): S.IDLE,
    (S.ARMED, Event.ESTOP): S.SAFE_STOP,
    (S.ARMED, Event.GOOD_STATE): S.RUNNING,
    (S.ARMED, Event.MISSES): None,
    (S.ARMED, Event.STALE): None,
    (S.ARMED, Event.RESYNC): S.SAFE_STOP,
    (S.ARMED, Event.ERROR): S.FAULT,

    (S.RUNNING, Event.ARM): None,
    (S.RUNNING, Event.DISARM): S.IDLE,
    (S.RUNNING, Event.ESTOP): S.SAFE_STOP,
    (S.RUNNING, Event.GOOD_STATE): None,
    (S.RUNNING, Event.MISSES): S.SAFE_STOP,
    (S.RUNNING, Event.STALE): S.SAFE_STOP,
    (S.RUNNING, Event.RESYNC): S.SAFE_STOP,
    (S.RUNNING, Event.ERROR): S.FAULT,

    (S.SAFE_STOP, Event.ARM): S.ARMED,
    (S.SAFE_STOP, Event.DISARM): S.IDLE,
    (S.SAFE_STOP, Event.ESTOP): S.SAFE_STOP,
    (S.SAFE_STOP, Event.GOOD_STATE): None,
    (S.SAFE_STOP, Event.MISSES): None,
    (S.SAFE_STOP, Event.STALE): None,
    (S.SAFE_STOP, Event.RESYNC): None,
    (S.SAFE_STOP, Event.ERROR): S.FAULT,

    (S.FAULT, Event.ARM): None,            # refused: the node logs it and arm() returns False
    (S.FAULT, Event.DISARM): None,
    (S.FAULT, Event.ESTOP): S.FAULT,       # stays: only a restart leaves FAULT
    (S.FAULT, Event.GOOD_STATE): None,
    (S.FAULT, Event.MISSES): None,
    (S.FAULT, Event.STALE): None,
    (S.FAULT, Event.RESYNC): None,
    (S.FAULT, Event.ERROR): S.FAULT,
}
del S


def next_state(state: NodeState, event: Event) -> NodeState | None:
    """The state after ``event`` in ``state``; None: the event is ignored there."""
    return TRANSITIONS[(state, event)]
