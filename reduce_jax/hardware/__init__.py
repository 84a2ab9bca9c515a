"""The simulated accelerator: the systolic array's PE mapping, fault masks and rate measures
(`systolic`), and the fault models and fault-map files (`faults`)."""
