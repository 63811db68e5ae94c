#!/usr/bin/env bash
# Set up the development environment of pose_estimator (called by `make setup`).
#
#   scripts/setup_env.sh           create/refresh what is out of date
#   scripts/setup_env.sh --build   same, and always re-run the colcon build
#
# Steps (each skipped when its stamp is newer than its inputs):
#   1. .venv           python3 -m venv (Python 3.11: the ros-* wheels are cp311)
#   2. requirements    pip install -r requirements.txt, then rewrite the build
#                      image's Python/numpy include paths in .venv/share/**/*.cmake
#   3. editable        pip install -e . --no-deps (the `pose-estimator` command)
#   4. colcon build    this package (messages + Python) and, where tf2_msgs is not
#                      importable, a generated one-message tf2_msgs package
#                      (build/tf2_msgs_src); outputs in build/ install/ log/
# Nothing is written outside the repository (pip runs with --no-cache-dir).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
REQ_STAMP="$VENV/.requirements.stamp"
EDIT_STAMP="$VENV/.editable.stamp"
BUILD_STAMP="$ROOT/install/.pose_estimator-build.stamp"
TF2_SRC="$ROOT/build/tf2_msgs_src"
PYTHON="${PYTHON:-python3}"

FORCE_BUILD=0
for arg in "$@"; do
  case "$arg" in
    --build) FORCE_BUILD=1 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup_env.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

log() { printf '[setup] %s\n' "$*" >&2; }

# One setup at a time per checkout (e.g. two `make test` started together).
mkdir -p "$ROOT/build"
exec 9>"$ROOT/build/.setup_env.lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 3600 9 || { echo "setup_env.sh: timed out waiting for another setup" >&2; exit 1; }
fi

# up_to_date STAMP PATH... : the stamp exists and no PATH (file or directory,
# searched recursively) was modified after it.
up_to_date() {
  local stamp="$1"; shift
  [ -e "$stamp" ] || return 1
  local existing=()
  local p
  for p in "$@"; do [ -e "$p" ] && existing+=("$p"); done
  [ "${#existing[@]}" -eq 0 ] && return 0
  [ -z "$(find "${existing[@]}" -newer "$stamp" -not -name '*.pyc' -not -name '__pycache__' -print -quit 2>/dev/null)" ]
}

# write_if_changed FILE : stdin -> FILE, leaving FILE (and its mtime) alone if equal.
write_if_changed() {
  local tmp
  tmp="$(mktemp "$1.XXXXXX")"
  cat >"$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}

# ---------------------------------------------------------------- 1. venv
if [ ! -x "$PY" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "setup_env.sh: need Python 3.11 as '$PYTHON' (the ROS 2 wheels are cp311); set PYTHON=..." >&2
    exit 1
  fi
  log "creating .venv"
  "$PYTHON" -m venv "$VENV"
  rm -f "$REQ_STAMP" "$EDIT_STAMP"
fi
# The venv's share/ holds package.xml files of the ROS wheels: keep a plain
# `colcon build` in the repo root from crawling into it.
[ -e "$VENV/COLCON_IGNORE" ] || touch "$VENV/COLCON_IGNORE"

# ---------------------------------------------------------------- 2. requirements
if ! up_to_date "$REQ_STAMP" requirements.txt; then
  log "installing requirements.txt into .venv"
  "$PY" -m pip install --no-cache-dir --no-input --progress-bar off -r requirements.txt
  log "fixing build-image paths in .venv/share/**/*.cmake"
  "$PY" - <<'EOF'
import pathlib, sys, sysconfig
import numpy
repl = [
    ("/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include", numpy.get_include()),
    ("/opt/python/cp311-cp311/include/python3.11", sysconfig.get_paths()["include"]),
]
n = 0
for f in pathlib.Path(sys.prefix, "share").rglob("*.cmake"):
    text = f.read_text()
    new = text
    for old, rep in repl:
        new = new.replace(old, rep)
    if new != text:
        f.write_text(new)
        n += 1
print(f"[setup] rewrote {n} cmake files", file=sys.stderr)
EOF
  touch "$REQ_STAMP"
  rm -f "$BUILD_STAMP"
fi

# ---------------------------------------------------------------- 3. editable install
if ! up_to_date "$EDIT_STAMP" setup.py setup.cfg "$REQ_STAMP"; then
  log "pip install -e . --no-deps"
  "$PY" -m pip install --no-cache-dir --no-input --no-deps --no-build-isolation -e .
  touch "$EDIT_STAMP"
fi

# ---------------------------------------------------------------- 4. colcon build
if [ "$FORCE_BUILD" = 1 ] || [ ! -d install/pose_estimator ] || [ -d "$TF2_SRC" -a ! -d install/tf2_msgs ] || \
   ! up_to_date "$BUILD_STAMP" package.xml CMakeLists.txt msg launch config resource scripts/nodes \
       scripts/setup_env.sh "$REQ_STAMP"; then
  (
    # Build environment: the venv is the ROS prefix (ament, rosidl, messages).
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    strip_ours() {  # drop this repo's install/ entries from a path list
      local out="" p
      local IFS=:
      for p in $1; do
        case "$p" in ""|"$ROOT/install"|"$ROOT/install/"*) ;; *) out="${out:+$out:}$p" ;; esac
      done
      printf '%s' "$out"
    }
    export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$(strip_ours "$AMENT_PREFIX_PATH")}"
    export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$(strip_ours "$CMAKE_PREFIX_PATH")}"
    export PYTHONPATH="$(strip_ours "${PYTHONPATH:-}")"
    export COLCON_PREFIX_PATH="$(strip_ours "${COLCON_PREFIX_PATH:-}")"
    [ -n "$PYTHONPATH" ] || unset PYTHONPATH
    [ -n "$COLCON_PREFIX_PATH" ] || unset COLCON_PREFIX_PATH
    export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"

    paths=(.)
    if "$PY" -c 'import tf2_msgs.msg' >/dev/null 2>&1; then
      log "tf2_msgs found; not building the stand-in"
      rm -rf "$TF2_SRC"
    else
      log "tf2_msgs not importable: generating build/tf2_msgs_src (tf2_msgs/msg/TFMessage)"
      mkdir -p "$TF2_SRC/msg"
      write_if_changed "$TF2_SRC/msg/TFMessage.msg" <<'EOF'
# Same definition as tf2_msgs/msg/TFMessage of ROS 2 (same wire format and type hash).
geometry_msgs/TransformStamped[] transforms
EOF
      write_if_changed "$TF2_SRC/package.xml" <<'EOF'
<?xml version="1.0"?>
<package format="3">
  <name>tf2_msgs</name>
  <version>0.0.0</version>
  <description>Stand-in for tf2_msgs with only msg/TFMessage, generated by pose_estimator's scripts/setup_env.sh where tf2_msgs is not installed.</description>
  <maintainer email="maintainers@pose-estimator.dev">pose_estimator maintainers</maintainer>
  <license>Apache-2.0</license>
  <buildtool_depend>ament_cmake</buildtool_depend>
  <buildtool_depend>rosidl_default_generators</buildtool_depend>
  <depend>geometry_msgs</depend>
  <exec_depend>rosidl_default_runtime</exec_depend>
  <member_of_group>rosidl_interface_packages</member_of_group>
  <export>
    <build_type>ament_cmake</build_type>
  </export>
</package>
EOF
      write_if_changed "$TF2_SRC/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.16)
project(tf2_msgs)
find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
find_package(geometry_msgs REQUIRED)
rosidl_generate_interfaces(${PROJECT_NAME} "msg/TFMessage.msg" DEPENDENCIES geometry_msgs)
ament_export_dependencies(rosidl_default_runtime)
ament_package()
EOF
      paths+=("$TF2_SRC")
    fi

    log "colcon build ${paths[*]}"
    colcon build \
      --paths "${paths[@]}" \
      --build-base build --install-base install \
      --symlink-install \
      --event-handlers status- desktop_notification- \
      --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$PY"
  )
  touch "$BUILD_STAMP"
else
  log "colcon build up to date"
fi
log "done; use: source activate.sh"
