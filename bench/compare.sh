#!/usr/bin/env bash
# Side by side: the same `starling bench` scenarios against Starling, Prosody and ejabberd on
# this machine, one server after another, each on its own loopback port with a fresh data
# directory and the same users. Prints one table per scenario (ratios in Starling's favour) and
# writes everything under the output directory.
#
#   bench/compare.sh                      # chat (plain) and chat-tls against all three
#   bench/compare.sh --quick              # a short run: fewer users, 5 s measured
#   bench/compare.sh --servers starling,prosody --scenario bench/scenarios/smoke.toml
#   bench/compare.sh --param users=4000   # any scenario key, for every scenario
#
# Installs Prosody and ejabberd from Debian's packages when they are missing (needs root), and
# stops only the servers it started. Ports used: 25222/25223/25280 (Starling), 25322 (Prosody),
# 25422 (ejabberd).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
servers=starling,prosody,ejabberd
scenarios=()
params=()
out=""
quick=false
while [ $# -gt 0 ]; do
  case $1 in
    --servers) servers=$2; shift 2 ;;
    --scenario) scenarios+=("$2"); shift 2 ;;
    --param) params+=(--param "$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    --quick) quick=true; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#scenarios[@]} -gt 0 ] || scenarios=("$top/bench/scenarios/chat.toml" "$top/bench/scenarios/chat-tls.toml")
if $quick; then
  params=(--param users=500 --param duration_secs=5 --param warmup_secs=1 "${params[@]}")
fi
out=${out:-$top/target/compare/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# The servers run as their own users: the work area must be reachable by them.
work=$(mktemp -d /tmp/starling-compare.XXXXXX)
chmod 755 "$work"

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'compare.sh: %s\n' "$*" >&2; exit 1; }
want() { [[ ",$servers," == *",$1,"* ]]; }

# --- what we need -----------------------------------------------------------------------------
starling=${STARLING_BIN:-$top/target/release/starling}
if [ -z "${STARLING_BIN:-}" ]; then
  log "building starling (release)"
  (cd "$top" && cargo build --release -q -p starling-node)
fi
[ -x "$starling" ] || die "no starling binary at $starling"

missing=()
want prosody && ! command -v prosody >/dev/null && missing+=(prosody)
want ejabberd && ! command -v ejabberdctl >/dev/null && missing+=(ejabberd)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "${missing[*]} missing; install them (apt-get install ${missing[*]}) or run as root"
  log "installing ${missing[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if want prosody || want ejabberd; then
  [ "$(id -u)" = 0 ] || die "Prosody and ejabberd are started as their own users: run as root"
fi

# One self-signed certificate for `localhost`, for the TLS variant of Prosody and ejabberd
# (Starling makes its own on first start).
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" >"$work/both.pem"
chmod 644 "$work"/*.pem

# Every server gets the open-file limit this shell may have (one file per connection).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge 4096 ] || log "warning: open-file limit $(ulimit -n); big scenarios will fail"

# --- starting and stopping, only what we started ----------------------------------------------
started_pid=""
stop_cmd=""
stop_server() {
  if [ -n "$stop_cmd" ]; then
    eval "$stop_cmd" >/dev/null 2>&1 || true
  fi
  if [ -n "$started_pid" ] && kill -0 "$started_pid" 2>/dev/null; then
    kill "$started_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$started_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$started_pid" 2>/dev/null || true
  fi
  started_pid=""
  stop_cmd=""
}
trap 'stop_server; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# start_NAME DIR: start the server on a fresh directory, set started_pid (the process whose CPU
# and memory are measured) and stop_cmd, and echo the c2s port.
start_starling() {
  local d=$1
  port_free 25222 || die "port 25222 is taken: is another server running?"
  "$starling" serve --set server.data_dir="$d/data" --set registration.mode=open \
    --set c2s.require_tls=false --set c2s.listen=127.0.0.1:25222 \
    --set c2s.direct_tls_listen=127.0.0.1:25223 --set metrics.listen=127.0.0.1:25280 \
    >"$d/server.log" 2>&1 &
  started_pid=$!
  wait_port 25222 || die "starling did not start; see $d/server.log"
}

start_prosody() {
  local d=$1
  port_free 25322 || die "port 25322 is taken: is another server running?"
  mkdir -p "$d/data"
  cat >"$d/prosody.cfg.lua" <<EOF
-- Written by bench/compare.sh: plain c2s on 25322, open registration, nothing else.
pidfile = "$d/prosody.pid"
data_path = "$d/data"
daemonize = false
log = { warn = "$d/server.log" }
network_backend = "epoll"
network_settings = { tcp_backlog = 4096 }
c2s_ports = { 25322 }
c2s_interfaces = { "127.0.0.1" }
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
allow_registration = true
modules_enabled = { "roster", "saslauth", "tls", "disco", "ping", "register", "offline", "version" }
modules_disabled = { "s2s" }
s2s_ports = { }
authentication = "internal_hashed"
storage = "internal"
VirtualHost "localhost"
  ssl = { certificate = "$work/cert.pem", key = "$work/key.pem" }
EOF
  chown -R prosody:prosody "$d"
  # setpriv, not runuser or su: those go through PAM and drop the open-file limit to 1024.
  setpriv --reuid prosody --regid prosody --init-groups prosody --config "$d/prosody.cfg.lua" \
    >>"$d/server.log" 2>&1 &
  started_pid=$!
  wait_port 25322 || die "prosody did not start; see $d/server.log"
}

start_ejabberd() {
  local d=$1
  port_free 25422 || die "port 25422 is taken: is another server running?"
  mkdir -p "$d/spool" "$d/logs"
  cat >"$d/ejabberd.yml" <<EOF
# Written by bench/compare.sh: c2s on 25422 without a shaper, open registration.
hosts: ["localhost"]
loglevel: warning
certfiles: ["$work/both.pem"]
auth_method: internal
auth_password_format: plain
registration_timeout: infinity
listen:
  - port: 25422
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls: true
    starttls_required: false
    max_stanza_size: 1048576
    shaper: none
    backlog: 4096
    access: c2s
shaper_rules:
  c2s_shaper: none
access_rules:
  c2s: {allow: all}
  register: {allow: all}
modules:
  mod_disco: {}
  mod_offline: {}
  mod_ping: {}
  mod_register: {ip_access: all, access: register}
  mod_roster: {}
  mod_version: {}
EOF
  cat >"$d/ejabberdctl.cfg" <<EOF
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
ERL_MAX_PORTS=65536
ERLANG_NODE=starling_compare@localhost
EJABBERD_PID_PATH=$d/ejabberd.pid
EOF
  chown -R ejabberd:ejabberd "$d"
  # As the ejabberd user, keeping this shell's open-file limit (su would drop it to 1024).
  local ctl="setpriv --reuid ejabberd --regid ejabberd --init-groups env HOME=/var/lib/ejabberd \
ejabberdctl --config $d/ejabberd.yml --ctl-config $d/ejabberdctl.cfg --spool $d/spool --logs $d/logs"
  $ctl start >"$d/server.log" 2>&1 || die "ejabberd did not start; see $d/logs"
  stop_cmd="$ctl stop; $ctl stopped"
  $ctl started >/dev/null 2>&1 || true
  wait_port 25422 || die "ejabberd did not open 25422; see $d/logs"
  for _ in $(seq 50); do [ -s "$d/ejabberd.pid" ] && break; sleep 0.1; done
  started_pid=$(cat "$d/ejabberd.pid" 2>/dev/null || pgrep -f 'starling_compare@localhost' | head -1)
}

port_of() { case $1 in starling) echo 25222 ;; prosody) echo 25322 ;; ejabberd) echo 25422 ;; esac; }

# --- the runs ---------------------------------------------------------------------------------
echo "# Starling vs Prosody vs ejabberd — $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores" >"$out/compare.md"
for sc in "${scenarios[@]}"; do
  name=$(basename "$sc" .toml)
  reports=()
  for s in starling prosody ejabberd; do
    want "$s" || continue
    # One data directory per server and user set: scenarios with the same users and rosters
    # share one provisioning (Prosody takes minutes for a few thousand users).
    users=$("$starling" bench run "$sc" "${params[@]}" --describe)
    d="$work/$s-$users"
    mkdir -p "$d" "$out/$name/$s"
    port=$(port_of "$s")
    if [ ! -e "$d/provisioned" ]; then
      log "$name on $s: provisioning ($users)"
      "start_$s" "$d"
      "$starling" bench run "$sc" "${params[@]}" --target "127.0.0.1:$port" --provision-only \
        2>"$out/$name/$s/provision.log" || { tail -5 "$out/$name/$s/provision.log" >&2; die "$name: provisioning $s failed"; }
      touch "$d/provisioned"
      stop_server
    fi
    # Each load run starts the server afresh: memory is measured from a clean start, as an
    # operator's server would be after a deploy.
    "start_$s" "$d"
    log "$name on $s: load (pid $started_pid)"
    if "$starling" bench run "$sc" "${params[@]}" --target "127.0.0.1:$port" \
      --server-pid "$started_pid" --label "$s" --out "$out/$name/$s" >"$out/$name/$s/run.log" 2>&1; then
      reports+=("$out/$name/$s/bench.json")
    else
      tail -5 "$out/$name/$s/run.log" >&2
      log "$name on $s failed; left out of the table"
    fi
    cp "$d"/server.log "$out/$name/$s/" 2>/dev/null || true
    stop_server
  done
  if [ ${#reports[@]} -gt 0 ]; then
    { printf '\n## %s\n\n' "$name"; "$starling" bench compare "${reports[@]}"; } | tee -a "$out/compare.md"
  fi
done
log "reports under $out (compare.md, one bench.{json,md,png} per scenario and server)"
