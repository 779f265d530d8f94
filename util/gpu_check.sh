#!/usr/bin/env bash
# A few minutes on a GPU machine, numbers at once: the CUDA tests, the benchmark on the GPU (with its epoch
# section and torch.compile against eager), and a short training on the toy collection in fp32, in bf16 and
# in bf16 compiled (--compile 1); then one summary of what was measured (every number is
# read from the files the steps wrote; a step that failed says so, it never gets a number).
#
#   util/gpu_check.sh [OUT_DIR]          # default ./gpu_check_<date>; logs and JSON stay there
#
# BENCH_FLAGS adds flags to util/benchmark.py (e.g. BENCH_FLAGS='--only train,encode --eval_budget 60').
# COMPILE_ENCODERS: text encoders of the compile benchmark (default small,bert-base; '' skips that step).
# EPOCHS sets the toy training's epochs (default 3). Without a visible GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-gpu_check_$(date +%Y%m%d_%H%M%S)}
EPOCHS=${EPOCHS:-3}
BENCH_FLAGS=${BENCH_FLAGS:-}
COMPILE_ENCODERS=${COMPILE_ENCODERS-small,bert-base}

source util/ensure_env.sh
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch ($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'torch missing'); CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}); nothing to check. Run it on a GPU machine with a CUDA build of torch."
  exit 0
fi
mkdir -p "$OUT"
echo "gpu_check: writing to $OUT"
declare -A STATUS

step() {   # step NAME LOGFILE COMMAND...: run, keep the log, remember the exit status
  local name=$1 log=$2; shift 2
  echo "== $name ($log)"
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  STATUS[$name]="exit $rc, $((SECONDS - t0)) s"
  tail -n 3 "$log" | sed 's/^/   /'
}

# ---- 1. the machine ----
{ nvidia-smi 2>/dev/null || echo 'nvidia-smi not found'; } >"$OUT/nvidia_smi.txt"
"$PYTHON" - >"$OUT/machine.json" <<'EOF'
import json, torch
from basic.precision import bf16_support
d = torch.device('cuda')
p = torch.cuda.get_device_properties(d)
print(json.dumps({'gpu': p.name, 'memory_gib': round(p.total_memory / 2 ** 30, 1), 'capability': f'{p.major}.{p.minor}',
                  'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpus': torch.cuda.device_count(),
                  'bf16': bf16_support(d)[1]}))
EOF

# ---- 2. the CUDA tests (they skip themselves without a GPU, so here they must run) ----
step tests "$OUT/tests.log" "$PYTHON" -m pytest -q -rs tests -k 'cuda or gpu'

# ---- 3. the benchmark on the GPU ----
# shellcheck disable=SC2086
step benchmark "$OUT/benchmark.log" "$PYTHON" util/benchmark.py --device cuda --out "$OUT/benchmark_gpu.json" $BENCH_FLAGS
if [ -n "$COMPILE_ENCODERS" ]; then
  step benchmark_compile "$OUT/benchmark_compile.log" "$PYTHON" util/benchmark.py --device cuda --only compile \
    --amps off,bf16 --compile_encoders "$COMPILE_ENCODERS" --out "$OUT/benchmark_compile.json"
fi

# ---- 4. a short training on the toy collection, fp32 then bf16 ----
ROOT="$OUT/VisualSearch"
step toy_data "$OUT/toy_data.log" "$PYTHON" util/make_toy_data.py --root "$ROOT" --collection toy
for RUN in off bf16 bf16_compile; do
  AMP=${RUN%_compile}; COMPILE=0; [ "$RUN" = bf16_compile ] && COMPILE=1
  step "train_$RUN" "$OUT/train_$RUN.log" "$PYTHON" trainer.py --model nrccr --rootpath "$ROOT" --collection toy \
    --visual_feature toy_feature --bert_name "$ROOT/tiny_bert" --layer_list layer.9 layer.10 layer.11 \
    --text_hidden_size 128 --video_hidden_size 128 --text_mapping_layers 0-256 --visual_mapping_layers 0-256 \
    --disc_type not-so-weak --l1_gama 0.1 --back_w 0.5 --learning_rate 1e-3 --batch_size 64 \
    --num_epochs "$EPOCHS" --workers 2 --max_violation --device cuda --amp "$AMP" --compile "$COMPILE" \
    --postfix "gpu_check_$RUN"
done

# ---- 5. summary ----
STATUS_LINES=$(for k in tests benchmark benchmark_compile toy_data train_off train_bf16 train_bf16_compile; do echo "$k: ${STATUS[$k]:-not run}"; done)
export OUT ROOT STATUS_LINES
"$PYTHON" - <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, re
out, root = os.environ['OUT'], os.environ['ROOT']


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


print('\n==== gpu_check summary ====')
m = load(os.path.join(out, 'machine.json'))
if m:
    print(f"machine: {m['gpu']} ({m['memory_gib']} GiB, sm {m['capability']}), torch {m['torch']}, "
          f"CUDA {m['cuda']}, {m['gpus']} GPU(s); {m['bf16']}")
else:
    print('machine: unknown (machine.json was not written)')
print('steps: ' + '; '.join(os.environ['STATUS_LINES'].splitlines()))

log = open(os.path.join(out, 'tests.log')).read() if os.path.exists(os.path.join(out, 'tests.log')) else ''
counts = re.findall(r'(\d+) (passed|failed|skipped|error|errors|deselected)', log)
print('CUDA tests: ' + (', '.join(f'{n} {w}' for n, w in counts if w != 'deselected') or 'no result line (see tests.log)'))

b = load(os.path.join(out, 'benchmark_gpu.json'))
if b is None:
    print('benchmark: no results (see benchmark.log)')
else:
    for r in b.get('peak', []):
        print(f"matmul peak {r['dtype']}{' (TF32)' if r.get('tf32') else ''}: {r['flops_per_s'] / 1e12:.1f} TFLOP/s")
    for r in b.get('train', []):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') is not None else 'n/a'
        memory = f", peak memory {r['peak_gpu_gib']:.1f} GiB" if 'peak_gpu_gib' in r else ''
        print(f"train {r['model']:5} {r['encoder']:9} {r['amp']:4} batch {r['batch']:3}: {r['samples_per_s']:8.1f} "
              f"samples/s, MFU {mfu}{memory}")
    for r in b.get('encode', []):
        if r['what'] == 'encode_texts':
            print(f"encode {r['model']:5} {r['amp']:4} {r['captions']:,} captions x {r['streams']}, {r['order']:6} "
                  f"batches: {r['seconds']:.2f} s ({100 * r['padding_fraction']:.0f}% padding)")
    for r in b.get('eval', []):
        print(f"metrics {r['mode']:10} {r['captions']:>9,} x {r['videos']:<8,}: {r['seconds']:.3f} s")
    for r in b.get('epoch', []):
        print(f"epoch {r['model']:5} --amp {r['amp']:4} ({r['amp_resolved']}; {r['compile']}): {r['wall_s']:.0f} s "
              f"process, {r['epoch_s']:.0f} s epoch + validation, {r['samples_per_s']:.0f} samples/s")
    for note in b.get('notes', []):
        print(f'note: {note}')

c = load(os.path.join(out, 'benchmark_compile.json'))
for r in (c or {}).get('compile', []):
    pays = f"pays after {r['pays_after_calls']:,.0f} calls" if r['pays_after_calls'] is not None else 'never pays'
    print(f"compile {r['what']:13} {r['model']:5} {r['encoder']:9} {r['amp']:4}: eager {1000 * r['eager_s']:.1f} ms, "
          f"compiled {1000 * r['compiled_s']:.1f} ms ({r['speedup']:.2f}x), compiling {r['compile_s']:.0f} s, "
          f"{r['recompiles']} recompilations; {pays}")

for amp in ('off', 'bf16', 'bf16_compile'):
    name = {'off': 'fp32', 'bf16': 'bf16', 'bf16_compile': 'bf16 compiled'}[amp]
    lines = sorted(glob.glob(os.path.join(root, 'toy', '*', 'toy', '*', f'gpu_check_{amp}', 'metrics.jsonl')))
    if not lines:
        print(f'toy training {name}: no metrics.jsonl (see train_{amp}.log)')
        continue
    epochs = [json.loads(line) for line in open(lines[0]) if line.strip()]
    later = epochs[1:]            # the first epoch pays for start-up (allocator, kernels)
    speed = [e['samples_per_s'] for e in (later or epochs)]
    text = (f'toy training {name}: {len(epochs)} epochs, best val score {max(e["score"] for e in epochs):.2f}, '
            f'{sum(speed) / len(speed):.0f} samples/s ({"epochs after the first" if later else "one epoch"})')
    tests = glob.glob(os.path.join(root, 'toy', 'results', '*', f'gpu_check_{amp}', '*', 'metrics.json'))
    metrics = load(tests[0]) if tests else None
    if metrics:
        text += '; test SumR ' + ', '.join(f'{label} {v["sumr"]:.1f}' for label, v in metrics.items())
    print(text)
EOF
