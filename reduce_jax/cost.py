"""Per-chip results and the cost of Reduce against retraining every chip a fixed amount."""

from __future__ import annotations

import math

import numpy as np

from reduce_jax import resilience

CHIP_STATUSES = ("ok", "missed_target", "above_grid", "unrecoverable", "diverged")


def chip_records(
    rates: dict[str, np.ndarray],
    status: np.ndarray,
    budgets: np.ndarray,
    result: dict[str, np.ndarray],
    target: float,
    steps_per_epoch: int,
    served_by: dict[int, int] | None = None,
    grouped: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """One record per chip (the ``chips`` entries of ``summary.json``).

    Args:
      rates: measure -> ``float[chips]`` (each becomes ``<measure>_fault_rate``).
      status: ``int[chips]`` from ``resilience.retraining_amount``.
      budgets: ``int[chips]`` selected steps (0 where not retrained).
      result: ``accuracy_before``, ``accuracy_after`` (of the model that served the chip, on
        the chip), ``topup_steps`` (the chip's own top-ups, when retrained on its own),
        ``diverged`` over chips.
      target: the accuracy target.
      steps_per_epoch: to express steps in epochs.
      served_by: grouped runs: chip -> index of the group whose retraining served it.
      grouped: grouped runs: ``accuracy_after`` and ``diverged`` over chips of the group
        model that served each chip, on the chip.

    Returns:
      Dicts with ``status`` one of ``CHIP_STATUSES``: ``ok`` (meets the target),
      ``missed_target`` (retrained and topped up to the cap, still below the target),
      ``above_grid`` / ``unrecoverable`` (not retrained), ``diverged`` (non-finite training).
      These describe per-chip Reduce. Grouped runs add ``group`` (None: not retrained),
      ``grouped_accuracy_after`` and ``grouped_meets_target``.
    """
    records = []
    for i in range(len(status)):
        selected = int(status[i]) == resilience.OK
        diverged = bool(result["diverged"][i])
        meets = bool(result["accuracy_after"][i] >= target) and not diverged
        if diverged:
            name = "diverged"
        elif selected:
            name = "ok" if meets else "missed_target"
        else:
            name = resilience.STATUS_NAMES[int(status[i])]
        records.append(
            dict(
                chip=i,
                **{f"{m}_fault_rate": float(r[i]) for m, r in rates.items()},
                status=name,
                selected_epochs=float(budgets[i] / steps_per_epoch) if selected else None,
                selected_steps=int(budgets[i]) if selected else None,
                topup_epochs=float(result["topup_steps"][i] / steps_per_epoch),
                topup_steps=int(result["topup_steps"][i]),
                accuracy_before=float(result["accuracy_before"][i]),
                accuracy_after=float(result["accuracy_after"][i]),
                meets_target=meets,
            )
        )
        if grouped is not None:
            group = (served_by or {}).get(i)
            acc = float(grouped["accuracy_after"][i])
            records[-1].update(
                group=group,
                grouped_accuracy_after=acc if group is not None else None,
                grouped_meets_target=(
                    group is not None and acc >= target and not bool(grouped["diverged"][i])
                ),
            )
    return records


def cost_summary(
    chips: list[dict],
    fixed_epochs_per_chip: float,
    analysis_epochs: float,
    steps_per_epoch: int,
    groups: list[dict] | None = None,
) -> dict:
    """Reduce's retraining cost against the fixed policy, from the chip records.

    ``reduce_epochs`` is the sum of every chip's selected amount and top-up (chips that are
    not retrained cost nothing); the fixed policy retrains every chip ``fixed_epochs_per_chip``.
    With ``groups`` (a grouped run, whose chips were also retrained one by one for the
    comparison), ``grouped_epochs`` is the cost of the grouped retraining: every group's
    amount and top-ups, split groups and the retraining of their members included.
    ``*_recoverable`` compare the two on the chips Reduce retrains only, which is the fair
    comparison when many chips are unrecoverable. ``break_even_chips`` is the population size
    from which Reduce plus its one-off analysis costs less than the fixed policy, at this
    run's mean cost per chip (None if Reduce saves nothing per chip).
    """
    n = len(chips)
    if n == 0:
        raise ValueError("no chips")
    selected = [c for c in chips if c["selected_steps"] is not None]
    planned_steps = sum(c["selected_steps"] or 0 for c in chips)
    reduce_steps = sum((c["selected_steps"] or 0) + c["topup_steps"] for c in chips)
    reduce_epochs = reduce_steps / steps_per_epoch
    topup_epochs = sum(c["topup_epochs"] for c in chips)
    fixed_epochs = fixed_epochs_per_chip * n
    fixed_recoverable = fixed_epochs_per_chip * len(selected)
    per_chip_saving = fixed_epochs_per_chip - reduce_epochs / n

    def fraction(saved: float, total: float) -> float | None:
        return saved / total if total > 0 else None

    grouped_steps = (
        None if groups is None else sum(g["amount_steps"] + g["topup_steps"] for g in groups)
    )
    return dict(
        reduce_epochs=reduce_epochs,
        reduce_planned_epochs=planned_steps / steps_per_epoch,
        grouped_epochs=None if groups is None else grouped_steps / steps_per_epoch,
        grouped_steps=grouped_steps,
        grouped_planned_epochs=(
            None if groups is None else sum(g["amount_steps"] for g in groups) / steps_per_epoch
        ),
        groups=None if groups is None else len(groups),
        groups_split=None if groups is None else sum(g["split"] for g in groups),
        grouped_topup_epochs=(
            None if groups is None else sum(g["topup_steps"] for g in groups) / steps_per_epoch
        ),
        grouped_chips_meeting_target=(
            None if groups is None else sum(c["grouped_meets_target"] for c in chips)
        ),
        grouped_savings_fraction=(
            None
            if groups is None
            else fraction(fixed_epochs - grouped_steps / steps_per_epoch, fixed_epochs)
        ),
        grouped_savings_vs_reduce=(
            None if groups is None else reduce_epochs - grouped_steps / steps_per_epoch
        ),
        reduce_steps=int(reduce_steps),
        fixed_epochs=fixed_epochs,
        fixed_epochs_per_chip=float(fixed_epochs_per_chip),
        analysis_epochs=float(analysis_epochs),
        savings=fixed_epochs - reduce_epochs,
        savings_fraction=fraction(fixed_epochs - reduce_epochs, fixed_epochs),
        fixed_epochs_recoverable=fixed_recoverable,
        savings_recoverable=fixed_recoverable - reduce_epochs,
        savings_fraction_recoverable=fraction(fixed_recoverable - reduce_epochs, fixed_recoverable),
        topup_epochs=topup_epochs,
        chips_meeting_target=sum(c["meets_target"] for c in chips),
        chips_unrecoverable=sum(c["status"] in ("above_grid", "unrecoverable") for c in chips),
        chips_missing_target=sum(c["status"] == "missed_target" for c in chips),
        chips_diverged=sum(c["status"] == "diverged" for c in chips),
        break_even_chips=(
            math.ceil(analysis_epochs / per_chip_saving - 1e-9) if per_chip_saving > 0 else None
        ),
        steps_per_epoch=int(steps_per_epoch),
    )
