#!/usr/bin/env bash
# Router benchmark on 127.0.0.1, side by side in one run:
#   direct  - the load generator straight to one variant;
#   keelson - `keelson router` (release build) splitting 90/10 over two variants;
#   nginx   - nginx `split_clients` with the same 90/10 weights and keep-alive upstreams;
#   haproxy - HAProxy `balance random(1)` with server weights 90 and 10 and reused server connections.
# The proxy under test (keelson, nginx or haproxy, one worker thread each) is pinned to PROXY_CPU; the
# load generator and the variant stand-ins (one nginx worker answering `return 200`) share LOAD_CPU.
# Prints tables; asserts nothing (timings are measurements, not tests). Three rows of load: GET with
# no body (wrk), POST with a 1 MiB body (wrk and a Lua script), and unary gRPC calls over h2c
# (h2load). The CPU column is the time the serving process (the variant's nginx worker for direct,
# the router, the proxy nginx's worker, haproxy) spent per request, and the kernel's share of it.
# Every process is stopped on exit.
#
# The VM this runs on changes speed by up to half within seconds, so the targets take turns in short
# measurements over many rounds (direct first, then the three proxies in an order that rotates each
# round), and the keelson/nginx and keelson/haproxy ratios are read per round and summarised by their
# medians.
#
# A last table counts the instructions each proxy runs in user space per request, under valgrind's
# callgrind: a count that does not depend on the VM's speed (the kernel's part is not counted), and
# another the system calls each makes per request, counted by perf.
#
# Machine-readable figures go to target/bench/router.tsv (read by `make bench-plot`).
#
# Knobs (environment): DURATION (s per measurement, 3), ROUNDS (9), WARMUP (s, 1), CONNS (wrk connections, 32),
# BODY_CONNS (wrk connections of the 1 MiB row, 8), PROXY_CPU (0), LOAD_CPU (1), PORT_BASE (28080; the local cluster's Kueue listens on 18081),
# SKIP_BUILD (1: use the existing release binary), KEELSON (the binary to measure; default
# target/release/keelson), CALLGRIND (0: skip the instruction count), CALLGRIND_DURATION (s of load
# under callgrind, 5), SYSCALLS (0: skip the system-call count), SYSCALL_DURATION (s of load under
# perf, 3).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-3}
ROUNDS=${ROUNDS:-9}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-32}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PORT_BASE=${PORT_BASE:-28080}
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
P_HAPROXY=$((PORT_BASE + 14))
P_H2_HAPROXY=$((PORT_BASE + 15))
P_CG_HAPROXY=$((PORT_BASE + 16))
BODY_CONNS=${BODY_CONNS:-8}
H2_STREAMS=${H2_STREAMS:-8}
H2_CONNS=${H2_CONNS:-4}

log() { printf '[bench-router] %s\n' "$*" >&2; }

NGINX=$(command -v nginx || echo /usr/sbin/nginx)
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[[ -x $NGINX ]] || missing+=(nginx-light)
command -v taskset >/dev/null || missing+=(util-linux)
command -v h2load >/dev/null || missing+=(nghttp2-client)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[[ -x $HAPROXY ]] || missing+=(haproxy)
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
  HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
fi
mkdir -p target/bench
TSV=target/bench/router.tsv

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
  client_max_body_size 2m;
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
      client_body_buffer_size 2m;
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

# HAProxy with the same split: weighted random over the two variants (`random(1)`: one draw, so the
# weights alone decide, as split_clients and the router do), one thread, idle server connections
# reused by any client connection (`http-reuse always`, as nginx's keepalive pool), no logging. For
# h2c, an HTTP/2 listener and HTTP/2 server connections (`proto h2`) to the h2c variants.
haproxy_conf() { # file frontends-and-backends
  cat >"$1" <<CONF
global
  nbthread 1
  maxconn 8192
  tune.maxaccept -1
defaults
  mode http
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
$2
CONF
}
haproxy_split() { # name listen-port champion-port challenger-port [proto]
  local proto=${5:+ proto $5}
  echo "frontend fe_$1
  bind 127.0.0.1:$2$proto
  default_backend be_$1
backend be_$1
  balance random(1)
  server champion 127.0.0.1:$3$proto weight 90
  server challenger 127.0.0.1:$4$proto weight 10"
}
haproxy_conf "$work/haproxy.cfg" "$(haproxy_split h1 "$P_HAPROXY" "$P_CHAMPION" "$P_CHALLENGER")
$(haproxy_split h2 "$P_H2_HAPROXY" "$P_H2_CHAMPION" "$P_H2_CHALLENGER" h2)"
taskset -c "$PROXY_CPU" "$HAPROXY" -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=($!)

for p in "$P_CHAMPION" "$P_CHALLENGER" "$P_NGINX" "$P_ROUTER" "$P_ADMIN" \
  "$P_H2_CHAMPION" "$P_H2_CHALLENGER" "$P_H2_NGINX" "$P_H2_ROUTER" "$P_H2_ADMIN" \
  "$P_HAPROXY" "$P_H2_HAPROXY"; do wait_port "$p"; done
# A port that answers may belong to another process: every process started here must run. nginx
# writes its pid file once it has bound its ports (it retries a busy port for 2 s, then exits);
# the router and haproxy exit at once, and stay zombies until reaped.
for name in upstreams proxy; do
  for _ in $(seq 100); do [[ -s $work/$name/nginx.pid ]] && break; sleep 0.1; done
  if [[ ! -s $work/$name/nginx.pid ]]; then
    log "nginx ($name) did not start: is another program listening on 127.0.0.1:$P_CHAMPION-$P_CG_HAPROXY? (PORT_BASE moves the ports)"
    tail -n 3 "$work/$name/stderr" >&2 || true
    exit 1
  fi
done
sleep 0.5
for p in "${pids[@]}"; do
  state=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || true)
  [[ -n $state && $state != Z ]] && continue
  log "a process of the bench (pid $p) has exited: is another program listening on 127.0.0.1:$P_CHAMPION-$P_CG_HAPROXY? (PORT_BASE moves the ports)"
  tail -n 3 "$work"/*/stderr "$work"/*.log >&2 2>/dev/null || true
  exit 1
done

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
# The large-body row: the same report, each request a POST of 1 MiB.
{
  echo 'wrk.method = "POST"'
  echo 'wrk.body = string.rep("x", 1048576)'
  echo 'wrk.headers["Content-Type"] = "application/octet-stream"'
  cat "$work/report.lua"
} >"$work/body.lua"

cpu_ticks() { # pid...: user and system clock ticks used so far, summed over the processes
  local u=0 k=0 f
  for p in "$@"; do
    read -ra f <"/proc/$p/stat"
    u=$((u + f[13])) k=$((k + f[14]))
  done
  echo "$u $k"
}

# Every measurement prints one line: "name rps p50 p99 p999 errors requests user0 sys0 user1 sys1"
# (latencies in ms, CPU ticks of the serving process before and after).
measure() { # name port lua-script connections pid: warm-up, then one measured wrk run
  local name=$1 url="http://127.0.0.1:$2/predict" script=$3 conns=$4 out before after
  timeout $((WARMUP + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"${WARMUP}s" -s "$script" "$url" >/dev/null
  before=$(cpu_ticks "$5")
  out=$(timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"${DURATION}s" --latency -s "$script" "$url")
  after=$(cpu_ticks "$5")
  echo "$out" >"$work/wrk-$name.txt"
  echo "$name $(grep '^RESULT' <<<"$out" | cut -d' ' -f2-) $before $after"
}

# The h2c/gRPC row: h2load sends unary gRPC calls (POST, content-type application/grpc, te:
# trailers, one framed 5-byte message) over HTTP/2 cleartext, H2_CONNS connections with H2_STREAMS
# streams each; latencies come from its per-request log.
printf '\0\0\0\0\5hello' >"$work/grpc-body.bin"
h2measure() { # name port pid
  local name=$1 url="http://127.0.0.1:$2/keelson.Model/Predict" out before after
  local args=(-c"$H2_CONNS" -m"$H2_STREAMS" -t1 -d "$work/grpc-body.bin" -H 'content-type: application/grpc' -H 'te: trailers')
  timeout $((WARMUP + 30)) taskset -c "$LOAD_CPU" h2load "${args[@]}" -D "$WARMUP" "$url" >/dev/null
  before=$(cpu_ticks "$3")
  out=$(timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" h2load "${args[@]}" -D "$DURATION" --log-file="$work/h2log-$name" "$url")
  after=$(cpu_ticks "$3")
  echo "$out" >"$work/h2load-$name.txt"
  local lat
  lat=$(cut -f3 "$work/h2log-$name" | sort -n | awk '
    { v[NR] = $1 }
    function at(q,    i) { i = int(NR * q); if (i < NR * q) i++; if (i < 1) i = 1; return v[i] / 1000 }
    END { if (NR) printf "%.3f %.3f %.3f", at(0.5), at(0.99), at(0.999); else printf "0 0 0" }')
  awk -v name="$name" -v lat="$lat" -v cpu="$before $after" '
    /^finished in/ { rps = $4 }
    /^requests:/ { total = $2; failed = total - $8 }
    END { printf "%s %.0f %s %d %d %s\n", name, rps, lat, failed, total, cpu }' <<<"$out"
}

worker_of() { pgrep -P "$(cat "$work/$1/nginx.pid")" | head -1; }
# CPU is sampled from the process that does the work: the variants' nginx worker for direct, the
# router, the proxy nginx's worker and haproxy.
declare -A port=([direct]=$P_CHAMPION [keelson]=$P_ROUTER [nginx]=$P_NGINX [haproxy]=$P_HAPROXY)
declare -A pid=([direct]="$(worker_of upstreams)" [keelson]=$router_pid [nginx]="$(worker_of proxy)" [haproxy]=$haproxy_pid)
declare -A h2port=([direct]=$P_H2_CHAMPION [keelson]=$P_H2_ROUTER [nginx]=$P_H2_NGINX [haproxy]=$P_H2_HAPROXY)
declare -A h2pid=([direct]="$(worker_of upstreams)" [keelson]=$h2_router_pid [nginx]="$(worker_of proxy)" [haproxy]=$haproxy_pid)
PROXIES=(keelson nginx haproxy)

measure_row() { # row target
  case $1 in
    get) measure "$2" "${port[$2]}" "$work/report.lua" "$CONNS" "${pid[$2]}" ;;
    body) measure "$2" "${port[$2]}" "$work/body.lua" "$BODY_CONNS" "${pid[$2]}" ;;
    h2c) h2measure "$2" "${h2port[$2]}" "${h2pid[$2]}" ;;
  esac
}

# Each round measures direct, then the three proxies in an order that rotates from round to round,
# so that a slow spell of a shared machine weighs on every proxy in turn.
run_rounds() { # row: prints "round name fields..." per round and target
  local r i t
  for ((r = 0; r < ROUNDS; r++)); do
    local order=(direct)
    for i in 0 1 2; do order+=("${PROXIES[(r + i) % 3]}"); done
    for t in "${order[@]}"; do echo "$r $(measure_row "$1" "$t")"; done
  done
}

tck=$(getconf CLK_TCK)
printf 'row\ttarget\tfigure\tvalue\n' >"$TSV"
# Prints one row's table from its rounds and appends its figures to $TSV.
summarise() { # row unit
  awk -v tck="$tck" -v rounds="$ROUNDS" -v row="$1" -v unit="$2" -v tsv="$TSV" '
    function median(a, n,    i, j, v) { # a[1..n], sorted in place
      for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j >= 1 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v }
      return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function med(t, col,    i, a) { for (i = 1; i <= rounds; i++) a[i] = v[t, col, i]; return median(a, rounds) }
    function div(a, b) { return (b > 0) ? a / b : 0 }
    function put(t, figure, value) { printf "%s\t%s\t%s\t%s\n", row, t, figure, value >> tsv }
    {
      r = $1 + 1; t = $2
      for (c = 3; c <= 7; c++) v[t, c, r] = $c
      req[t] += $8; ut[t] += $11 - $9; kt[t] += $12 - $10
      round_rps[r, t] = $3
    }
    END {
      n = split("direct keelson nginx haproxy", order, " ")
      for (i = 1; i <= n; i++) {
        t = order[i]; rps[t] = med(t, 3); p50[t] = med(t, 4); p99[t] = med(t, 5); p999[t] = med(t, 6)
        err[t] = 0; for (r = 1; r <= rounds; r++) err[t] += v[t, 7, r]
        for (r = 1; r <= rounds; r++) ra[r] = div(round_rps[r, "keelson"], round_rps[r, t])
        q[t] = median(ra, rounds)
        byround[t] = ""; for (r = 1; r <= rounds; r++) byround[t] = byround[t] sprintf(" %.2fx", div(round_rps[r, "keelson"], round_rps[r, t]))
      }
      printf "| %-8s | %10s | %7s | %7s | %8s | %12s | %12s | %6s | %19s |\n", "target", unit "/s", "p50 ms", "p99 ms", "p99.9 ms", "added p99 ms", "keelson/this", "errors", "CPU us/req (kernel)"
      printf "|----------|-----------:|--------:|--------:|---------:|-------------:|-------------:|-------:|--------------------:|\n"
      for (i = 1; i <= n; i++) {
        t = order[i]; ticks = ut[t] + kt[t]
        cpu = div(ticks / tck * 1e6, req[t]); sys = div(100 * kt[t], ticks)
        added = (t == "direct") ? "-" : sprintf("%.3f", p99[t] - p99["direct"])
        ratio = (t == "direct") ? "-" : sprintf("%.2fx", q[t])
        printf "| %-8s | %10.0f | %7.3f | %7.3f | %8.3f | %12s | %12s | %6d | %11.1f (%2.0f%%) |\n", t, rps[t], p50[t], p99[t], p999[t], added, ratio, err[t], cpu, sys
        put(t, "rps", sprintf("%.0f", rps[t])); put(t, "p50_ms", p50[t]); put(t, "p99_ms", p99[t]); put(t, "p999_ms", p999[t])
        put(t, "errors", err[t]); put(t, "cpu_us", sprintf("%.2f", cpu))
        if (t != "direct") { put(t, "added_p99_ms", sprintf("%.3f", p99[t] - p99["direct"])); put(t, "keelson_ratio", sprintf("%.3f", q[t])) }
      }
      printf "\nkeelson/nginx %s/s by round:%s\n", unit, byround["nginx"]
      printf "keelson/haproxy %s/s by round:%s\n", unit, byround["haproxy"]
      ka = p99["keelson"] - p99["direct"]; na = p99["nginx"] - p99["direct"]; ha = p99["haproxy"] - p99["direct"]
      printf "keelson added p99 %.3f ms, nginx %.3f ms, haproxy %.3f ms (target: below both): %s\n", ka, na, ha, (ka <= na && ka <= ha) ? "met" : "NOT met"
      printf "keelson %s/s %.2fx nginx (target: at least 1.20x): %s; %.2fx haproxy (target: at least 1.00x): %s (medians of the rounds)\n", unit, q["nginx"], (q["nginx"] >= 1.2) ? "met" : "NOT met", q["haproxy"], (q["haproxy"] >= 1.0) ? "met" : "NOT met"
    }'
}
split_shares() { # admin port: the router's observed split
  curl -s "http://127.0.0.1:$1/metrics" | awk -F'[ "]' '
    /^keelson_router_requests_total/ { n[$2] = $NF; t += $NF }
    END { for (v in n) printf "%s=%.1f%% ", v, 100 * n[v] / t }'
}

log "measuring GET: $ROUNDS rounds of ${DURATION}s per target, $CONNS connections, proxies on CPU $PROXY_CPU, load and variants on CPU $LOAD_CPU"
results=$(run_rounds get)
echo
echo "Router benchmark, 127.0.0.1, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')),"
echo "$ROUNDS rounds of ${DURATION}s per target taking turns; keelson --workers 1, nginx worker_processes 1 and"
echo "haproxy nbthread 1, each pinned to CPU $PROXY_CPU. Each figure is the median over the rounds; \"keelson/this\""
echo "is the median of the rounds' keelson/this requests/s ratios."
echo
echo "GET, no body: wrk -t1 -c$CONNS"
echo
summarise get requests <<<"$results"
echo "keelson split observed: $(split_shares "$P_ADMIN")"

log "measuring POST of 1 MiB: $ROUNDS rounds of ${DURATION}s per target, $BODY_CONNS connections"
results=$(run_rounds body)
echo
echo "POST with a 1 MiB body: wrk -t1 -c$BODY_CONNS with a Lua script. keelson and haproxy stream the body; nginx"
echo "reads it whole first (proxy_request_buffering on, its default) into memory (client_body_buffer_size 2m,"
echo "instead of a temporary file per request)."
echo
summarise body requests <<<"$results"

log "measuring h2c/gRPC: $ROUNDS rounds of ${DURATION}s per target, h2load $H2_CONNS connections x $H2_STREAMS streams"
results=$(run_rounds h2c)
echo
echo "h2c/gRPC unary calls: h2load -c$H2_CONNS -m$H2_STREAMS -t1; variants are nginx h2c servers answering 200 with a"
echo "grpc-status trailer; keelson (protocol h2c), nginx grpc_pass, haproxy proto h2 on both sides. Latencies"
echo "from h2load's per-request log."
echo
summarise h2c calls <<<"$results"
echo "keelson h2c split observed: $(split_shares "$P_H2_ADMIN")"

# The GET load through the proxy at port for seconds. get_load prints the number of requests it made,
# which the callgrind and perf counts below divide by; warm_get only warms up.
get_load() { # port seconds
  timeout $(($2 + 60)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$2s" -s "$work/report.lua" "http://127.0.0.1:$1/predict" |
    awk '/^RESULT/ { print $7; found = 1 } END { if (!found) print 0 }'
}
warm_get() { # port seconds
  timeout 60 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$2s" "http://127.0.0.1:$1/predict" >/dev/null
}

# Instructions per request in user space, under callgrind: each proxy alone, started under valgrind
# on ports of its own, warmed up, its counters zeroed, then CALLGRIND_DURATION s of the same load.
if [[ $CALLGRIND != 0 ]]; then
  count() { # name port pid: user-space instructions per request of the valgrind-run process pid
    local n before
    warm_get "$2" 2
    callgrind_control -z "$3" >/dev/null 2>&1
    n=$(get_load "$2" "$CALLGRIND_DURATION")
    before=$(ls "$work/cg.$1".* 2>/dev/null | wc -l)
    callgrind_control -d "$3" >/dev/null 2>&1
    for _ in $(seq 100); do (($(ls "$work/cg.$1".* 2>/dev/null | wc -l) > before)) && break; sleep 0.1; done
    ((${n:-0} > 0)) || { log "$1: no request went through under callgrind"; echo "$1 0 0"; return; }
    awk -v n="$n" -v name="$1" '/^(summary|totals):/ { printf "%s %d %d\n", name, $2 / n, n; exit }' \
      "$(ls -t "$work/cg.$1".* | head -1)"
  }
  log "counting instructions per request under callgrind (${CALLGRIND_DURATION}s of load per proxy)"
  RUST_LOG=warn taskset -c "$PROXY_CPU" valgrind -q --tool=callgrind --callgrind-out-file="$work/cg.keelson" \
    "$KEELSON" router --workers 1 --config "$work/router.json" \
    --listen "127.0.0.1:$P_CG_ROUTER" --admin-listen "127.0.0.1:$P_CG_ADMIN" >"$work/cg-router.log" 2>&1 &
  cg_router=$!
  pids+=($!)
  wait_port "$P_CG_ROUTER" 3000
  counts=$(count keelson "$P_CG_ROUTER" "$cg_router")
  kill "$cg_router"
  d=$(nginx_conf cg-proxy "$(split_proxy "$P_CG_NGINX")" "master_process off;")
  taskset -c "$PROXY_CPU" valgrind -q --tool=callgrind --callgrind-out-file="$work/cg.nginx" \
    "$NGINX" -p "$d" -c "$d/nginx.conf" 2>"$d/stderr" &
  cg_nginx=$!
  pids+=($!)
  wait_port "$P_CG_NGINX" 3000
  counts+=$'\n'$(count nginx "$P_CG_NGINX" "$cg_nginx")
  kill "$cg_nginx"
  haproxy_conf "$work/cg-haproxy.cfg" "$(haproxy_split cg "$P_CG_HAPROXY" "$P_CHAMPION" "$P_CHALLENGER")"
  taskset -c "$PROXY_CPU" valgrind -q --tool=callgrind --callgrind-out-file="$work/cg.haproxy" \
    "$HAPROXY" -db -f "$work/cg-haproxy.cfg" >"$work/cg-haproxy.log" 2>&1 &
  cg_haproxy=$!
  pids+=($!)
  wait_port "$P_CG_HAPROXY" 3000
  counts+=$'\n'$(count haproxy "$P_CG_HAPROXY" "$cg_haproxy")
  kill "$cg_haproxy"
  echo
  echo "User-space instructions per proxied GET (valgrind callgrind, ${CALLGRIND_DURATION}s of wrk -t1 -c$CONNS through"
  echo "each proxy alone; the same for any speed of the machine; the kernel's part is not counted):"
  echo
  awk -v tsv="$TSV" '{ ir[$1] = $2; n[$1] = $3 }
    END {
      printf "| %-8s | %20s | %12s | %8s |\n", "proxy", "instructions/request", "keelson/this", "requests"
      printf "|----------|---------------------:|-------------:|---------:|\n"
      split("keelson nginx haproxy", order, " ")
      for (i = 1; i <= 3; i++) {
        t = order[i]
        printf "| %-8s | %20d | %11.2fx | %8d |\n", t, ir[t], (ir[t] > 0) ? ir["keelson"] / ir[t] : 0, n[t]
        printf "instructions\t%s\tper_request\t%d\n", t, ir[t] >> tsv
      }
    }' <<<"$counts"
fi

# System calls per request: most of a proxied request's CPU time is the kernel's, which callgrind does
# not see. perf counts each proxy's system calls (tracepoints raw_syscalls:sys_enter and a few
# syscalls:sys_enter_*) during SYSCALL_DURATION s of the GET load; the counts do not depend on the
# VM's speed. Skipped when perf is missing or may not open tracepoints.
SYSCALLS=${SYSCALLS:-1}
SYSCALL_DURATION=${SYSCALL_DURATION:-3}
SYSCALL_KINDS=(read recvfrom readv write writev sendto sendmsg epoll_wait epoll_pwait epoll_ctl)
if [[ $SYSCALLS != 0 ]] && ! { command -v perf && perf stat -e raw_syscalls:sys_enter -- true; } >/dev/null 2>&1; then
  log "perf cannot count system calls here (Debian: linux-perf, and tracepoints readable): no system-call table"
  SYSCALLS=0
fi
if [[ $SYSCALLS != 0 ]]; then
  sys_count() { # name port pid: "name requests total read recvfrom ..." for SYSCALL_DURATION s of GET load
    local events=(-e raw_syscalls:sys_enter) k n
    for k in "${SYSCALL_KINDS[@]}"; do events+=(-e "syscalls:sys_enter_$k"); done
    warm_get "$2" 1
    perf stat -x, -o "$work/perf-$1.csv" "${events[@]}" -p "$3" -- sleep $((SYSCALL_DURATION + 1)) &
    local perf_pid=$!
    sleep 0.5
    n=$(get_load "$2" "$SYSCALL_DURATION")
    wait "$perf_pid" || true
    awk -F, -v name="$1" -v n="$n" -v kinds="${SYSCALL_KINDS[*]}" '
      $3 == "raw_syscalls:sys_enter" { c["total"] = $1 }
      $3 ~ /^syscalls:sys_enter_/ { k = $3; sub(/^syscalls:sys_enter_/, "", k); c[k] = $1 }
      END { printf "%s %d %d", name, n, c["total"]; m = split(kinds, ks, " "); for (i = 1; i <= m; i++) printf " %d", c[ks[i]]; printf "\n" }' \
      "$work/perf-$1.csv"
  }
  log "counting system calls per request with perf (${SYSCALL_DURATION}s of GET load per proxy)"
  sys=$(for t in "${PROXIES[@]}"; do sys_count "$t" "${port[$t]}" "${pid[$t]}"; done)
  echo
  echo "System calls per proxied GET (perf tracepoints, ${SYSCALL_DURATION}s of wrk -t1 -c$CONNS through each proxy; the"
  echo "same for any speed of the machine; reads are read, recvfrom and readv; writes are write, writev,"
  echo "sendto and sendmsg; epoll is epoll_wait, epoll_pwait and epoll_ctl):"
  echo
  awk -v tsv="$TSV" '{ n[$1] = $2; tot[$1] = $3; rd[$1] = $4 + $5 + $6; wr[$1] = $7 + $8 + $9 + $10; ep[$1] = $11 + $12 + $13 }
    function per(v, t) { return (n[t] > 0) ? v / n[t] : 0 }
    END {
      printf "| %-8s | %17s | %9s | %10s | %9s | %12s | %8s |\n", "proxy", "syscalls/request", "reads", "writes", "epoll", "keelson/this", "requests"
      printf "|----------|------------------:|----------:|-----------:|----------:|-------------:|---------:|\n"
      split("keelson nginx haproxy", order, " ")
      for (i = 1; i <= 3; i++) {
        t = order[i]
        r = (per(tot[t], t) > 0) ? per(tot["keelson"], "keelson") / per(tot[t], t) : 0
        printf "| %-8s | %17.2f | %9.2f | %10.2f | %9.2f | %11.2fx | %8d |\n", t, per(tot[t], t), per(rd[t], t), per(wr[t], t), per(ep[t], t), r, n[t]
        printf "syscalls\t%s\tper_request\t%.3f\n", t, per(tot[t], t) >> tsv
      }
    }' <<<"$sys"
fi
echo
echo "figures written to $TSV"
