"""The chips axis sharded over 4 (fake CPU) devices gives the results of one device."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from reduce_jax import config, pipeline, sharding
    cfg = config.ReduceConfig(
        dataset="digits", model="mlp", array_rows=8, array_cols=8, fault_rates=(0.0, 0.1, 0.3),
        retrain_epochs=(0.0, 0.5, 1.0), maps_per_rate=3, num_chips=10, chip_fault_rate=0.15,
        max_accuracy_drop=0.05, batch_size=64, learning_rate=3e-3, baseline_epochs=5,
        chips_per_batch=int(sys.argv[1]), topup_epochs=0.5, max_topup_epochs=1.0)
    s = pipeline.run(cfg)
    print(json.dumps(dict(devices=jax.device_count(), shards=sharding.num_shards(),
                          accuracy=s["resilience"]["accuracy"],
                          after=[c["accuracy_after"] for c in s["chips"]],
                          topup=[c["topup_epochs"] for c in s["chips"]])))
    """
)


def run(devices: int, chips_per_batch: int) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(chips_per_batch)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_four_devices_equal_one():
    one = run(1, 8)
    four = run(4, 8)
    assert one["devices"] == 1 and four["devices"] == 4 and four["shards"] == 4
    np.testing.assert_allclose(four["accuracy"], one["accuracy"], atol=2e-3)
    np.testing.assert_allclose(four["after"], one["after"], atol=2e-3)
    # top-up decisions hinge on the target; allow at most one chip to differ
    assert sum(a != b for a, b in zip(four["topup"], one["topup"], strict=True)) <= 1
