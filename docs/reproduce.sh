#!/usr/bin/env bash
# Remakes every number and figure of docs/results.md and docs/analysis.md from the shipped
# tables: `bash docs/reproduce.sh [OUT]` (default OUT=multirun/docs; about 10 minutes on 2
# idle cores). Figures go to analysis/figures/, tables to the terminal and to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multirun/docs}
J="hydra/launcher=joblib hydra.launcher.n_jobs=2"
mkdir -p "$OUT"

# results.md, "The default scenario under the three policies"
python -m sim -m +policy=baseline,disaggregated,modality_aware hydra.sweep.dir=$OUT/default

# results.md, "Across cluster sizes": one multirun per size (the rate cannot follow the size in
# Hydra); conf/experiment/headline.yaml sweeps the three policies
python -m sim -m +experiment=headline cluster=h100x8   workload.arrival.rate=2   workload.num_requests=6000 hydra.sweep.dir=$OUT/h100x8 $J
python -m sim -m +experiment=headline cluster=h100x64  workload.arrival.rate=16  workload.num_requests=20000 seed=0,1 hydra.sweep.dir=$OUT/h100x64 $J
python -m sim -m +experiment=headline cluster=h100x512 workload.arrival.rate=128 workload.num_requests=60000 seed=0 hydra.sweep.dir=$OUT/h100x512 $J
python -m sim -m +experiment=headline cluster=h100x8   workload.arrival.rate=1,1.5,2,2.5,3 workload.num_requests=4000 seed=0,1 hydra.sweep.dir=$OUT/load_h100x8 $J
python -m sim -m +experiment=headline cluster=h100x64  workload.arrival.rate=20,24,28,32 workload.num_requests=20000 seed=0,1 hydra.sweep.dir=$OUT/load_h100x64 $J
python -m sim -m +experiment=headline cluster=h100x512 workload.arrival.rate=160,192,224,256 workload.num_requests=60000 seed=0 hydra.sweep.dir=$OUT/load_h100x512 $J

# results.md, "Capacity planning"
python -m sim +experiment=capacity capacity.target_qps=4 capacity.slo_p99_ms=120000 capacity.num_gpus=16 hydra.run.dir=$OUT/capacity_p99
python -m sim +experiment=capacity capacity.target_qps=4 capacity.slo_p99_ms=null capacity.min_attainment=0.99 capacity.num_gpus=16 hydra.run.dir=$OUT/capacity_goodput

# analysis.md, "Theory vs simulation"
for m in qwen2_5_vl_7b qwen_image flux1_dev; do python -m sim.studies.analytic model=$m gpu=h100; done

# the figures (analysis/figures/): the notebooks run with analysis/ as working directory
M=$(cd "$OUT" && pwd)          # absolute, whether OUT was given relative or absolute

# README's picture (docs/figures/report.png): the default scenario's report under modality_aware,
# as a headless chromium shows it; without chromium it says so and leaves the picture as it is
R=$M/default/2_modality_aware/report.html
if command -v chromium >/dev/null; then
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,745 \
        --screenshot=docs/figures/report.png "file://$R" 2>/dev/null
else
    echo "no chromium on PATH: docs/figures/report.png not remade (open $R)"
fi
MMSIM_HEADLINE_DIR=$M/h100x8:$M/load_h100x8:$M/h100x64:$M/load_h100x64:$M/h100x512:$M/load_h100x512 \
MMSIM_CAPACITY_JSON=$M/capacity_p99/capacity.json \
  python -c "import nbformat, nbclient
for n in ('compare_policies', 'capacity_planning', 'theory_vs_sim'):
    nb = nbformat.read(f'analysis/{n}.ipynb', as_version=4)
    nbclient.NotebookClient(nb, timeout=1800, kernel_name='python3', resources={'metadata': {'path': 'analysis'}}).execute()
    print('notebook', n, 'done')"
