"""reduce_jax: resilience-driven fault-aware retraining for populations of faulty
systolic-array DNN accelerators.

    import reduce_jax
    summary = reduce_jax.run(reduce_jax.ReduceConfig(dataset="digits", model="mlp"))
    print(summary.headline())

Your own Flax module, its trained variables and your arrays::

    data = reduce_jax.Dataset.from_arrays(x_train, y_train, x_test, y_test)
    summary = reduce_jax.run(config, model=model, variables=variables, dataset=data)

New chips from a study's saved map, without the analysis (docs/production.md)::

    result = reduce_jax.retrain_chips(reduce_jax.load_map("runs/study/map"), "chips.npz",
                                      workdir="runs/week2")
"""

from reduce_jax.config import ConfigError, ReduceConfig
from reduce_jax.data import Dataset, load_dataset
from reduce_jax.hardware.faults import (
    FaultSpec,
    load_fault_maps,
    sample_fault_maps,
    save_fault_maps,
)
from reduce_jax.hardware.systolic import (
    chip_rates,
    describe_mapping,
    effective_fault_rate,
    kernel_mask,
    pe_fault_rate,
    pe_weights,
    weight_masks,
)
from reduce_jax.outputs.summary import Summary

__all__ = [
    "ConfigError",
    "Dataset",
    "FaultSpec",
    "ReduceConfig",
    "Summary",
    "chip_rates",
    "describe_mapping",
    "effective_fault_rate",
    "kernel_mask",
    "load_chip",
    "load_dataset",
    "load_fault_maps",
    "load_map",
    "pe_fault_rate",
    "pe_weights",
    "retrain_chips",
    "run",
    "sample_fault_maps",
    "save_fault_maps",
    "weight_masks",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `run` pulls in the whole pipeline (orbax for checkpoints, matplotlib for the plots);
    # importing it on first use keeps `import reduce_jax` light for notebooks and the CLI's
    # flag validation.
    if name == "run":
        from reduce_jax.pipeline import run

        return run
    if name == "load_chip":
        from reduce_jax.outputs.chip_store import load_chip

        return load_chip
    if name == "load_map":  # orbax
        from reduce_jax.outputs.map_bundle import load_map

        return load_map
    if name == "retrain_chips":
        from reduce_jax.production import retrain_chips

        return retrain_chips
    raise AttributeError(f"module 'reduce_jax' has no attribute {name!r}")
