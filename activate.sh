# Source this file (bash or zsh) after `make setup`:   source activate.sh
#
# Gives a shell where `pose-estimator`, `python -m pytest`, the benchmarks and
# the node executables work without a ROS install: activates .venv (whose root
# is a ROS 2 Kilted install prefix, from PyPI wheels), overlays the colcon
# install/ tree (generated messages, stand-in tf2_msgs), and puts the source
# checkout first on PYTHONPATH so `pose_estimator.*` is imported from the repo
# (edits need no rebuild) while `pose_estimator.msg` comes from install/
# (pose_estimator/__init__.py uses pkgutil.extend_path).

if [ -n "${BASH_SOURCE:-}" ]; then
  _pe_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
elif [ -n "${ZSH_VERSION:-}" ]; then
  # shellcheck disable=SC2296
  _pe_root="$(cd "$(dirname "${(%):-%x}")" && pwd)"
else
  _pe_root="$(pwd)"
fi

if [ ! -x "$_pe_root/.venv/bin/python" ]; then
  echo "activate.sh: $_pe_root/.venv is missing; run 'make setup' first" >&2
  unset _pe_root
  return 1 2>/dev/null || exit 1
fi

# _pe_prepend VAR DIR: put DIR first in the :-separated list VAR (once).
_pe_prepend() {
  local _cur _new="" _p
  eval "_cur=\${$1:-}"
  while [ -n "$_cur" ]; do
    _p="${_cur%%:*}"
    case "$_cur" in *:*) _cur="${_cur#*:}" ;; *) _cur="" ;; esac
    if [ -n "$_p" ] && [ "$_p" != "$2" ]; then _new="${_new:+$_new:}$_p"; fi
  done
  export "$1=$2${_new:+:$_new}"
}

# 1. the virtual environment (also the ROS prefix of the pip wheels)
# shellcheck disable=SC1091
. "$_pe_root/.venv/bin/activate"
case ":${AMENT_PREFIX_PATH:-}:" in *":$_pe_root/.venv:"*) ;; *) _pe_prepend AMENT_PREFIX_PATH "$_pe_root/.venv" ;; esac
case ":${CMAKE_PREFIX_PATH:-}:" in *":$_pe_root/.venv:"*) ;; *) _pe_prepend CMAKE_PREFIX_PATH "$_pe_root/.venv" ;; esac

# 2. the colcon install tree: sets AMENT_PREFIX_PATH, CMAKE_PREFIX_PATH,
#    PYTHONPATH, LD_LIBRARY_PATH and PATH for install/<pkg>.
#    (colcon's scripts do not support `set -u`: lift it while they run)
case $- in *u*) _pe_nounset=1; set +u ;; *) _pe_nounset= ;; esac
if [ -f "$_pe_root/install/local_setup.bash" ] && [ -n "${BASH_VERSION:-}" ]; then
  . "$_pe_root/install/local_setup.bash"
elif [ -f "$_pe_root/install/local_setup.zsh" ] && [ -n "${ZSH_VERSION:-}" ]; then
  . "$_pe_root/install/local_setup.zsh"
elif [ ! -d "$_pe_root/install" ]; then
  echo "activate.sh: no install/ tree (messages not built); run 'make setup'" >&2
fi
if [ -n "$_pe_nounset" ]; then set -u; fi
unset _pe_nounset

# 3. the source checkout first, so pose_estimator.* resolves to the repo
_pe_prepend PYTHONPATH "$_pe_root"
# (drop empty entries, e.g. a trailing ':' which would mean the current directory)
_pe_prepend LD_LIBRARY_PATH "$_pe_root/install/pose_estimator/lib"

# 4. ROS 2 defaults for this machine: discovery on loopback only, Fast DDS,
#    a domain of our own. Values already set are kept.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export ROS_LOCALHOST_ONLY="${ROS_LOCALHOST_ONLY:-1}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-42}"
# ROS node logs inside the repo rather than ~/.ros/log
export ROS_LOG_DIR="${ROS_LOG_DIR:-$_pe_root/log/ros}"

export POSE_ESTIMATOR_ROOT="$_pe_root"
unset _pe_root
unset -f _pe_prepend
hash -r 2>/dev/null || true
