#!/usr/bin/env bash
# Router benchmark on 127.0.0.1, side by side in one run:
#   direct  - wrk straight to one variant;
#   keelson - `keelson router` (release build) splitting 90/10 over two variants;
#   nginx   - nginx `split_clients` with the same 90/10 weights and keep-alive upstreams.
# The proxy under test (keelson or nginx, one worker thread each) is pinned to PROXY_CPU; wrk and
# the variant stand-ins (one nginx worker answering `return 200`) share LOAD_CPU. Prints a table;
# asserts nothing (timings are measurements, not tests). The last column is the CPU time the serving
# process (the variant's nginx worker for direct, the router, the proxy nginx's worker) spent per
# request, and the kernel's share of it. Every process is stopped on exit.
#
# The VM this runs on changes speed by up to half within seconds, so the targets take turns in short
# measurements over many rounds, and the keelson/nginx ratio is read per round (the two measured back
# to back) and summarised by its median.
#
# A second table counts the instructions each proxy runs in user space per request, under valgrind's
# callgrind: a count that does not depend on the VM's speed (the kernel's part is not counted).
#
# Knobs (environment): DURATION (s per measurement, 3), ROUNDS (9), WARMUP (s, 1), CONNS (wrk connections, 32),
# PROXY_CPU (0), LOAD_CPU (1), PORT_BASE (18080), SKIP_BUILD (1: use the existing release binary),
# KEELSON (the binary to measure; default target/release/keelson), CALLGRIND (0: skip the instruction
# count), CALLGRIND_DURATION (s of load under callgrind, 5).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-3}
ROUNDS=${ROUNDS:-9}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-32}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PORT_BASE=${PORT_BASE:-18080}
P_CHAMPION=$((PORT_BASE + 1))
P_CHALLENGER=$((PORT_BASE + 2))
P_ROUTER=$((PORT_BASE + 3))
P_ADMIN=$((PORT_BASE + 4))
P_NGINX=$((PORT_BASE + 5))
P_CG_ROUTER=$((PORT_BASE + 6))
P_CG_ADMIN=$((PORT_BASE + 7))
P_CG_NGINX=$((PORT_BASE + 8))
P_H2_CHAMPION=$((PORT_BASE + 9))
P_H2_CHALLENGER=$((PORT_BASE + 10))
P_H2_ROUTER=$((PORT_BASE + 11))
P_H2_ADMIN=$((PORT_BASE + 12))
P_H2_NGINX=$((PORT_BASE + 13))
H2_STREAMS=${H2_STREAMS:-8}
H2_CONNS=${H2_CONNS:-4}

log() { printf '[bench-router] %s\n' "$*" >&2; }

NGINX=$(command -v nginx || echo /usr/sbin/nginx)
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[[ -x $NGINX ]] || missing+=(nginx-light)
command -v taskset >/dev/null || missing+=(util-linux)
command -v h2load >/dev/null || missing+=(nghttp2-client)
CALLGRIND=${CALLGRIND:-1}
CALLGRIND_DURATION=${CALLGRIND_DURATION:-5}
[[ $CALLGRIND == 0 ]] || command -v valgrind >/dev/null || missing+=(valgrind)
if ((${#missing[@]})); then
  # On a fresh Debian machine, install what is missing (as root, or with sudo when it needs no password).
  SUDO=()
  [[ $(id -u) == 0 ]] || SUDO=(sudo -n)
  log "installing ${missing[*]} from Debian's packages"
  if ! { "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >&2; then
    log "missing: ${missing[*]} (Debian: apt-get install ${missing[*]})"
    exit 1
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi

work=$(mktemp -d /tmp/keelson-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port [tenths of a second]: waits up to 10 s (or as given) for a listener
  for _ in $(seq "${2:-100}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing listens on 127.0.0.1:$1"
  exit 1
}

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building the release binary"
  cargo build --release --bin keelson -q
fi
KEELSON=${KEELSON:-target/release/keelson}

nginx_conf() { # name body [main]: a minimal nginx config under $work/name
  local d="$work/$1"
  mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<CONF
worker_processes 1;
daemon off;
${3:-}
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
$2
}
CONF
  echo "$d"
}

# The variants: one nginx worker answering each variant's name, over HTTP/1.1 and, for the gRPC
# row, over h2c as a gRPC server would (content-type application/grpc, a grpc-status trailer).
h2c_variant() { # port name
  echo "server { listen 127.0.0.1:$1 http2; location / { default_type application/grpc;
    add_trailer grpc-status 0; return 200 \"$2\n\"; } }"
}
d=$(nginx_conf upstreams "
  server { listen 127.0.0.1:$P_CHAMPION; location / { return 200 \"champion\n\"; } }
  server { listen 127.0.0.1:$P_CHALLENGER; location / { return 200 \"challenger\n\"; } }
  $(h2c_variant "$P_H2_CHAMPION" champion)
  $(h2c_variant "$P_H2_CHALLENGER" challenger)")
taskset -c "$LOAD_CPU" "$NGINX" -p "$d" -c "$d/nginx.conf" 2>"$d/stderr" &
pids+=($!)

# nginx as the split proxy: split_clients on a per-request random id, keep-alive upstreams.
split_proxy() { # port
  echo "
  upstream champion { server 127.0.0.1:$P_CHAMPION; keepalive 128; }
  upstream challenger { server 127.0.0.1:$P_CHALLENGER; keepalive 128; }
  split_clients \"\${request_id}\" \$variant { 90% champion; * challenger; }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://\$variant;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }"
}
d=$(nginx_conf proxy "$(split_proxy "$P_NGINX")
  upstream h2champion { server 127.0.0.1:$P_H2_CHAMPION; keepalive 128; }
  upstream h2challenger { server 127.0.0.1:$P_H2_CHALLENGER; keepalive 128; }
  split_clients \"\${request_id}\" \$h2variant { 90% h2champion; * h2challenger; }
  server { listen 127.0.0.1:$P_H2_NGINX http2; location / { grpc_pass grpc://\$h2variant; } }")
taskset -c "$PROXY_CPU" "$NGINX" -p "$d" -c "$d/nginx.conf" 2>"$d/stderr" &
pids+=($!)

# The Keelson router with the same split, one worker thread.
cat >"$work/router.json" <<JSON
{"version": 1, "variants": [
  {"name": "champion", "weight": 90, "upstream": "127.0.0.1:$P_CHAMPION"},
  {"name": "challenger", "weight": 10, "upstream": "127.0.0.1:$P_CHALLENGER"}
]}
JSON
RUST_LOG=warn taskset -c "$PROXY_CPU" "$KEELSON" router --workers 1 --config "$work/router.json" \
  --listen "127.0.0.1:$P_ROUTER" --admin-listen "127.0.0.1:$P_ADMIN" >"$work/router.log" 2>&1 &
router_pid=$!
pids+=($!)
cat >"$work/router-h2c.json" <<JSON
{"version": 1, "variants": [
  {"name": "champion", "weight": 90, "upstream": "127.0.0.1:$P_H2_CHAMPION", "protocol": "h2c"},
  {"name": "challenger", "weight": 10, "upstream": "127.0.0.1:$P_H2_CHALLENGER", "protocol": "h2c"}
]}
JSON
RUST_LOG=warn taskset -c "$PROXY_CPU" "$KEELSON" router --workers 1 --config "$work/router-h2c.json" \
  --listen "127.0.0.1:$P_H2_ROUTER" --admin-listen "127.0.0.1:$P_H2_ADMIN" >"$work/router-h2c.log" 2>&1 &
h2_router_pid=$!
pids+=($!)

for p in "$P_CHAMPION" "$P_CHALLENGER" "$P_NGINX" "$P_ROUTER" "$P_ADMIN" \
  "$P_H2_CHAMPION" "$P_H2_CHALLENGER" "$P_H2_NGINX" "$P_H2_ROUTER" "$P_H2_ADMIN"; do wait_port "$p"; done

cat >"$work/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format("RESULT %.0f %.3f %.3f %.3f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    errors, summary.requests))
end
LUA

cpu_ticks() { # pid...: user and system clock ticks used so far, summed over the processes
  local u=0 k=0 f
  for p in "$@"; do
    read -ra f <"/proc/$p/stat"
    u=$((u + f[13])) k=$((k + f[14]))
  done
  echo "$u $k"
}

measure() { # name port pid...: warm-up, then one measured run; prints
  # "name rps p50 p99 p999 errors requests user0 sys0 user1 sys1" (CPU ticks of the given pids)
  local name=$1 url="http://127.0.0.1:$2/predict"
  shift 2
  timeout $((WARMUP + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null
  local out before after
  before=$(cpu_ticks "$@")
  out=$(timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$work/report.lua" "$url")
  after=$(cpu_ticks "$@")
  echo "$out" >"$work/wrk-$name.txt"
  echo "$name $(grep '^RESULT' <<<"$out" | cut -d' ' -f2-) $before $after"
}

log "measuring: $ROUNDS rounds of ${DURATION}s per target, $CONNS connections, proxy on CPU $PROXY_CPU, wrk and variants on CPU $LOAD_CPU"
# CPU is sampled from the process that does the work: the variants' nginx worker for direct, the
# router, and the proxy nginx's worker. Each round measures direct, then keelson and nginx back to
# back, in turn first, so that a slow spell of a shared machine weighs on both of a round's pair.
worker_of() { pgrep -P "$(cat "$work/$1/nginx.pid")" | head -1; }
declare -A port=([direct]=$P_CHAMPION [keelson]=$P_ROUTER [nginx]=$P_NGINX)
declare -A pid=([direct]="$(worker_of upstreams)" [keelson]=$router_pid [nginx]="$(worker_of proxy)")
results=$(
  for ((r = 0; r < ROUNDS; r++)); do
    if ((r % 2)); then order=(direct nginx keelson); else order=(direct keelson nginx); fi
    for t in "${order[@]}"; do
      echo "$r $(measure "$t" "${port[$t]}" "${pid[$t]}")"
    done
  done
)

shares=$(curl -s "http://127.0.0.1:$P_ADMIN/metrics" | awk -F'[ "]' '
  /^keelson_router_requests_total/ { n[$2] = $NF; t += $NF }
  END { for (v in n) printf "%s=%.1f%% ", v, 100 * n[v] / t }')

echo
echo "Router benchmark, 127.0.0.1, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')),"
echo "wrk -t1 -c$CONNS, $ROUNDS rounds of ${DURATION}s per target taking turns; keelson --workers 1 and nginx"
echo "worker_processes 1, each pinned to CPU $PROXY_CPU. Each figure is the median over the rounds; \"vs nginx\""
echo "is the median of the rounds' keelson/nginx ratios (the two measured back to back)."
echo
tck=$(getconf CLK_TCK)
awk -v tck="$tck" -v rounds="$ROUNDS" '
  function median(a, n,    i, j, v, s) { # a[1..n], sorted in place
    for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j >= 1 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function med(t, col,    i, a) { for (i = 1; i <= rounds; i++) a[i] = v[t, col, i]; return median(a, rounds) }
  {
    r = $1 + 1; t = $2
    for (c = 3; c <= 7; c++) v[t, c, r] = $c
    req[t] += $8; ut[t] += $11 - $9; kt[t] += $12 - $10
    seen[t] = 1
    round_rps[r, t] = $3
  }
  END {
    for (r = 1; r <= rounds; r++) ratios[r] = round_rps[r, "keelson"] / round_rps[r, "nginx"]
    q = median(ratios, rounds)
    split("direct keelson nginx", order, " ")
    for (i = 1; i <= 3; i++) {
      t = order[i]; rps[t] = med(t, 3); p50[t] = med(t, 4); p99[t] = med(t, 5); p999[t] = med(t, 6)
      err[t] = 0; for (r = 1; r <= rounds; r++) err[t] += v[t, 7, r]
    }
    printf "| %-8s | %10s | %7s | %7s | %8s | %12s | %8s | %6s | %13s |\n", "target", "requests/s", "p50 ms", "p99 ms", "p99.9 ms", "added p99 ms", "vs nginx", "errors", "CPU us/req (kernel)"
    printf "|----------|-----------:|--------:|--------:|---------:|-------------:|---------:|-------:|--------------------:|\n"
    for (i = 1; i <= 3; i++) {
      t = order[i]
      ticks = ut[t] + kt[t]
      cpu = (ticks / tck) * 1e6 / req[t]; sys = (ticks > 0) ? 100 * kt[t] / ticks : 0
      added = (t == "direct") ? "-" : sprintf("%.3f", p99[t] - p99["direct"])
      ratio = (t == "direct") ? "-" : sprintf("%.2fx", (t == "keelson") ? q : 1)
      printf "| %-8s | %10.0f | %7.3f | %7.3f | %8.3f | %12s | %8s | %6d | %11.1f (%2.0f%%) |\n", t, rps[t], p50[t], p99[t], p999[t], added, ratio, err[t], cpu, sys
    }
    printf "\nkeelson/nginx requests/s by round:"
    for (r = 1; r <= rounds; r++) printf " %.2fx", round_rps[r, "keelson"] / round_rps[r, "nginx"]
    printf "\n"
    ka = p99["keelson"] - p99["direct"]; na = p99["nginx"] - p99["direct"]
    printf "keelson added p99 %.3f ms vs nginx %.3f ms (target: no more): %s\n", ka, na, (ka <= na) ? "met" : "NOT met"
    printf "keelson throughput %.2fx nginx, median of the rounds (ratio of the medians %.2fx; target: at least 1.20x): %s\n", q, rps["keelson"] / rps["nginx"], (q >= 1.2) ? "met" : "NOT met"
  }' <<<"$results"
echo "keelson split observed: $shares"

# The h2c/gRPC row: h2load sends unary gRPC calls (POST, content-type application/grpc, te:
# trailers, one framed 5-byte message) over HTTP/2 cleartext, H2_CONNS connections with H2_STREAMS
# streams each; direct to the champion, through keelson (both variants `protocol: h2c`) and through
# nginx `grpc_pass` with the same split_clients.
printf '\0\0\0\0\5hello' >"$work/grpc-body.bin"
h2measure() { # name port pid: prints "name rps mean_ms failed requests user0 sys0 user1 sys1"
  local name=$1 url="http://127.0.0.1:$2/keelson.Model/Predict" out before after
  local args=(-c"$H2_CONNS" -m"$H2_STREAMS" -t1 -d "$work/grpc-body.bin" -H 'content-type: application/grpc' -H 'te: trailers')
  timeout $((WARMUP + 30)) taskset -c "$LOAD_CPU" h2load "${args[@]}" -D "$WARMUP" "$url" >/dev/null
  before=$(cpu_ticks "$3")
  out=$(timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" h2load "${args[@]}" -D "$DURATION" "$url")
  after=$(cpu_ticks "$3")
  echo "$out" >"$work/h2load-$name.txt"
  awk -v name="$name" -v cpu="$before $after" '
    function ms(v) { return (v ~ /us$/) ? v / 1000 : (v ~ /ms$/) ? v + 0 : v * 1000 }
    /^finished in/ { rps = $4 }
    /^requests:/ { total = $2; ok = $8; failed = total - ok }
    /^time for request:/ { mean = ms($6) }
    END { printf "%s %.0f %.3f %d %d %s\n", name, rps, mean, failed, total, cpu }' <<<"$out"
}
log "measuring h2c/gRPC: $ROUNDS rounds of ${DURATION}s per target, h2load $H2_CONNS connections x $H2_STREAMS streams"
declare -A h2port=([direct]=$P_H2_CHAMPION [keelson]=$P_H2_ROUTER [nginx]=$P_H2_NGINX)
declare -A h2pid=([direct]="$(worker_of upstreams)" [keelson]=$h2_router_pid [nginx]="$(worker_of proxy)")
h2results=$(
  for ((r = 0; r < ROUNDS; r++)); do
    if ((r % 2)); then order=(direct nginx keelson); else order=(direct keelson nginx); fi
    for t in "${order[@]}"; do echo "$r $(h2measure "$t" "${h2port[$t]}" "${h2pid[$t]}")"; done
  done
)
echo
echo "h2c/gRPC unary calls: h2load -c$H2_CONNS -m$H2_STREAMS -t1, same rounds; variants are nginx h2c servers"
echo "answering 200 with a grpc-status trailer; keelson (protocol h2c) vs nginx grpc_pass. Medians over"
echo "the rounds; \"vs nginx\" is the median of the rounds' keelson/nginx ratios."
echo
awk -v tck="$tck" -v rounds="$ROUNDS" '
  function median(a, n,    i, j, v) {
    for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j >= 1 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function med(t, col,    i, a) { for (i = 1; i <= rounds; i++) a[i] = v[t, col, i]; return median(a, rounds) }
  {
    r = $1 + 1; t = $2; v[t, 3, r] = $3; v[t, 4, r] = $4; failed[t] += $5; req[t] += $6
    ut[t] += $9 - $7; kt[t] += $10 - $8; round_rps[r, t] = $3
  }
  END {
    for (r = 1; r <= rounds; r++) ratios[r] = round_rps[r, "keelson"] / round_rps[r, "nginx"]
    q = median(ratios, rounds)
    printf "| %-8s | %10s | %12s | %8s | %6s | %19s |\n", "target", "calls/s", "mean ms", "vs nginx", "failed", "CPU us/call (kernel)"
    printf "|----------|-----------:|-------------:|---------:|-------:|---------------------:|\n"
    split("direct keelson nginx", order, " ")
    for (i = 1; i <= 3; i++) {
      t = order[i]; ticks = ut[t] + kt[t]
      cpu = (ticks / tck) * 1e6 / req[t]; sys = (ticks > 0) ? 100 * kt[t] / ticks : 0
      ratio = (t == "direct") ? "-" : sprintf("%.2fx", (t == "keelson") ? q : 1)
      printf "| %-8s | %10.0f | %12.3f | %8s | %6d | %11.1f (%2.0f%%) |\n", t, med(t, 3), med(t, 4), ratio, failed[t], cpu, sys
    }
  }' <<<"$h2results"
h2shares=$(curl -s "http://127.0.0.1:$P_H2_ADMIN/metrics" | awk -F'[ "]' '
  /^keelson_router_requests_total/ { n[$2] = $NF; t += $NF }
  END { for (v in n) printf "%s=%.1f%% ", v, 100 * n[v] / t }')
echo "keelson h2c split observed: $h2shares"

# Instructions per request in user space, under callgrind: each proxy alone, started under valgrind
# on ports of its own, warmed up, its counters zeroed, then CALLGRIND_DURATION s of the same load.
if [[ $CALLGRIND != 0 ]]; then
  count() { # name port pid: user-space instructions per request of the valgrind-run process pid
    local url="http://127.0.0.1:$2/predict" out n before
    timeout 60 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "$url" >/dev/null
    callgrind_control -z "$3" >/dev/null 2>&1
    out=$(timeout $((CALLGRIND_DURATION + 60)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${CALLGRIND_DURATION}s" -s "$work/report.lua" "$url")
    before=$(ls "$work/cg.$1".* 2>/dev/null | wc -l)
    callgrind_control -d "$3" >/dev/null 2>&1
    for _ in $(seq 100); do (($(ls "$work/cg.$1".* 2>/dev/null | wc -l) > before)) && break; sleep 0.1; done
    n=$(grep '^RESULT' <<<"$out" | cut -d' ' -f7)
    awk -v n="$n" -v name="$1" '/^(summary|totals):/ { printf "%s %d %d\n", name, $2 / n, n; exit }' \
      "$(ls -t "$work/cg.$1".* | head -1)"
  }
  log "counting instructions per request under callgrind (${CALLGRIND_DURATION}s of load per proxy)"
  RUST_LOG=warn taskset -c "$PROXY_CPU" valgrind -q --tool=callgrind --callgrind-out-file="$work/cg.keelson" \
    "$KEELSON" router --workers 1 --config "$work/router.json" \
    --listen "127.0.0.1:$P_CG_ROUTER" --admin-listen "127.0.0.1:$P_CG_ADMIN" >"$work/cg-router.log" 2>&1 &
  cg_router=$!
  pids+=($!)
  wait_port "$P_CG_ROUTER" 600
  counts=$(count keelson "$P_CG_ROUTER" "$cg_router")
  kill "$cg_router"
  d=$(nginx_conf cg-proxy "$(split_proxy "$P_CG_NGINX")" "master_process off;")
  taskset -c "$PROXY_CPU" valgrind -q --tool=callgrind --callgrind-out-file="$work/cg.nginx" \
    "$NGINX" -p "$d" -c "$d/nginx.conf" 2>"$d/stderr" &
  cg_nginx=$!
  pids+=($!)
  wait_port "$P_CG_NGINX" 600
  counts+=$'\n'$(count nginx "$P_CG_NGINX" "$cg_nginx")
  kill "$cg_nginx"
  echo
  echo "User-space instructions per proxied request (valgrind callgrind, ${CALLGRIND_DURATION}s of wrk -t1 -c$CONNS"
  echo "through each proxy alone; the same for any speed of the machine; the kernel's part is not counted):"
  echo
  awk '{ ir[$1] = $2; n[$1] = $3 }
    END {
      printf "| %-8s | %20s | %8s | %8s |\n", "proxy", "instructions/request", "vs nginx", "requests"
      printf "|----------|---------------------:|---------:|---------:|\n"
      split("keelson nginx", order, " ")
      for (i = 1; i <= 2; i++) { t = order[i]; printf "| %-8s | %20d | %7.2fx | %8d |\n", t, ir[t], ir[t] / ir["nginx"], n[t] }
    }' <<<"$counts"
fi
