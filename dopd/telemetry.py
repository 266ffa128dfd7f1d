"""The server's own measurements: Prometheus metrics (vLLM's names where one exists) and a rolling
window of finished requests for the cluster snapshot, the monitor and the policy.

Server-side TTFT runs from the request's arrival at the API to its first token; TPOT is computed
exactly as the benchmark computes it, from the same `RequestRecord`.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dopd.metrics import SLO, RequestRecord, meets, tpot

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0)


class Telemetry:
    def __init__(self, model_name: str, slo: SLO, window: int = 2000) -> None:
        self.slo = slo
        self.registry = CollectorRegistry()
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self._model = model_name
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS, **labels)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, **labels)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", buckets=E2E_BUCKETS,
                             **labels)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", **labels)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", **labels)
        self.prefix_cache_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                            **labels)
        self.prefix_cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", **labels)
        self.running = Gauge("vllm:num_requests_running", "Requests on a worker", **labels)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a worker or for KV blocks", **labels)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV cache usage, all workers (0-1)", **labels)
        self.requests = Counter("dopd:requests", "Finished requests by outcome", ["model_name", "outcome"],
                                registry=self.registry)
        worker = dict(labelnames=["worker", "role"], registry=self.registry)
        self.worker_running = Gauge("dopd:worker_num_running", "Running sequences per worker", **worker)
        self.worker_waiting = Gauge("dopd:worker_num_waiting", "Waiting sequences per worker", **worker)
        self.worker_kv_usage = Gauge("dopd:worker_kv_cache_usage_perc", "KV usage per worker (0-1)", **worker)
        self.role_changes = Counter("dopd:role_changes", "Completed role moves", ["from_role", "to_role"],
                                    registry=self.registry)
        self.handoff_seconds = Histogram("dopd:kv_handoff_seconds", "Parked on P to adopted by D",
                                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                         registry=self.registry)
        self.recent: deque[tuple[float, RequestRecord]] = deque(maxlen=window)
        self.recent_prefills: deque[tuple[float, int, int]] = deque(maxlen=window)  # (time, prompt, cached)

    def record(self, finished_at: float, record: RequestRecord) -> None:
        m = self._model
        self.recent.append((finished_at, record))
        self.requests.labels(m, "ok" if record.success else "error").inc()
        self.prompt_tokens.labels(m).inc(record.input_len)
        self.generation_tokens.labels(m).inc(record.output_len)
        if record.success and record.ttft is not None:
            self.ttft.labels(m).observe(record.ttft)
            self.e2e.labels(m).observe(record.e2el)
            if record.output_len > 1:
                self.tpot.labels(m).observe(tpot(record))

    def observe_prefill(self, now: float, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """A prompt was prefilled (with prefix caching on) and `num_cached_tokens` of it were found cached."""
        self.recent_prefills.append((now, num_prompt_tokens, num_cached_tokens))
        self.prefix_cache_queries.labels(self._model).inc(num_prompt_tokens)
        self.prefix_cache_hits.labels(self._model).inc(num_cached_tokens)

    def observe_workers(self, workers, num_queued: int) -> None:
        """Refresh the gauges from the workers' latest stats (`WorkerHandle`s) before a scrape."""
        m = self._model
        live = [w for w in workers if w.alive]
        self.running.labels(m).set(sum(w.stats.num_running for w in live))
        self.waiting.labels(m).set(sum(w.stats.num_waiting for w in live) + num_queued)
        total = sum(w.stats.kv_blocks_total for w in live)
        self.kv_usage.labels(m).set(1 - sum(w.stats.kv_blocks_free for w in live) / total if total else 0.0)
        for w in workers:
            labels = (str(w.id), w.role.name.lower())
            self.worker_running.labels(*labels).set(w.stats.num_running)
            self.worker_waiting.labels(*labels).set(w.stats.num_waiting)
            usage = 1 - w.stats.kv_blocks_free / w.stats.kv_blocks_total if w.stats.kv_blocks_total else 0.0
            self.worker_kv_usage.labels(*labels).set(usage)

    def window(self, now: float, seconds: float) -> list[RequestRecord]:
        return [r for t, r in self.recent if now - t <= seconds]

    def summary(self, now: float, uptime: float, seconds: float = 60.0) -> dict:
        """Percentiles and attainment over the requests that finished in the last `seconds`."""
        records = self.window(now, seconds)
        span = max(1e-9, min(seconds, uptime))
        ok = [r for r in records if r.success]
        ttfts = [r.ttft for r in ok]
        tpots = [tpot(r) for r in ok if r.output_len > 1]
        good = sum(meets(r, self.slo) for r in records)

        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        prompt = cached = 0
        for t, n, c in self.recent_prefills:
            if now - t <= seconds:
                prompt, cached = prompt + n, cached + c

        return {
            "window_s": seconds, "num_finished": len(records), "num_failed": len(records) - len(ok),
            "ttft_p50": pct(ttfts, 50), "ttft_p90": pct(ttfts, 90),
            "tpot_p50": pct(tpots, 50), "tpot_p90": pct(tpots, 90),
            "slo_ttft": self.slo.ttft, "slo_tpot": self.slo.tpot,
            "slo_attainment": good / len(records) if records else None,
            "goodput_rps": good / span,
            "throughput_rps": len(ok) / span,
            "output_tokens_per_s": sum(r.output_len for r in ok) / span,
            "prefix_cache_hit_rate": cached / prompt if prompt else None,  # of the prompt tokens prefilled
        }
