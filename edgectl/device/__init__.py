"""The device stage: reach a board or phone (over the system's ssh) and report what it can run."""
