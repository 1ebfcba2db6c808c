# Sourced by the scripts: installs missing Debian packages with apt when running as root (or with
# sudo), otherwise stops and names them.
#
#   need_packages script-name 'package=shell test that it is there' ...

need_packages() {
  local who=$1
  shift
  local missing=() spec pkg check
  for spec in "$@"; do
    pkg=${spec%%=*}
    check=${spec#*=}
    bash -c "$check" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else sudo=(none); fi
  fi
  if [[ ${sudo[0]:-} == none ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$who: missing ${missing[*]}; install them (Debian: apt-get install -y ${missing[*]}) and run again" >&2
    exit 2
  fi
  echo "$who: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
