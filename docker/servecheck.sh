#!/bin/sh
# Run inside the image (docs/deploy.md): serve the atlas mounted at /atlas on a spare port, then ask
# for /health, the overview page, a latent page (via /random) and the overview's JSON twin.
export PLMSCOPE_PORT=18719
plmscope serve > /tmp/serve.log 2>&1 &
pid=$!
t0=$(date +%s)
for i in $(seq 1 240); do kill -0 $pid 2>/dev/null || break; curl -fsS http://127.0.0.1:$PLMSCOPE_PORT/health > /tmp/health.json 2>/dev/null && break; sleep 1; done
echo "health after $(( $(date +%s) - t0 )) s: $(cat /tmp/health.json)"
curl -fsS -o /tmp/overview.html -w "GET / -> %{http_code}, %{size_download} bytes\n" http://127.0.0.1:$PLMSCOPE_PORT/
grep -o -m1 "<title>[^<]*</title>" /tmp/overview.html | head -1
curl -fsS -L -o /tmp/latent.html -w "GET /random -> %{url_effective} %{http_code}, %{size_download} bytes\n" http://127.0.0.1:$PLMSCOPE_PORT/random
grep -o -m1 "<title>[^<]*</title>" /tmp/latent.html | head -1
curl -fsS -o /dev/null -w "GET /.json -> %{http_code}, %{size_download} bytes\n" http://127.0.0.1:$PLMSCOPE_PORT/.json
kill $pid
tail -3 /tmp/serve.log
