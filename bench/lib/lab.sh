# shellcheck shell=bash disable=SC2034  # bin, hsload and the rest are read by the scripts that source this
# Sourced by bench/ab, bench/instructions and bench/memory: the harness's fake token upstream
# and its workloads, driven against a relay on https://127.0.0.1:18446, without the peers or
# the quiet gates of a full bench/run.
#
# Uses the set-up bench/run leaves in target/bench (certificate, wrk script, hsload, the fake
# upstream's nginx config): run `bench/run --quick` once first.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${BENCH_WORK:-$repo/target/bench}"
origin="https://127.0.0.1:18446"
callback="/v1/auth/callback?state=S&code=C&scope=X"

# lab_setup NAME TOOL...: checks the set-up, installs what is missing (Debian), builds the relay
# and hsload, starts the fake upstream; sets bin, hsload, tmp and pids, and cleans up on exit.
lab_setup() {
  local name="$1"; shift
  [[ -f "$work/oauth-relay.toml" && -f "$work/scripts/wrk.lua" ]] \
    || { echo "$name: run bench/run --quick once first (it sets up $work)" >&2; exit 2; }
  local need=() t
  for t in "$@" wrk nginx curl; do command -v "$t" >/dev/null 2>&1 || need+=("$t"); done
  if (( ${#need[@]} )); then
    echo "$name: installing what is missing: ${need[*]}" >&2
    local pkgs=()
    for t in "${need[@]}"; do
      case "$t" in
        callgrind_control) pkgs+=(valgrind) ;;
        perf) pkgs+=(linux-perf) ;;
        nginx) pkgs+=(nginx-light) ;;
        *) pkgs+=("$t") ;;
      esac
    done
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi

  # RELAY_BIN=path measures another build (an A/B of two commits) instead of this checkout's.
  if [[ -n "${RELAY_BIN:-}" ]]; then
    bin="$(realpath "$RELAY_BIN")"
  else
    cargo build --release --locked --manifest-path "$repo/Cargo.toml" >&2
    bin="$repo/target/release/oauth-relay"
  fi
  hsload="$work/tools/hsload/target/release/hsload"
  [[ -x "$hsload" ]] || cargo build --release --manifest-path "$work/tools/hsload/Cargo.toml" >&2

  if curl -sk -o /dev/null "$origin/healthz"; then
    echo "$name: something already answers on $origin; stop it first" >&2; exit 1
  fi

  tmp="$(mktemp -d)"
  pids=()
  trap lab_cleanup EXIT

  mkdir -p "$tmp/upstream-tmp"
  sed -e "s#@RUN@#$tmp#g" -e "s#@UPSTREAM_PORT@#18080#g" "$work/conf/nginx-upstream.conf" > "$tmp/upstream.conf"
  nginx -p "$tmp" -c "$tmp/upstream.conf" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 1 50); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:18080/v1/auth/token/x)" == 200 ]] && break
    sleep 0.1
  done
  kill -0 "${pids[0]}" 2>/dev/null \
    || { echo "$name: the fake upstream could not start (is :18080 or :18446 taken?)" >&2; exit 1; }
}

lab_cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}

# lab_wait_ready: until the relay answers /healthz (a minute: valgrind starts slowly).
lab_wait_ready() {
  for _ in $(seq 1 120); do curl -sk -o /dev/null "$origin/healthz" && return; sleep 0.5; done
  echo "the relay did not answer $origin/healthz" >&2
  return 1
}

# lab_drive WORKLOAD SECONDS [CONNS]: runs W1, W2 or W3 against the relay (8 connections, 4 for
# W2's handshake loops, unless CONNS); prints the units completed, or nothing when any answer
# was not the expected one (an error path is cheaper and would pass for an improvement).
lab_drive() {
  local conns="${3:-}"
  case "$1" in
    W1) BENCH_HOST=relay.test wrk -t1 -c"${conns:-8}" -d"$2"s -s "$work/scripts/wrk.lua" "$origin$callback" ;;
    W3) BENCH_METHOD=POST BENCH_HOST=relay.test wrk -t1 -c"${conns:-8}" -d"$2"s -s "$work/scripts/wrk.lua" "$origin/v1/auth/token/abc123" ;;
    W2) "$hsload" --addr 127.0.0.1:18446 --sni relay.test --path "$callback" --expect 302 --conns "${conns:-4}" --duration "$2" --warmup 0 ;;
  esac > "$tmp/drive.out"
  if grep -qE 'err_status=[1-9]|errors=[1-9]' "$tmp/drive.out"; then
    echo "$1 got unexpected answers: $(cat "$tmp/drive.out")" >&2
    return
  fi
  sed -nE 's/^(WRK|HSLOAD) .*(requests|ok)=([0-9]+).*/\3/p' "$tmp/drive.out"
}

# lab_check: the harness's functional check before it reads a peer's idle memory: a callback, a
# proxied token request, /healthz, an OpenSSL handshake.
lab_check() {
  curl -sk -o /dev/null "$origin$callback"
  curl -sk -o /dev/null -X POST -d 'grant_type=authorization_code' "$origin/v1/auth/token/abc123"
  curl -sk -o /dev/null "$origin/healthz"
  openssl s_client -connect "${origin#https://}" -servername relay.test -brief </dev/null >/dev/null 2>&1
}
