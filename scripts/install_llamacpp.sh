#!/usr/bin/env bash
# Build and install llama-cpp-python (the [llamacpp] extra) with CMAKE_ARGS that fit THIS CPU.
#   scripts/install_llamacpp.sh [--dry-run] [--force]
#     --dry-run  print the detected CPU features and the CMAKE_ARGS, build nothing
#     --force    rebuild even when llama_cpp already imports
#   PYTHON=/path/to/python  the environment to install into (default .venv/bin/python)
#
# Why a script: this repository's machines differ (one CPU has AVX-VNNI, another only
# AVX512-VNNI; some have AMX), and a build that enables an instruction the CPU lacks dies of
# an illegal instruction at run time, while ggml's own native detection has picked paths
# (AMX matmul) that crashed. So every ggml x86 feature is switched on or off explicitly from
# /proc/cpuinfo's flags, with GGML_NATIVE off, and AMX always off (it crashes even where listed).
# Other architectures (arm64) build natively.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
PYTHON=${PYTHON:-.venv/bin/python}
DRY_RUN=0
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "install_llamacpp.sh: unknown option $arg (use --dry-run, --force)" >&2; exit 2 ;;
  esac
done

args=(-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF)
machine=$(uname -m)
if [[ "$machine" == x86_64 ]]; then
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  has() { [[ "$flags" == *" $1 "* ]]; }
  args+=(-DGGML_NATIVE=OFF)
  # ggml option  <- /proc/cpuinfo flag
  for pair in AVX:avx AVX2:avx2 FMA:fma F16C:f16c BMI2:bmi2 AVX_VNNI:avx_vnni \
              AVX512:avx512f AVX512_VBMI:avx512vbmi AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16; do
    option=${pair%%:*} flag=${pair#*:}
    if has "$flag"; then args+=("-DGGML_${option}=ON"); else args+=("-DGGML_${option}=OFF"); fi
  done
  # AMX stays off even where the CPU lists it: on this project's Xeon machines (amx_tile/int8/bf16
  # in /proc/cpuinfo, the kernel granting XTILEDATA) ggml's AMX matmul dies of an invalid opcode
  # at its first `tileloadd` (seen with 0.3.36 on 2026-12-04, the whole worker killed by SIGILL).
  args+=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
else
  args+=(-DGGML_NATIVE=ON)
  echo "CPU: $machine (native build)"
fi
export CMAKE_ARGS="${args[*]}"
echo "CMAKE_ARGS=\"$CMAKE_ARGS\""

if [[ $DRY_RUN == 1 ]]; then
  exit 0
fi
if [[ ! -x "$PYTHON" ]]; then
  echo "install_llamacpp.sh: no Python at $PYTHON; run \`make venv\` first or set PYTHON=" >&2
  exit 2
fi
if [[ $FORCE == 0 ]] && "$PYTHON" -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python is already installed ($("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')); --force rebuilds it"
  exit 0
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "Building llama-cpp-python==$VERSION from source (15-30 minutes on 2 cores) ..."
pip_args=(--no-cache-dir)
if [[ $FORCE == 1 ]]; then pip_args+=(--force-reinstall --no-deps); fi
"$PYTHON" -m pip install "${pip_args[@]}" "llama-cpp-python==$VERSION"
# its OpenAI server's imports (bench compare/quality serve .gguf targets with it); the same pins as
# pyproject.toml's [llamacpp] extra
"$PYTHON" -m pip install "sse-starlette==3.7.1" "starlette-context==0.5.1" "pydantic-settings==2.16.3"
"$PYTHON" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
