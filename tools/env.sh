#!/usr/bin/env bash
# Builds the pinned environment from nothing, idempotently: .venv from tools/requirements-lock.txt
# (torch 2.14.1 + torchvision 0.29.1, ComfyUI 0.3.75's requirements minus torchaudio, diffusers and
# transformers as test references, pytest) and tools/requirements-nodeps.txt (DiffSynth-Studio, a test
# reference whose model files alone are used, without its dependencies), then the pinned ComfyUI host in the cache
# (with COMFYUI_PATH naming the user's own checkout: that checkout's requirements.txt instead, without
# torch, plus torchaudio where it asks for it; the pinned packages come back when COMFYUI_PATH is unset again).
# A second run costs about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
lock=tools/requirements-lock.txt
nodeps=tools/requirements-nodeps.txt
stamp="$venv/.built-from-$(cat "$lock" "$nodeps" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "tools/env.sh: building $venv from $lock (a few minutes the first time)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$lock" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input --no-deps -r "$nodeps" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2
  touch "$stamp"
fi
if [ -z "${COMFYUI_PATH:-}" ]; then
  # A newer host's requirements installed earlier (see below) are undone: the pinned host gets its own frontend back.
  if compgen -G "$venv/.host-requirements-*" >/dev/null; then
    echo "tools/env.sh: restoring the pinned packages of $lock" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$lock" 2>&1 \
      | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2
    rm -f "$venv"/.host-requirements-*
  fi
  "$venv/bin/python" -m tools.comfy_host install 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; } >/dev/null
elif [ -f "$COMFYUI_PATH/requirements.txt" ]; then
  # The user's host may need more than the pinned one (newer ones import comfy-kitchen, comfy-aimdo, torchaudio,
  # ...): its own requirements, once per version of that file, keeping the pinned torch and torchvision. No
  # torchaudio build for torch 2.14 is on the registry; 2.11.1 without its dependencies imports and runs on it.
  host_stamp="$venv/.host-requirements-$(sha256sum "$COMFYUI_PATH/requirements.txt" | cut -c1-16)"
  if [ ! -f "$host_stamp" ]; then
    echo "tools/env.sh: installing the requirements of $COMFYUI_PATH" >&2
    grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=~!;[]|$)' "$COMFYUI_PATH/requirements.txt" \
      > "$venv/host-requirements.txt" || true
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$venv/host-requirements.txt" 2>&1 \
      | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2
    if grep -qiE '^[[:space:]]*torchaudio[[:space:]]*([<>=~!;[]|$)' "$COMFYUI_PATH/requirements.txt"; then
      "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input --no-deps torchaudio==2.11.1 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2
    fi
    rm -f "$venv"/.host-requirements-*
    touch "$host_stamp"
  fi
fi
"$venv/bin/python" -m tools.comfy_host path >/dev/null
# Debian's Chromium for the browser tests (tests/test_browser.py), installed where apt-get is there to do it.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  as_root=""; [ "$(id -u)" = 0 ] || as_root="sudo -n"
  echo "tools/env.sh: installing chromium for the browser tests" >&2
  { $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
    || { $as_root apt-get update -q && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; } \
    >/dev/null 2>&1 || echo "tools/env.sh: could not install chromium; the browser tests need /usr/bin/chromium" >&2
fi
