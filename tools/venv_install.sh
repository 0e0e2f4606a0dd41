# Sourced by tools/setup_env.sh and tools/setup_env_mcore019.sh: `venv_install VENV ARGS...` installs into
# VENV what `pip install ARGS...` would, with uv (pinned below) when it can be installed, else with pip.
# Why uv: the same pinned set (every version comes from the constraints files) in 104 s instead of ~4.3 min
# for .venv in a fresh-clone run (cold caches; parallel downloads, unpacking and byte-compiling); the CPU venv is the
# first thing `make demo` and `make test` wait for on a fresh machine.
# uv reads neither pip.conf nor PIP_* variables: pip's configured find-links and extra indexes (where
# this machine's pip finds torch's +cpu wheel, for instance) are handed to it explicitly.
UV_VERSION=0.13.9

_pip_setting() {  # the value of a pip setting: PIP_<NAME> if set, else `pip config get global.<name>`
  local env_name="PIP_$(echo "$2" | tr 'a-z-' 'A-Z_')" value
  value=${!env_name:-}
  [ -n "$value" ] || value=$("$1/bin/python" -m pip config get "global.$2" 2>/dev/null) || value=""
  echo "$value"
}

_use_uv() {  # uv for VENV: not turned off, and already there or installable by the venv's pip
  [ "${MEGATRON_GRPO_USE_PIP:-0}" != 1 ] && { [ -x "$1/bin/uv" ] \
    || "$1/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >/dev/null 2>&1; }
}

venv_install() {
  local venv=$1; shift
  if _use_uv "$venv"; then
    local extra=() link index
    for link in $(_pip_setting "$venv" find-links); do [ -e "$link" ] && extra+=(--find-links "$link"); done
    for index in $(_pip_setting "$venv" extra-index-url); do
      case $index in file://*) [ -e "${index#file://}" ] || continue ;; esac
      extra+=(--extra-index-url "$index")
    done
    # unsafe-best-match: like pip, take the best version from any index (uv's default stops at the first).
    # --compile-bytecode: like pip, write the .pyc files now; else the suite's first processes, a dozen
    # starting at once, each compile torch, vLLM and megatron-core themselves (seen: an engine start
    # past a 300 s guard).
    "$venv/bin/uv" pip install -q --python "$venv/bin/python" --index-strategy unsafe-best-match --compile-bytecode \
      "${extra[@]}" "$@"
  else
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
  fi
}

venv_uninstall() {
  local venv=$1; shift
  if _use_uv "$venv"; then "$venv/bin/uv" pip uninstall -q --python "$venv/bin/python" "$@"
  else "$venv/bin/python" -m pip uninstall -q -y --disable-pip-version-check "$@"; fi
}
