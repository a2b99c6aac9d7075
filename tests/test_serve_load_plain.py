"""benchmarks/serve_load.py's plain anchor without Ray: ``python -m nitro_dist.local_app`` started
as the benchmark starts it, loaded by the benchmark's HTTP clients; every request answered, one
image per model call (the plain server does not batch), the server gone afterwards."""

import http.client
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # starts a Python process that imports torch (~10 s on 2 busy cores)
@pytest.mark.drill  # the serve_load benchmark's anchor end to end
def test_plain_anchor_serves_the_load_unbatched_and_stops(short_digits_run):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_load
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    with serve_load.plain_server(str(short_digits_run), timeout=120) as port:
        res = serve_load.load(serve_load.http_client(port, "", 1), 6, 3, timeout=60)
    assert res["status"] == {200: 6} and res["n"] == 6
    assert res["mean_batch"] == 1.0  # one model call per request: no batching
    assert 0 < res["p50_ms"] <= res["p99_ms"] and res["images_per_s"] > 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    with pytest.raises(OSError):  # refused: the process was stopped
        conn.request("GET", "/healthz")
