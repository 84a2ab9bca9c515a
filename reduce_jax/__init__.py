"""reduce_jax: resilience-driven fault-aware retraining for populations of faulty
systolic-array DNN accelerators."""

from reduce_jax.faults import load_fault_maps, sample_fault_maps, save_fault_maps
from reduce_jax.systolic import effective_fault_rate, pe_fault_rate, weight_masks

__all__ = [
    "effective_fault_rate",
    "load_fault_maps",
    "pe_fault_rate",
    "sample_fault_maps",
    "save_fault_maps",
    "weight_masks",
]
__version__ = "0.1.0"
