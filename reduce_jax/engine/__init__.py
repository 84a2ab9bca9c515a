"""The population engine: the fault-aware training step and evaluation over chips (`train`),
the driver that runs a population chunk by chunk with per-chip budgets (`population`), and
resumable progress, meters and timers (`progress`)."""
