"""benchmarks/serve_load.py without Ray: its plain anchor (``python -m nitro_dist.local_app``
started as the benchmark starts it, loaded by the benchmark's HTTP clients; every request
answered, one image per model call, the server gone afterwards) and its interleaved 1-client
phase."""

import http.client

import benchmark_module
import pytest


def _serve_load():
    return benchmark_module.load("serve_load")


def test_one_client_phase_sends_each_request_to_every_server_in_turn():
    """The 1-client rows: request i goes to every server before request i + 1 goes to any, so a
    load that drifts over the phase reaches every server alike; failed requests are counted by
    status and left out of the latencies."""
    serve_load = _serve_load()
    calls: list[tuple[str, int]] = []

    def server(name: str, status: int = 200, images: int = 1):
        def make():
            def one(i: int) -> tuple[int, int]:
                calls.append((name, i))
                return (503 if name == "b" and i == 2 else status), images

            return one

        return make

    res = serve_load.load_interleaved({"a": server("a"), "b": server("b", images=3)}, 4, 60)
    assert calls == [(n, i) for i in range(4) for n in ("a", "b")]
    assert res["a"]["status"] == {200: 4} and res["a"]["n"] == 4
    assert res["b"]["status"] == {200: 3, 503: 1} and res["b"]["n"] == 3
    assert res["b"]["mean_batch"] == 3.0
    assert 0 <= res["a"]["p50_ms"] <= res["a"]["p99_ms"]


@pytest.mark.slow  # starts a Python process that imports torch (~10 s on 2 busy cores)
@pytest.mark.drill  # the serve_load benchmark's anchor end to end
def test_plain_anchor_serves_the_load_unbatched_and_stops(short_digits_run):
    serve_load = _serve_load()
    with serve_load.plain_server(str(short_digits_run), timeout=120) as port:
        res = serve_load.load(serve_load.http_client(port, "", 1), 6, 3, timeout=60)
    assert res["status"] == {200: 6} and res["n"] == 6
    assert res["mean_batch"] == 1.0  # one model call per request: no batching
    assert 0 < res["p50_ms"] <= res["p99_ms"] and res["images_per_s"] > 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    with pytest.raises(OSError):  # refused: the process was stopped
        conn.request("GET", "/healthz")
