"""The int8 datapath study: quantization, stuck-at faults in the PEs and their mitigations.

  nice -n 10 python -m experiments.datapath --workdir=runs/datapath_lenet5

What it measures, on one network (default: LeNet-5 on mnist5k, a 16x16 array):

1. The float32 baseline (trained, or reused from ``--workdir``) and its int8 version,
   quantized post-training (BatchNorm folded, activation scales calibrated on
   ``--calibration_images`` training images), then optionally fine-tuned
   quantization-aware for ``--qat_epochs``: test and validation accuracy of each.
2. Accuracy against the faulty-PE rate: ``--chips_per_rate`` chips at every rate of
   ``--fault_rates`` (PE maps from ``--fault_model``; one stuck bit per faulty PE drawn from
   ``--site_probs``, ``--p_one``, ``--bits``), under the four mitigations in int8 (``none``,
   ``bypass``, ``bypass+retrain``, ``fault-aware``; retraining ``--retrain_epochs``) and,
   on the same PE maps, float32 FAP and FAP+T.
3. The Zhang et al. check: ``--zhang_pes`` faulty PEs (exactly that many per chip), each
   with a stuck bit of the partial sum (``--zhang_bits``, ``--zhang_p_one``), unmitigated
   against bypassed.
4. With ``--stuck_at_file``: your chips' stuck bits (a CSV ``chip,row,col,site,bit,value``),
   each chip under the four mitigations and float32 bypass of its faulty PEs.

Writes ``results.json``, ``report.md`` (the tables, also printed) and
``datapath_<model>.png`` (accuracy against fault rate) into ``--workdir``; the baseline's
checkpoint is kept there and reused by a rerun with the same settings.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from experiments import cli
from reduce_jax.errors import ConfigError

DATASETS = ("mnist5k", "digits", "mnist", "cifar10", "cifar100")
MODELS = ("mlp", "lenet5", "vgg_small", "vgg11_bn", "resnet20", "resnet18")
FAULT_MODELS = ("bernoulli", "exact", "clustered", "lines")
OPTIMIZERS = ("adam", "sgd", "momentum")
BIT_DISTRIBUTIONS = ("uniform", "high", "msb")

WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (required).")
DATASET = flags.DEFINE_string("dataset", "mnist5k", f"One of {', '.join(DATASETS)}.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset files (mnist, cifar*).")
MODEL = flags.DEFINE_string("model", "lenet5", f"One of {', '.join(MODELS)}.")
MODEL_WIDTH = flags.DEFINE_float("model_width", 1.0, "Channel multiplier, in (0, 8].")
ARRAY_ROWS = flags.DEFINE_integer("array_rows", 16, "Rows of the array, 1..1024.")
ARRAY_COLS = flags.DEFINE_integer("array_cols", 16, "Columns of the array, 1..1024.")
BASELINE_EPOCHS = flags.DEFINE_float("baseline_epochs", 15, "Baseline epochs, in (0, 1000].")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Training batch size, 1..65536.")
OPTIMIZER = flags.DEFINE_string("optimizer", "adam", f"One of {', '.join(OPTIMIZERS)}.")
LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate, in (0, 10].")
INT8_LEARNING_RATE = flags.DEFINE_float(
    "int8_learning_rate",
    0.0,
    "Learning rate of the int8 retraining (QAT, bypass+retrain, fault-aware), in [0, 10]; "
    "0: --learning_rate. The int8 chips fold BatchNorm with frozen statistics, which wants "
    "a smaller rate than float32 retraining in train mode.",
)
VALIDATION_FRACTION = flags.DEFINE_float(
    "validation_fraction", 0.1, "Training images held out for validation, in (0, 1)."
)
CALIBRATION_IMAGES = flags.DEFINE_integer(
    "calibration_images", 1000, "Training images that calibrate the activation scales, >= 1."
)
QAT_EPOCHS = flags.DEFINE_float(
    "qat_epochs", 0.0, "Quantization-aware fine-tuning of the int8 baseline, in [0, 1000]."
)
FAULT_RATES = flags.DEFINE_list(
    "fault_rates", ["0", "0.01", "0.02", "0.05", "0.1", "0.2"], "Faulty-PE rates, in [0, 1]."
)
CHIPS_PER_RATE = flags.DEFINE_integer("chips_per_rate", 8, "Chips at every rate, 1..4096.")
FAULT_MODEL = flags.DEFINE_string(
    "fault_model", "bernoulli", f"Spatial model of the PE maps: {', '.join(FAULT_MODELS)}."
)
CLUSTER_ALPHA = flags.DEFINE_float("cluster_alpha", 2.0, "Clustered model's alpha, > 0.")
RETRAIN_EPOCHS = flags.DEFINE_float(
    "retrain_epochs", 1.0, "Retraining of bypass+retrain and fault-aware, in [0, 1000]."
)
SITE_PROBS = flags.DEFINE_list(
    "site_probs",
    ["0.3333333", "0.3333333", "0.3333334"],
    "Probabilities of a stuck bit in the weight register, the product, the partial sum "
    "(three numbers in [0, 1] summing to 1).",
)
P_ONE = flags.DEFINE_float("p_one", 0.5, "Probability a bit is stuck at 1, in [0, 1].")
BITS = flags.DEFINE_string("bits", "uniform", f"Bit position: {', '.join(BIT_DISTRIBUTIONS)}.")
ZHANG_PES = flags.DEFINE_list(
    "zhang_pes", ["1", "2", "4"], "Faulty PEs per chip of the Zhang et al. check, 1..R*C each."
)
ZHANG_BITS = flags.DEFINE_string(
    "zhang_bits", "msb", f"Stuck partial-sum bit of that check: {', '.join(BIT_DISTRIBUTIONS)}."
)
ZHANG_P_ONE = flags.DEFINE_float(
    "zhang_p_one", 0.5, "Probability a partial-sum bit of that check is stuck at 1, in [0, 1]."
)
ZHANG_CHIPS = flags.DEFINE_integer("zhang_chips", 8, "Chips per count of that check, 0..4096.")
STUCK_AT_FILE = flags.DEFINE_string(
    "stuck_at_file",
    None,
    "Your chips' stuck bits: a CSV chip,row,col,site,bit,value (site weight|product|psum; "
    "an optional first line '# chips=N rows=R cols=C'); each chip is also measured under the "
    "four mitigations, and float32 bypass of its faulty PEs.",
)
CHIPS_PER_BATCH = flags.DEFINE_integer("chips_per_batch", 16, "Chips computed together, >= 1.")
SEED = flags.DEFINE_integer("seed", 0, "Seed, >= 0.")
COMPILATION_CACHE_DIR = cli.define_compilation_cache_dir()
flags.adopt_module_key_flags(cli)


def _floats(name: str, values: list[str]) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ConfigError(f"--{name}={','.join(values)}: not a list of numbers") from None


def _ints(name: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--{name}={','.join(values)}: not a list of integers") from None


def _within(name: str, value, lo, hi, lo_open=False, hi_open=False) -> None:
    low_bad = value <= lo if lo_open else value < lo
    high_bad = value >= hi if hi_open else value > hi
    if low_bad or high_bad:
        lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"--{name}={value} is out of range {lb}{lo}, {hi}{hb}")


def _one_of(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name}={value!r} is not one of {', '.join(allowed)}")


def validate() -> dict:
    """Every flag checked before any compute; the settings as a dict (``results.json``).

    Raises:
      ConfigError: one line naming the flag and its allowed range.
    """
    if not WORKDIR.value:
        raise ConfigError("--workdir is required (the output directory)")
    _one_of("dataset", DATASET.value, DATASETS)
    _one_of("model", MODEL.value, MODELS)
    _one_of("optimizer", OPTIMIZER.value, OPTIMIZERS)
    _one_of("fault_model", FAULT_MODEL.value, FAULT_MODELS)
    _one_of("bits", BITS.value, BIT_DISTRIBUTIONS)
    _one_of("zhang_bits", ZHANG_BITS.value, BIT_DISTRIBUTIONS)
    _within("model_width", MODEL_WIDTH.value, 0, 8, lo_open=True)
    _within("array_rows", ARRAY_ROWS.value, 1, 1024)
    _within("array_cols", ARRAY_COLS.value, 1, 1024)
    _within("baseline_epochs", BASELINE_EPOCHS.value, 0, 1000, lo_open=True)
    _within("batch_size", BATCH_SIZE.value, 1, 65536)
    _within("learning_rate", LEARNING_RATE.value, 0, 10, lo_open=True)
    _within("int8_learning_rate", INT8_LEARNING_RATE.value, 0, 10)
    _within("validation_fraction", VALIDATION_FRACTION.value, 0, 1, True, True)
    _within("calibration_images", CALIBRATION_IMAGES.value, 1, 10**7)
    _within("qat_epochs", QAT_EPOCHS.value, 0, 1000)
    _within("chips_per_rate", CHIPS_PER_RATE.value, 1, 4096)
    _within("cluster_alpha", CLUSTER_ALPHA.value, 0, 1e6, lo_open=True)
    _within("retrain_epochs", RETRAIN_EPOCHS.value, 0, 1000)
    _within("p_one", P_ONE.value, 0, 1)
    _within("zhang_p_one", ZHANG_P_ONE.value, 0, 1)
    _within("zhang_chips", ZHANG_CHIPS.value, 0, 4096)
    _within("chips_per_batch", CHIPS_PER_BATCH.value, 1, 4096)
    _within("seed", SEED.value, 0, 2**31 - 1)
    rates = _floats("fault_rates", FAULT_RATES.value)
    if not rates:
        raise ConfigError("--fault_rates is empty; give one or more rates in [0, 1]")
    for r in rates:
        _within("fault_rates", r, 0, 1)
    probs = _floats("site_probs", SITE_PROBS.value)
    if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise ConfigError(
            f"--site_probs={','.join(SITE_PROBS.value)} must be three probabilities (weight, "
            "product, psum) in [0, 1] summing to 1"
        )
    pes = _ints("zhang_pes", ZHANG_PES.value)
    cells = ARRAY_ROWS.value * ARRAY_COLS.value
    for k in pes:
        _within("zhang_pes", k, 1, cells)
    if STUCK_AT_FILE.value is not None:
        from reduce_jax.hardware import stuck_at

        try:
            stuck_at.load_stuck_at(STUCK_AT_FILE.value, ARRAY_ROWS.value, ARRAY_COLS.value)
        except stuck_at.StuckAtError as e:
            raise ConfigError(f"--stuck_at_file: {e}") from None
    return dict(
        dataset=DATASET.value,
        model=MODEL.value,
        model_width=MODEL_WIDTH.value,
        array=[ARRAY_ROWS.value, ARRAY_COLS.value],
        baseline_epochs=BASELINE_EPOCHS.value,
        batch_size=BATCH_SIZE.value,
        optimizer=OPTIMIZER.value,
        learning_rate=LEARNING_RATE.value,
        int8_learning_rate=INT8_LEARNING_RATE.value or LEARNING_RATE.value,
        validation_fraction=VALIDATION_FRACTION.value,
        calibration_images=CALIBRATION_IMAGES.value,
        qat_epochs=QAT_EPOCHS.value,
        fault_rates=rates,
        chips_per_rate=CHIPS_PER_RATE.value,
        fault_model=FAULT_MODEL.value,
        cluster_alpha=CLUSTER_ALPHA.value,
        retrain_epochs=RETRAIN_EPOCHS.value,
        site_probs=probs,
        p_one=P_ONE.value,
        bits=BITS.value,
        zhang_pes=pes,
        zhang_bits=ZHANG_BITS.value,
        zhang_p_one=ZHANG_P_ONE.value,
        zhang_chips=ZHANG_CHIPS.value,
        chips_per_batch=CHIPS_PER_BATCH.value,
        stuck_at_file=STUCK_AT_FILE.value,
        seed=SEED.value,
    )


def _stats(acc: np.ndarray) -> dict:
    """Mean, standard deviation, min over chips of ``float64[chips, M]`` -> lists of ``M``."""
    return dict(
        mean=acc.mean(axis=0).tolist(), std=acc.std(axis=0).tolist(), min=acc.min(axis=0).tolist()
    )


def study(s: dict) -> dict:
    """Runs the study with the validated settings ``s``; returns ``results.json``'s content."""
    import jax  # heavy imports after validation
    import jax.numpy as jnp

    from reduce_jax import data as data_lib
    from reduce_jax.engine import population, train
    from reduce_jax.hardware import faults, stuck_at
    from reduce_jax.nets import int8, models
    from reduce_jax.stages import baseline, mitigation

    root = jax.random.key(s["seed"])
    keys = {n: jax.random.fold_in(root, i) for i, n in enumerate(("base", "qat", "maps", "bits"))}
    keys.update(retrain=jax.random.fold_in(root, 4), zhang=jax.random.fold_in(root, 5))
    data = data_lib.split_validation(
        data_lib.load_dataset(s["dataset"], DATA_DIR.value), s["validation_fraction"]
    )
    device = population.DeviceData.from_dataset(data)
    model = models.get_model(s["model"], data.num_classes, s["model_width"])
    spec = baseline.BaselineSpec(
        s["dataset"],
        s["model"],
        s["model_width"],
        s["baseline_epochs"],
        s["batch_size"],
        s["optimizer"],
        s["learning_rate"],
        0.0,
        "constant",
        False,
        s["seed"],
    )
    variables, info = baseline.get_baseline(s["workdir"], model, data, keys["base"], spec)
    spe = train.steps_per_epoch(device.num_train, s["batch_size"])
    tx = train.make_optimizer(s["optimizer"], s["learning_rate"])
    tx8 = train.make_optimizer(s["optimizer"], s["int8_learning_rate"])
    array = tuple(s["array"])
    out = dict(settings=s, steps_per_epoch=spe, baseline_reused=info["reused"])

    # 1. float32 and int8 baselines.
    float_eval = train.make_trainer(model, tx, s["batch_size"])
    ones = train.unit_masks(variables["params"])
    one = jax.tree.map(lambda x: x[None], variables)
    out["float32"] = {
        split: float(float_eval.evaluate(one, ones, *device.split(split))[0])
        for split in ("val", "test")
    }
    folded, params = int8.folded_model(model), int8.fold(variables)
    start = time.perf_counter()
    calib = device.train_images[: s["calibration_images"]]
    net = int8.Int8Net(folded, int8.calibrate(folded, params, calib), array)
    clean = stuck_at.StuckAt(*(m[None] for m in stuck_at.no_faults(*array)))

    def int8_accuracy(v) -> dict:
        a = mitigation.mitigate(
            net, v, clean, device, tx8, 0, keys["retrain"], s["batch_size"], ("none",)
        )
        return dict(val=float(a.val[0, 0]), test=float(a.test[0, 0]))

    # The int8 chips start from the baseline's own variables (Int8Model folds them).
    int8_variables = variables
    out["int8_ptq"] = int8_accuracy(int8_variables)
    qat_steps = int(train.epochs_to_steps(s["qat_epochs"], spe))
    if qat_steps:
        int8_variables = mitigation.finetune(
            net, variables, device, tx8, qat_steps, keys["qat"], s["batch_size"]
        )
        out["int8_qat"] = dict(int8_accuracy(int8_variables), steps=qat_steps)
    out["baseline_s"] = time.perf_counter() - start
    logging.info("baselines: %s", {k: out[k] for k in ("float32", "int8_ptq")})

    # 2. Accuracy against the fault rate: every rate's chips in one population.
    rates, k = s["fault_rates"], s["chips_per_rate"]
    maps = np.concatenate(
        [
            np.asarray(
                faults.sample_fault_maps(
                    jax.random.fold_in(keys["maps"], i),
                    k,
                    *array,
                    rate,
                    s["fault_model"],
                    s["cluster_alpha"],
                )
            )
            for i, rate in enumerate(rates)
        ]
    )
    mix = stuck_at.StuckAtMix(tuple(s["site_probs"]), s["p_one"], s["bits"])
    stuck = stuck_at.sample_stuck_at(keys["bits"], jnp.asarray(maps), mix)
    steps = int(train.epochs_to_steps(s["retrain_epochs"], spe))
    common = (device, tx, steps, keys["retrain"], s["batch_size"])
    start = time.perf_counter()
    acc8 = mitigation.mitigate(
        net, int8_variables, stuck, device, tx8, *common[2:], chips_per_batch=s["chips_per_batch"]
    )
    out["int8_mitigations_s"] = time.perf_counter() - start
    start = time.perf_counter()
    acc32 = mitigation.float_bypass(
        model, variables, maps, *common, chips_per_batch=s["chips_per_batch"]
    )
    out["float32_bypass_s"] = time.perf_counter() - start
    pe_rate = maps.reshape(len(maps), -1).mean(axis=1)
    out["retrain_steps"] = steps
    out["by_rate"] = []
    for i, rate in enumerate(rates):
        rows = slice(i * k, (i + 1) * k)
        out["by_rate"].append(
            dict(
                rate=rate,
                measured_pe_rate=float(pe_rate[rows].mean()),
                int8={sp: _stats(getattr(acc8, sp)[rows]) for sp in ("val", "test")},
                float32={sp: _stats(getattr(acc32, sp)[rows]) for sp in ("val", "test")},
            )
        )
    out["int8_mitigations"] = list(acc8.mitigations)
    out["float32_mitigations"] = list(acc32.mitigations)

    # 3. Zhang et al.: a few stuck bits of the partial sum, unmitigated against bypassed.
    out["zhang"] = []
    if s["zhang_chips"]:
        zmix = stuck_at.StuckAtMix((0.0, 0.0, 1.0), s["zhang_p_one"], s["zhang_bits"])
        cells = array[0] * array[1]
        for j, count in enumerate(s["zhang_pes"]):
            zkey = jax.random.fold_in(keys["zhang"], j)
            zmaps = faults.sample_fault_maps(zkey, s["zhang_chips"], *array, count / cells, "exact")
            zstuck = stuck_at.sample_stuck_at(jax.random.fold_in(zkey, 1), zmaps, zmix)
            z = mitigation.mitigate(
                net,
                int8_variables,
                zstuck,
                *common[:2],
                0,
                keys["retrain"],
                s["batch_size"],
                ("none", "bypass"),
                s["chips_per_batch"],
            )
            out["zhang"].append(
                dict(
                    faulty_pes=count, pe_rate=count / cells, test=_stats(z.test), val=_stats(z.val)
                )
            )

    # 4. The chips of --stuck_at_file, one by one.
    if s["stuck_at_file"]:
        given = stuck_at.load_stuck_at(s["stuck_at_file"], *array)
        pes = np.asarray(stuck_at.faulty_pes(given))
        f8 = mitigation.mitigate(
            net,
            int8_variables,
            given,
            device,
            tx8,
            *common[2:],
            chips_per_batch=s["chips_per_batch"],
        )
        f32 = mitigation.float_bypass(
            model, variables, pes, *common, chips_per_batch=s["chips_per_batch"]
        )
        # Stuck bits per site: the bits cleared (stuck at 0) and set (stuck at 1), counted.
        stuck = np.stack([~np.asarray(given.and_mask), np.asarray(given.or_mask)])
        bits = np.unpackbits(stuck.astype(np.uint32).view(np.uint8), axis=-1)
        bits = bits.reshape(*stuck.shape, 32).sum(axis=(0, 3, 4, 5))  # [chips, 3]
        out["file"] = [
            dict(
                chip=i,
                faulty_pes=int(pes[i].sum()),
                stuck_bits={site: int(bits[i, j]) for j, site in enumerate(stuck_at.SITES)},
                int8={
                    m: dict(val=float(f8.val[i, j]), test=float(f8.test[i, j]))
                    for j, m in enumerate(f8.mitigations)
                },
                float32={
                    m: dict(val=float(f32.val[i, j]), test=float(f32.test[i, j]))
                    for j, m in enumerate(f32.mitigations)
                },
            )  # fmt: skip
            for i in range(len(pes))
        ]
    return out


def report(out: dict) -> str:
    """The study's tables, markdown."""
    s = out["settings"]
    lines = [
        f"{s['model']} on {s['dataset']}, {s['array'][0]}x{s['array'][1]} array, "
        f"{s['chips_per_rate']} chips per rate, retraining {out['retrain_steps']} steps "
        f"({s['retrain_epochs']} epochs; learning rate {s['learning_rate']:g} float32, "
        f"{s['int8_learning_rate']:g} int8); stuck bits: sites {s['site_probs']} "
        f"(weight, product, psum), P(stuck at 1) {s['p_one']}, bits {s['bits']}; "
        f"PE maps {s['fault_model']}.",
        "",
        "| baseline | validation | test |",
        "| --- | --- | --- |",
        f"| float32 | {out['float32']['val']:.4f} | {out['float32']['test']:.4f} |",
        f"| int8, post-training | {out['int8_ptq']['val']:.4f} | {out['int8_ptq']['test']:.4f} |",
    ]
    if "int8_qat" in out:
        q = out["int8_qat"]
        lines.append(f"| int8, QAT {q['steps']} steps | {q['val']:.4f} | {q['test']:.4f} |")
    names = [f"int8 {m}" for m in out["int8_mitigations"]]
    names += [f"float32 {m}" for m in out["float32_mitigations"]]
    lines += [
        "",
        "Test accuracy, mean (min) over the chips:",
        "",
        "| PE rate | " + " | ".join(names) + " |",
        "| --- " * (len(names) + 1) + "|",
    ]
    for row in out["by_rate"]:
        cells = []
        for kind in ("int8", "float32"):
            t = row[kind]["test"]
            cells += [f"{m:.4f} ({lo:.4f})" for m, lo in zip(t["mean"], t["min"], strict=True)]
        lines.append(f"| {row['rate']:g} | " + " | ".join(cells) + " |")
    if out["zhang"]:
        lines += [
            "",
            f"Zhang et al. check: stuck partial-sum bits ({s['zhang_bits']}, P(1) "
            f"{s['zhang_p_one']}), {s['zhang_chips']} chips per count, test accuracy mean "
            "(min):",
            "",
            "| faulty PEs | PE rate | int8 none | int8 bypass |",
            "| --- | --- | --- | --- |",
        ]
        for z in out["zhang"]:
            t = z["test"]
            lines.append(
                f"| {z['faulty_pes']} | {z['pe_rate']:.4%} | {t['mean'][0]:.4f} ({t['min'][0]:.4f})"
                f" | {t['mean'][1]:.4f} ({t['min'][1]:.4f}) |"
            )
    if out.get("file"):
        names = [f"int8 {m}" for m in out["int8_mitigations"]]
        names += [f"float32 {m}" for m in out["float32_mitigations"]]
        lines += [
            "",
            f"The chips of {s['stuck_at_file']}, test accuracy:",
            "",
            "| chip | faulty PEs | stuck bits (weight/product/psum) | " + " | ".join(names) + " |",
            "| --- " * (len(names) + 3) + "|",
        ]
        for c in out["file"]:
            bits = "/".join(str(c["stuck_bits"][site]) for site in ("weight", "product", "psum"))
            accs = [c["int8"][m]["test"] for m in out["int8_mitigations"]]
            accs += [c["float32"][m]["test"] for m in out["float32_mitigations"]]
            lines.append(
                f"| {c['chip']} | {c['faulty_pes']} | {bits} | "
                + " | ".join(f"{a:.4f}" for a in accs)
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot(out: dict, path: str) -> None:
    """Test accuracy against the faulty-PE rate: the int8 mitigations and float32 beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = out["settings"]
    rates = [r["rate"] for r in out["by_rate"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    for kind, style in (("int8", "-o"), ("float32", "--s")):
        for j, m in enumerate(out[f"{kind}_mitigations"]):
            mean = np.array([r[kind]["test"]["mean"][j] for r in out["by_rate"]])
            std = np.array([r[kind]["test"]["std"][j] for r in out["by_rate"]])
            (line,) = ax.plot(rates, mean, style, ms=4, label=f"{kind} {m}")
            ax.fill_between(rates, mean - std, mean + std, color=line.get_color(), alpha=0.12)
    ax.axhline(out["float32"]["test"], color="gray", lw=0.8, ls=":", label="float32 baseline")
    ax.set_xlabel("faulty-PE rate")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    mix = "/".join(f"{p:.2g}" for p in s["site_probs"])
    ax.set_title(
        f"{s['model']} on {s['dataset']}, int8 array: stuck bits weight/product/psum {mix}, "
        f"{s['bits']} bits",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    cli.quiet_platform_probing()
    try:
        s = validate()
        os.makedirs(WORKDIR.value, exist_ok=True)
        cli.use_compilation_cache(COMPILATION_CACHE_DIR.value)
        from reduce_jax.data import DatasetError

        try:
            out = study(dict(s, workdir=WORKDIR.value))
        except DatasetError as e:
            raise ConfigError(str(e)) from e
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out["settings"].pop("workdir", None)
    with open(os.path.join(WORKDIR.value, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    text = report(out)
    with open(os.path.join(WORKDIR.value, "report.md"), "w") as f:
        f.write(text)
    plot(out, os.path.join(WORKDIR.value, f"datapath_{s['model']}.png"))
    print(text)
    print(f"outputs in {WORKDIR.value}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
