#!/usr/bin/env bash
# One node against a cluster: the same `starling bench` scenarios against a single Starling
# (a cluster of one: one-member Raft groups) and against N nodes on this machine (replication
# 3, clients spread over the nodes, so most stanzas and every write cross nodes). CPU and
# memory are the sum over the nodes; disk bytes per stored message are the growth of all the
# nodes' data directories over the offline messages stored (every copy counted).
#
#   bench/cluster.sh                                  # chat and offline, 1 node then 3 nodes
#   bench/cluster.sh --nodes 1,3 --scenario bench/scenarios/offline.toml --param users=2000
#
# STARLING_SERVER_BIN runs another build as the servers (the load generator stays this one):
# an earlier commit's, for before/after figures; STARLING_SERVER_ARGS adds settings to every
# node (e.g. "--set cluster.replication=3").
#
# Ports: 26x22 (c2s), 26x80 (metrics), 27x41 (gossip), 27x51 (transport) for node x.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
counts=1,3
scenarios=()
params=()
out=""
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) counts=$2; shift 2 ;;
    --scenario) scenarios+=("$2"); shift 2 ;;
    --param) params+=(--param "$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "cluster.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#scenarios[@]} -gt 0 ] || scenarios=("$top/bench/scenarios/chat.toml" "$top/bench/scenarios/offline.toml")
out=${out:-$top/target/cluster-bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/starling-cluster.XXXXXX)
starling=${STARLING_BIN:-$top/target/release/starling}
if [ -z "${STARLING_BIN:-}" ]; then
  (cd "$top" && cargo build --release -q -p starling-node)
fi
server=${STARLING_SERVER_BIN:-$starling}
log() { printf '== %s\n' "$*" >&2; }
die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
  done
  pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

wait_port() {
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
metric() { # PORT NAME: the sum of a metric's samples
  curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d", s }'
}

# start N DIR: N nodes (N = 1: a standalone node), each on DIR/nX.
start() {
  local n=$1 d=$2
  for x in $(seq "$n"); do
    local args=(--set server.data_dir="$d/n$x" --set registration.mode=open --set c2s.require_tls=false
      --set c2s.listen="127.0.0.1:26${x}22" --set 'c2s.direct_tls_listen=""' --set metrics.listen="127.0.0.1:26${x}80")
    if [ "$n" -gt 1 ]; then
      args+=(--set cluster.node_name="n$x" --set cluster.gossip="127.0.0.1:27${x}41"
        --set cluster.transport="127.0.0.1:27${x}51" --set 'cluster.seeds=["127.0.0.1:27141"]')
    fi
    # shellcheck disable=SC2086 # word splitting wanted: a list of arguments
    "$server" serve "${args[@]}" ${STARLING_SERVER_ARGS:-} >>"$d/n$x.log" 2>&1 &
    pids+=($!)
    wait_port "26${x}22" || die "node $x did not start; see $d/n$x.log"
  done
  if [ "$n" -gt 1 ] && [ "$server" != "$starling" ]; then
    sleep 10 # another build: no slot status to wait for
  elif [ "$n" -gt 1 ]; then
    # Every slot's group on its three members, each with a leader.
    for _ in $(seq 120); do
      local st
      st=$("$starling" --set metrics.listen="127.0.0.1:26180" cluster status 2>/dev/null || true)
      if echo "$st" | grep -q "slots hosted by n1: 64" && ! echo "$st" | grep -Eq "no leader|learners|changing"; then
        return 0
      fi
      sleep 1
    done
    die "the cluster did not settle; see $d/*.log"
  fi
}

echo "# One node vs a cluster — $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores" >"$out/cluster.md"
for sc in "${scenarios[@]}"; do
  name=$(basename "$sc" .toml)
  reports=()
  for n in ${counts//,/ }; do
    d="$work/$name-$n"
    mkdir -p "$d" "$out/$name/$n"
    log "$name on $n node(s): provisioning"
    start "$n" "$d"
    "$starling" bench run "$sc" "${params[@]}" --target 127.0.0.1:26122 --provision-only \
      2>"$out/$name/$n/provision.log" || { tail -5 "$out/$name/$n/provision.log" >&2; die "provisioning failed"; }
    targets=()
    server_pids=()
    for x in $(seq "$n"); do targets+=(--target "127.0.0.1:26${x}22"); done
    for p in "${pids[@]}"; do server_pids+=(--server-pid "$p"); done
    bytes0=$(du -sb "$d" | cut -f1)
    stored0=$(metric 26180 starling_offline_messages)
    log "$name on $n node(s): load"
    "$starling" bench run "$sc" "${params[@]}" "${targets[@]}" "${server_pids[@]}" \
      --label "$n node(s)" --out "$out/$name/$n" >"$out/$name/$n/run.log" 2>&1 || { tail -5 "$out/$name/$n/run.log" >&2; die "load failed"; }
    sleep 2
    bytes1=$(du -sb "$d" | cut -f1)
    stored1=$(metric 26180 starling_offline_messages)
    stored=$((stored1 - stored0))
    if [ "$stored" -gt 0 ]; then
      printf '%s on %s node(s): %d offline messages stored, data directories grew %d bytes: %d bytes per stored message (all copies)\n' \
        "$name" "$n" "$stored" "$((bytes1 - bytes0))" "$(((bytes1 - bytes0) / stored))" | tee -a "$out/disk.txt"
    fi
    reports+=("$out/$name/$n/bench.json")
    cp "$d"/*.log "$out/$name/$n/" 2>/dev/null || true
    stop_all
  done
  { printf '\n## %s\n\n' "$name"; "$starling" bench compare "${reports[@]}"; } | tee -a "$out/cluster.md"
done
[ -e "$out/disk.txt" ] && { printf '\n'; cat "$out/disk.txt"; } >>"$out/cluster.md"
log "reports under $out (cluster.md)"
