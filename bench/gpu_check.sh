#!/usr/bin/env bash
# The GPU check (issue 21), for a machine with an NVIDIA GPU and only torch (2.11+, CUDA), Triton, onnx,
# onnxruntime (CPU build) and the usual scientific packages; within about 8 minutes:
#   1. the `gpu`-marked tests that can run there (those needing TensorRT / onnxruntime-gpu skip, reason printed);
#   2. bench/engines.py: --target aotinductor on CUDA in bfloat16 for dense / drop-50 / slice-50 / moe-16top8
#      variants of a ~1B Qwen2-shaped model (hidden 2048, 16 layers, FFN 8192, 16 heads / 4 KV, vocab 32000)
#      at batch 1 x seq 2048 and batch 8 x seq 512: parity, p50 latency, measured / FLOP-ideal speedups;
#   3. bench/ffn_to_moe.py's layer part: BAGEL's FFN (hidden 3584, FFN 18944; 4096 tokens, one 1024-pixel
#      image) as 16 experts, 8 active: the sparsec op (eager and AOTInductor) against the dense FFN and
#      transformers' Mixtral experts block (grouped_mm), as ratios of the E/k ideal.
# Writes OUT/gpu_check.json and OUT/gpu_check.md (GPU, versions, date and the tables).
#
#   bash bench/gpu_check.sh [--out DIR]      # on the GPU machine, from the repository root (default OUT: bench/results/gpu_check)
#   bash bench/gpu_check.sh --quick          # the CPU at tiny sizes, engines.py also on onnxruntime: checks the script (the suite runs this)
#
# Every step has a time limit, so the report is written even when one step runs out; a step that failed or ran out
# says so in the report. Exit: 0 when every step passed, 1 when one failed, 2 for bad arguments or a missing module.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
out=bench/results/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
# 0. what the machine has: sparsec's imports, and CUDA unless --quick
python - "$quick" <<'PY' || exit 2
import importlib.util, sys
quick = sys.argv[1] == "1"
needed = ["torch", "transformers", "safetensors", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "yaml", "numpy"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if not quick and importlib.util.find_spec("triton") is None:
    missing.append("triton")
if missing:
    sys.exit(
        f"bench/gpu_check.sh: missing Python modules {missing}. On a machine that cannot download, bring wheels: "
        "elsewhere `pip download -d wheels --python-version 3.X --only-binary=:all: <the modules>` and here "
        "`pip install --no-index --find-links wheels <the modules>`"
    )
import torch
if not quick and not torch.cuda.is_available():
    sys.exit(f"bench/gpu_check.sh: torch {torch.__version__} sees no CUDA device (use --quick on a CPU machine)")
PY
# sparsec itself: its import names sparsec.passes / sparsec.exporters need the package installed (editable, offline)
python -c "import sparsec.exporters, sparsec.passes" 2>/dev/null \
  || pip install -q --no-deps --no-build-isolation -e . \
  || { echo "bench/gpu_check.sh: sparsec is not installed and 'pip install --no-deps --no-build-isolation -e .' failed" >&2; exit 2; }

if [ "$quick" = 1 ]; then
  device=cpu; dtype=float32; limit_tests=120; limit_engines=300; limit_layer=200
  targets=aotinductor,onnxruntime  # the CPU ONNX path of engines.py too (on a GPU: tensorrt / onnxruntime-cuda)
  engines_args=(--quick --variants dense,moe-16top8)
  layer_args=(--hidden 128 --ffn-intermediate 512 --tokens 64 --reps 3)
else
  device=cuda; dtype=bfloat16; limit_tests=60; limit_engines=300; limit_layer=100
  targets=aotinductor
  engines_args=(--hidden 2048 --intermediate 8192 --layers 16 --heads 16 --kv-heads 4 --vocab 32000
                --shapes 1x2048,8x512 --variants dense,drop-50,slice-50,moe-16top8 --reps 20)
  layer_args=(--hidden 3584 --ffn-intermediate 18944 --tokens 4096 --reps 30)
fi

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log, record the exit status
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): $*" >&2
  local start=$SECONDS
  timeout "$limit" "$@" > >(tee "$out/$name.log") 2>"$out/$name.err"
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >> "$out/steps"
  [ $rc = 0 ] || { echo "== $name: exit $rc (124: ran past ${limit} s); see $out/$name.err" >&2; tail -5 "$out/$name.err" >&2; }
}
rm -f "$out/steps"
step tests "$limit_tests" python -m pytest -q -rs -m gpu -p no:cacheprovider -o addopts= $(grep -rl --include="test_*.py" "mark.gpu" tests)
step engines "$limit_engines" python bench/engines.py --targets "$targets" --device "$device" --dtype "$dtype" \
  "${engines_args[@]}" --json "$out/engines.json" --markdown "$out/engines.md"
step layer "$limit_layer" python bench/ffn_to_moe.py --skip-model --device "$device" --dtype "$dtype" \
  --experts 16 --top-k 8 --engines torch,transformers,aotinductor --hf-experts grouped_mm --warmup 3 \
  "${layer_args[@]}" --json "$out/layer.json" --markdown "$out/layer.md"

python - "$out" "$quick" <<'PY'
import datetime, json, platform, sys
from pathlib import Path
import torch
out, quick = Path(sys.argv[1]), sys.argv[2] == "1"
steps = {name: {"exit": int(rc), "seconds": int(s)} for name, rc, s in (l.split() for l in (out / "steps").read_text().splitlines())}
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
machine = {
    "date": datetime.date.today().isoformat(),
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version, "python": platform.python_version(),
    "quick": quick,
}
tests_log = (out / "tests.log").read_text().strip().splitlines() if (out / "tests.log").exists() else []
result = {"machine": machine, "steps": steps, "tests": tests_log[-1] if tests_log else None}
for name, key in (("engines", None), ("layer", "layer")):  # ffn_to_moe.py's results hold its layer part under "layer"
    path = out / f"{name}.json"
    results = json.loads(path.read_text())["results"] if path.exists() else None
    result[name] = results[key] if results and key else results
(out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
def status(name):
    s = steps.get(name, {"exit": "not run", "seconds": 0})
    return "passed" if s["exit"] == 0 else ("ran past its limit" if s["exit"] == 124 else f"failed (exit {s['exit']})")
lines = [
    f"# sparsec GPU check{' (--quick: CPU, tiny sizes, says nothing of speed)' if quick else ''}", "",
    f"{machine['date']}, {machine['device']}, torch {machine['torch']} (CUDA {machine['cuda']}), Triton {machine['triton']}, "
    f"Python {machine['python']}", "",
    f"Steps: " + ", ".join(f"{n} {status(n)} in {s['seconds']} s" for n, s in steps.items()), "",
    f"gpu tests: {result['tests']}", "",
]
for name, heading in (("engines", "Whole model, compiled artifacts"), ("layer", "MoE layer")):
    md = out / f"{name}.md"
    lines += [f"## {heading}", "", md.read_text().strip() if md.exists() else f"(no table: the step {status(name)})", ""]
(out / "gpu_check.md").write_text("\n".join(lines))
print("\n".join(lines))
print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
sys.exit(0 if all(s["exit"] == 0 for s in steps.values()) else 1)
PY
