"""The live dashboard: one screen that shows what the cluster does and why its split just changed.

`render()` is a pure function of a snapshot (the dict `dopd.snapshot.cluster_snapshot` returns and
`GET /v1/cluster` serves) and a `History` of earlier ones, sized to a terminal. `run_monitor()`
refreshes it from an asyncio task inside the server; `attach()` from another process, by polling.
Every field is optional: a snapshot from an older or newer server renders what it has.

The dashboard takes the alternate screen (`Live(screen=True)`): frames never scroll into the
user's terminal history, a frame is cropped to the terminal instead of wrapping, and the terminal
comes back as it was when the monitor stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

log = logging.getLogger("dopd.monitor")

BLOCKS = "▁▂▃▄▅▆▇█"
ROLES = ("prefill", "decode", "mixed", "idle")
ROLE_STYLE = {"prefill": "cyan", "decode": "magenta", "mixed": "yellow", "idle": "bright_black"}
STATE_STYLE = {"serving": "green", "starting": "bright_black", "draining": "yellow", "migrating": "yellow",
               "dead": "bold white on red"}
LATENCY_KEYS = ("throughput_rps", "output_tokens_per_s", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90",
                "slo_attainment", "prefix_cache_hit_rate")
WIDE = (110, 32)  # from this many columns and lines on: panels, more columns, longer sparklines and log


class History:
    """The last `max_samples` snapshots as one short series per quantity; None where a value was missing."""

    def __init__(self, max_samples: int = 120) -> None:
        names = (*ROLES, *LATENCY_KEYS, "forecast_rate", "num_requests")
        self.series: dict[str, deque[float | None]] = {name: deque(maxlen=max_samples) for name in names}
        self.last_time: float | None = None

    def add(self, snapshot: dict) -> None:
        t = snapshot.get("time")
        if t is not None and t == self.last_time:  # a poll that saw the same snapshot twice
            return
        self.last_time = t
        latency = snapshot.get("latency") or {}
        forecast = (snapshot.get("policy") or {}).get("forecast") or {}
        alive = [w for w in snapshot.get("workers") or [] if w.get("state") != "dead"]
        values: dict[str, float | None] = {role: sum(w.get("role") == role for w in alive) for role in ROLES}
        values |= {key: latency.get(key) for key in LATENCY_KEYS}
        values |= {"forecast_rate": forecast.get("rate"), "num_requests": snapshot.get("num_requests")}
        for name, value in values.items():
            self.series[name].append(value)

    def get(self, name: str) -> list[float | None]:
        return list(self.series[name]) if name in self.series else []

    def __len__(self) -> int:
        return len(self.series["num_requests"])


# ---- formatting ---------------------------------------------------------------------------------

def sparkline(values: list[float | None], width: int, hi: float | None = None, limit: float | None = None) -> Text:
    """The last `width` values as block glyphs scaled from 0 to `hi` (default: their max); a gap where a
    value is missing; glyphs above `limit` (an SLO) in red."""
    values = values[-width:] if width > 0 else []
    top = hi if hi is not None else max((v for v in values if v is not None), default=0.0)
    text = Text()
    for v in values:
        level = round(min(max(v, 0.0), top) / top * 7) if top > 0 and v is not None else 0
        text.append(" " if v is None else BLOCKS[level], "red" if None not in (v, limit) and v > limit else "")
    return text


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 0.1:
        return f"{s * 1e3:.1f}ms"
    return f"{s * 1e3:.0f}ms" if s < 1 else f"{s:.2f}s"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(int(x) if fmt == "d" else x, fmt)


def _uptime(t: float | None) -> str:
    if t is None or t < 60:
        return "-" if t is None else f"{t:.1f}s"
    return f"{int(t // 60)}m{int(t % 60):02d}s" if t < 3600 else f"{int(t // 3600)}h{int(t % 3600 // 60):02d}m"


def _ago(now: float | None, t: float | None) -> str:
    """How long ago `t` was, when it is on the snapshot's clock (seconds since start); '' otherwise."""
    return f"-{_uptime(now - t)}" if now is not None and t is not None and 0 <= t <= now else ""


def _line(parts: list[tuple[Text | str, list[float | None], dict]], width: int, max_spark: int) -> Text:
    """Labelled values, each followed by its sparkline; the sparklines share what width is left."""
    labels = [Text(p) if isinstance(p, str) else p for p, _, _ in parts]
    room = width - sum(len(label) + 3 for label in labels)
    spark_w = max(0, min(max_spark, room // max(1, len(parts))))
    text = Text(no_wrap=True, overflow="ellipsis")
    for i, (label, (_, values, kw)) in enumerate(zip(labels, parts)):
        text.append("  " if i else "")
        text.append_text(label)
        if spark_w and values:
            text.append(" ").append_text(sparkline(values, spark_w, **kw))
    text.truncate(width, overflow="ellipsis")
    return text


def _within(value: float | None, slo: float | None) -> Text:
    style = "" if value is None or slo is None else ("green" if value <= slo else "bold red")
    return Text(_dur(value), style)


def _kv(w: dict, width: int) -> Text:
    total, free = w.get("kv_blocks_total"), w.get("kv_blocks_free")
    if not total or free is None or w.get("state") == "dead":
        return Text("-")
    used = (total - free) / total
    filled = round(used * width)
    style = "green" if used < 0.7 else "yellow" if used < 0.9 else "red"
    return Text("█" * filled, style) + Text("░" * (width - filled), "bright_black") + Text(f" {used:4.0%}")


def _state(w: dict, wide: bool) -> Text:
    state, target = w.get("state") or "?", w.get("target_role")
    if state == "dead":
        return Text("dead (lost)" if wide else "dead", STATE_STYLE["dead"])
    if target:  # mid-move: already routed as the target, still finishing work of its old role
        text = Text(f"{w.get('role')}→{target}", "bold yellow")
        return text.append(f" {state}", "yellow") if wide and state != "serving" else text
    return Text(state, STATE_STYLE.get(state, ""))


# ---- sections -----------------------------------------------------------------------------------

def _pick_workers(workers: list[dict], max_rows: int) -> tuple[list[dict], int]:
    """At most `max_rows` rows, keeping the lost and the moving ones when some must be left out."""
    if len(workers) <= max_rows:
        return workers, 0
    keep = max(0, max_rows - 1)  # one row says how many are hidden
    notable = [w for w in workers if w.get("state") not in ("serving", None) or w.get("target_role")]
    chosen = {id(w) for w in (notable + [w for w in workers if w not in notable])[:keep]}
    return [w for w in workers if id(w) in chosen], len(workers) - keep


def _workers_table(workers: list[dict], max_rows: int, wide: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAD if wide else None, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0) if wide else (0, 1), header_style="bold")
    for name, justify in (("id", "right"), ("role", "left"), ("state", "left"), ("run", "right"),
                          ("wait", "right"), ("park", "right"), ("KV used", "left"), ("step", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    if wide:
        for name in ("tokens", "pend", "pid"):  # last step's batch, prompt tokens routed here not yet done
            table.add_column(name, justify="right", no_wrap=True)
    rows, hidden = _pick_workers(workers, max_rows)
    for w in rows:
        role = w.get("role") or "?"
        counts = (_num(w.get(k), "d") for k in ("num_running", "num_waiting", "num_parked"))
        cells = [str(w.get("id", "?")), Text(role, ROLE_STYLE.get(role, "")), _state(w, wide), *counts,
                 _kv(w, 12 if wide else 10), _dur(w.get("step_time"))]
        if wide:
            cells += [_num(w.get(k), "d") for k in ("step_tokens", "pending_prefill_tokens", "pid")]
        table.add_row(*cells, style="on grey15" if w.get("state") == "dead" else None)
    if hidden:
        table.add_row("", Text(f"+{hidden} more", "dim"))
    return table


def _queues(snapshot: dict) -> Text:
    text = Text().append("queues ", "bold")
    for name, n in (snapshot.get("queues") or {}).items():
        text.append(f" {name} ").append(str(n), "bold yellow" if n else "")
    return text


def _latency_lines(snapshot: dict, history: History, width: int, spark: int, wide: bool) -> list[Text]:
    lat = snapshot.get("latency") or {}
    lines = []
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot")):
        p50, p90, slo = lat.get(f"{key}_p50"), lat.get(f"{key}_p90"), lat.get(f"slo_{key}")
        label = Text().append(f"{name} ", "bold")
        if p50 is None and p90 is None:
            label.append("no requests finished yet", "dim")
        else:
            label.append("p50 ").append_text(_within(p50, slo)).append(" p90 ").append_text(_within(p90, slo))
        label.append(f"  SLO {_dur(slo)}", "dim")
        lines.append(_line([(label, history.get(f"{key}_p90"), {"limit": slo})], width, spark))
    att = lat.get("slo_attainment")
    label = Text().append("SLO  ", "bold")
    if att is None:
        label.append("attainment -", "dim")
    else:
        label.append("attained ").append(f"{att:.1%}", "green" if att >= 0.9 else "yellow" if att >= 0.5 else "red")
    label.append(f"  goodput {_num(lat.get('goodput_rps'))} of {_num(lat.get('throughput_rps'))} req/s")
    counts = Text(f"{lat.get('num_finished', 0)} done {lat.get('num_failed', 0)} failed"
                  f" /{_num(lat.get('window_s'), '.0f')}s", "dim")
    if not wide:
        label.append("  ").append_text(counts)
    lines.append(_line([(label, history.get("slo_attainment"), {"hi": 1.0})], width, spark))
    return [*lines, Text("     ").append_text(counts)] if wide else lines


def _split_lines(snapshot: dict, history: History, width: int, spark: int, wide: bool) -> list[Text]:
    workers = snapshot.get("workers") or []
    alive = [w for w in workers if w.get("state") != "dead"]
    counts = " ".join(f"{n}{role[0].upper()}" for role in ROLES if (n := sum(w.get("role") == role for w in alive)))
    policy = snapshot.get("policy") or {}
    target = policy.get("target") or {}
    label = Text().append("P/D ", "bold").append(counts or "-")
    if target:
        label.append(" → target " + " ".join(f"{n}{role[0].upper()}" for role in ROLES if (n := target.get(role))),
                     "dim")
    split = [(label.append("  P"), history.get("prefill"), {"hi": len(workers) or None}),
             ("D", history.get("decode"), {"hi": len(workers) or None})]
    forecast = (policy.get("forecast") or {}).get("rate")
    fc = [(f"forecast {_num(forecast)} req/s", history.get("forecast_rate"), {})] if forecast is not None else []
    lat = snapshot.get("latency") or {}
    rate = Text().append("load ", "bold").append(f"{_num(lat.get('throughput_rps'))} req/s")
    load = [(rate, history.get("throughput_rps"), {}),
            (f"{_num(lat.get('output_tokens_per_s'), '.0f')} tok/s", history.get("output_tokens_per_s"), {}),
            (f"in flight {snapshot.get('num_requests', '-')}", history.get("num_requests"), {})]
    if lat.get("prefix_cache_hit_rate") is not None:
        load.append((f"cached {lat['prefix_cache_hit_rate']:.0%}", history.get("prefix_cache_hit_rate"), {"hi": 1.0}))
    if wide:  # one quantity a line in a side panel
        return [_line(split, width, spark), *(_line([p], width, spark) for p in (*fc, *load))]
    return [_line(split + fc, width, spark), _line(load, width, spark)]


def _changes(snapshot: dict, max_rows: int, width: int) -> list[Text]:
    now = snapshot.get("time")
    rows: list[Text] = []
    for m in snapshot.get("moves_in_progress") or []:
        text = Text().append("moving ", "bold yellow").append(f"w{m.get('worker', '?')} {m.get('from')}→{m.get('to')}")
        mode = "drain" if m.get("migrate") is False else "migrate"  # what happens to its running decodes
        text.append(f" {_ago(now, m.get('started_at'))}  {mode}")
        rows.append(text.append(f"  {m.get('reason') or ''}", "dim"))
    for c in reversed(snapshot.get("role_changes") or []):  # the controller appends: newest last
        ago = _ago(now, c.get("finished_at"))
        text = Text(f"{ago:>7} " if ago else "").append(f"w{c.get('worker', '?')} ")
        text.append(f"{c.get('from')}→{c.get('to')}", ROLE_STYLE.get(c.get("to") or "", ""))
        moved = "drained" if c.get("migrate") is False else f"{_num(c.get('num_migrated'), 'd')} migrated"
        text.append(f" {_num(c.get('duration_ms'), '.0f')}ms {moved}")
        rows.append(text.append(f"  {c.get('reason') or ''}", "dim"))
    for text in rows:
        text.no_wrap, text.overflow = True, "ellipsis"
        text.truncate(width, overflow="ellipsis")
    return rows[:max_rows]


# ---- the frame ----------------------------------------------------------------------------------

def _header(snapshot: dict, width: int) -> Text:
    workers, moves = snapshot.get("workers") or [], snapshot.get("moves_in_progress") or []
    lost = sum(w.get("state") == "dead" for w in workers)
    head = Text().append("DOPD", "bold reverse")
    if snapshot:
        head.append(f"  up {_uptime(snapshot.get('time'))}  policy {(snapshot.get('policy') or {}).get('name', '-')}")
        head.append(f"  {len(workers)} workers").append(f"  {lost} lost" if lost else "", "bold red")
        head.append(f"  {len(moves)} moving" if moves else "", "bold yellow")
        head.append(f"  in flight {snapshot.get('num_requests', '-')}")
    head.truncate(width, overflow="ellipsis")
    return head


def render(snapshot: dict | None, history: History | None = None, width: int = 80, height: int = 24,
           notice: str | None = None) -> RenderableType:
    """One frame for a `width`×`height` terminal, never taller than `height` while the workers fit in
    it (more are summarised as "+N more"); `notice` is a line shown above it (e.g. unreachable)."""
    history = history if history is not None else History()
    snapshot = snapshot or {}
    top: list[RenderableType] = [_header(snapshot, width)]
    if notice:
        top.append(Text(notice, "bold red", no_wrap=True, overflow="ellipsis"))
    if not snapshot:
        return Group(*top, Text("waiting for the first snapshot…", "dim"))
    wide = width >= WIDE[0] and height >= WIDE[1]
    workers = snapshot.get("workers") or []
    # Lines that every frame has: 9 compact (header, table head, queues, 3 latency, 2 split, log title),
    # 14 wide (header, 4 of the workers panel, 7 of the middle row, 2 of the log panel).
    room = max(2, height - len(top) - (14 if wide else 9))
    num_changes = len(snapshot.get("moves_in_progress") or []) + len(snapshot.get("role_changes") or [])
    want = min(num_changes, max(3, room - len(workers)), 20)
    worker_rows = max(1, min(len(workers), room - min(want, 3)))
    changes = _changes(snapshot, max(0, min(want, room - worker_rows)), width - 4 if wide else width)
    title = f"role changes ({num_changes}, newest first)"
    log_body = Group(*changes) if changes else Text("no role changes yet", "dim")
    table = _workers_table(workers, worker_rows, wide)
    if not wide:
        return Group(*top, table, _queues(snapshot), *_latency_lines(snapshot, history, width, 12, wide),
                     *_split_lines(snapshot, history, width, 10, wide), *([Text(title, "bold")] if changes else []),
                     log_body)
    half = width // 2 - 4  # each of two side-by-side panels, less borders and padding
    latency = _latency_lines(snapshot, history, half, 40, wide)
    split = _split_lines(snapshot, history, width - half - 8, 40, wide)
    latency += [Text()] * (len(split) - len(latency))  # both panels the same height
    grid = Table.grid(expand=True)
    grid.add_column(ratio=1)
    grid.add_column(ratio=1)
    grid.add_row(Panel(Group(*latency), title="latency vs SLO"), Panel(Group(*split), title="P/D split & load"))
    return Group(*top, Panel(table, title="workers", subtitle=_queues(snapshot)), grid, Panel(log_body, title=title))


# ---- the loops ----------------------------------------------------------------------------------

async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once when `stop` is set, so shutting down never waits out an interval."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def _refresh(frame: Callable[[int, int], RenderableType], stop: asyncio.Event, interval: float,
                   console: Console | None) -> None:
    """Redraw `frame(width, height)` every `interval` until `stop`; a failing frame is logged, never fatal."""
    console = console or Console()
    last_error = ""
    with Live(console=console, auto_refresh=False, screen=True, redirect_stdout=False, redirect_stderr=False) as live:
        while not stop.is_set():
            try:
                width, height = console.size
                live.update(frame(width, height), refresh=True)
                last_error = ""
            except Exception as e:  # the dashboard must never take the server down
                if repr(e) != last_error:  # once per distinct failure, not twice a second into the log
                    log.exception("monitor: cannot render a frame")
                last_error = repr(e)
            await _sleep(stop, interval)


async def run_monitor(get_snapshot: Callable[[], dict], stop: asyncio.Event, interval: float = 0.5,
                      console: Console | None = None) -> None:
    """The dashboard inside the server: `get_snapshot()` every `interval` until `stop` is set (or the task
    is cancelled); the terminal is restored either way."""
    history = History()

    def frame(width: int, height: int) -> RenderableType:
        snapshot = get_snapshot()
        history.add(snapshot)
        return render(snapshot, history, width, height)

    await _refresh(frame, stop, interval, console)


@dataclass(slots=True)
class _Feed:
    snapshot: dict | None = None
    error: str | None = None


async def watch(url: str, api_key: str | None = None, interval: float = 0.5, stop: asyncio.Event | None = None,
                console: Console | None = None, timeout: float = 3.0) -> None:
    """The dashboard of a remote server, fed by `GET {url}/v1/cluster`. Polling runs in its own task, so a
    hung server costs at most `timeout` of staleness, never a frozen screen."""
    import aiohttp

    stop = stop or asyncio.Event()
    url = url.rstrip("/")
    history, feed = History(), _Feed(error=f"connecting to {url}…")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def poll() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            while not stop.is_set():
                try:
                    async with session.get(f"{url}/v1/cluster", headers=headers) as response:
                        if response.status != 200:
                            raise RuntimeError(f"HTTP {response.status} {(await response.text())[:120]}")
                        feed.snapshot = await response.json()
                    feed.error = None
                    history.add(feed.snapshot)
                except Exception as e:
                    feed.error = f"cannot reach {url}: {_reason(e, timeout)}, retrying"
                await _sleep(stop, interval)

    poller = asyncio.create_task(poll())
    try:
        await _refresh(lambda w, h: render(feed.snapshot, history, w, h, notice=feed.error), stop, interval, console)
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)


def _reason(e: Exception, timeout: float) -> str:
    """A short why: aiohttp's own messages repeat the address and would push "retrying" off the line."""
    if isinstance(e, TimeoutError):
        return f"no answer in {timeout:g}s"
    os_error = getattr(e, "os_error", None)
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    return str(getattr(os_error, "strerror", None) or e) or type(e).__name__


def attach(url: str, api_key: str | None = None, interval: float = 0.5) -> int:
    """`python dopd.py monitor`: watch a running server until Ctrl-C; the exit code."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                pass
        await watch(url, api_key, interval, stop)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
