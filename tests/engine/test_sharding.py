"""The chips axis sharded over 4 (fake CPU) devices gives the results of one device."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    s = pipeline.run(cfg).to_json()
    print(json.dumps(dict(devices=jax.device_count(), shards=sharding.num_shards(),
                          accuracy=s["resilience"]["accuracy"],
                          after=[c["accuracy_after"] for c in s["chips"]],
                          topup=[c["topup_epochs"] for c in s["chips"]])))
    """
)


def start_script(script: str, devices: int, *args: str) -> subprocess.Popen:
    """Starts ``script`` on ``devices`` fake CPU devices (``script_result`` waits for it)."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        # conftest's flags (if any) too.
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={devices}".strip(),
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def script_result(proc: subprocess.Popen) -> dict:
    """The last stdout line of a started script, as JSON."""
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def run_script(script: str, devices: int, *args: str) -> dict:
    """Runs ``script`` on ``devices`` fake CPU devices; its last stdout line, as JSON."""
    return script_result(start_script(script, devices, *args))


@pytest.mark.slow
def test_four_devices_equal_one():
    one = run_script(SCRIPT, 1, "8")
    four = run_script(SCRIPT, 4, "8")
    assert one["devices"] == 1 and four["devices"] == 4 and four["shards"] == 4
    np.testing.assert_allclose(four["accuracy"], one["accuracy"], atol=2e-3)
    np.testing.assert_allclose(four["after"], one["after"], atol=2e-3)
    # top-up decisions hinge on the target; allow at most one chip to differ
    assert sum(a != b for a, b in zip(four["topup"], one["topup"], strict=True)) <= 1


CONV_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import jax, jax.numpy as jnp
    from reduce_jax import data, sharding
    from reduce_jax.engine import population, train
    from reduce_jax.hardware import faults
    from reduce_jax.nets import models
    ds = data.load_dataset("digits")
    model = models.get_model("lenet5", ds.num_classes)
    # One program from an rbg key: any starting weights do, and it compiles in a fraction of
    # the time of threefry's, op by op.
    init = lambda key: models.init_variables(model, key, ds.train_images.shape[1:])
    variables = jax.jit(init)(jax.random.key(0, impl="rbg"))
    d = population.DeviceData.from_dataset(data.split_validation(ds, 0.1))
    maps = faults.sample_fault_maps(jax.random.key(1), 8, 4, 4, 0.2)
    out = {}
    for chip_batching in sys.argv[1].split(","):
        trainer = train.make_trainer(model, train.make_optimizer("adam", 1e-3), 32,
                                     chip_batching=chip_batching)
        states, masks = population.init_chunk(trainer, variables, maps, jnp.full(8, 100))
        args = (d.train_images, d.train_labels, jax.random.key(2), 0, 3)
        run = trainer.run.lower(states, masks, *args).compile()  # compiled once, then run
        hlo = run.as_text()
        states = run(states, masks, *args)
        acc = population.evaluate(trainer, states, masks, d)
        kernel = sharding.to_host(states.params["conv2"]["kernel"])
        out[chip_batching] = dict(
            devices=jax.device_count(), accuracy=acc.tolist(),
            kernel=kernel.reshape(8, -1)[:, :50].tolist(),
            collectives=len(re.findall(
                r"all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter", hlo)))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def conv_runs():
    """``CONV_SCRIPT`` on 1 and on 4 devices, both ways of batching chips in each process:
    ``{devices: {chip_batching: result}}``."""
    modes = ",".join(("vmap", "map"))
    # Both at once: with a core to spare, the fixture takes one script's time (pytest-xdist
    # hands out files with the fewest tests, as this one, last).
    started = {devices: start_script(CONV_SCRIPT, devices, modes) for devices in (1, 4)}
    return {devices: script_result(proc) for devices, proc in started.items()}


@pytest.mark.parametrize("chip_batching", ["vmap", "map"])
def test_sharded_convolutions_stay_on_their_devices(conv_runs, chip_batching):
    """LeNet-5 over 4 devices, vectorised (per-chip lax.map convolutions on a CPU) or mapped
    chip by chip: each device keeps its own chips (no collective in the step) and the results
    equal one device's."""
    one, four = conv_runs[1][chip_batching], conv_runs[4][chip_batching]
    assert one["devices"] == 1 and four["devices"] == 4
    assert four["collectives"] == 0
    np.testing.assert_allclose(four["kernel"], one["kernel"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(four["accuracy"], one["accuracy"], atol=1e-9)
