"""The simulated robot node (qsm-sim): a dm_control task's physics behind the control protocol."""
