#!/usr/bin/env python
"""DOPD: serve an LLM with prefill and decode on separate workers that move between roles as load shifts.

    python dopd.py [--gpus N] [--mode dopd|static|colocated|...] ...   serve (see --help)
    python dopd.py monitor --url http://127.0.0.1:8000                  watch a running server
"""

from __future__ import annotations

import argparse
import logging
import sys

from dopd.config import DopdConfig, add_arguments, from_args


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dopd.py", description="Serve an OpenAI-compatible API with dynamic prefill/decode disaggregation. "
        "Every flag below comes from dopd/config.py. `python dopd.py monitor --help` attaches the live view "
        "to a running server.")
    add_arguments(parser, DopdConfig)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="logging verbosity (default: info)")
    return parser


def monitor_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dopd.py monitor", description="Live view of a running DOPD server.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    parser.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes (default: 0.5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["monitor"]:
        args = monitor_parser().parse_args(argv[1:])
        from dopd.monitor import attach

        return attach(args.url, args.api_key, args.interval)
    # --policy NAME is --mode NAME: the simulator's word for the same choice.
    argv = ["--mode" if a == "--policy" else a.replace("--policy=", "--mode=") for a in argv]
    args = serve_parser().parse_args(argv)
    values = vars(args)
    log_level = values.pop("log_level")
    try:
        cfg = from_args(DopdConfig, values)
    except ValueError as e:
        print(f"dopd.py: error: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg, log_level)
    import uvloop

    from dopd.server import serve

    try:
        uvloop.run(serve(cfg))
    except ValueError as e:  # a configuration that this machine or model cannot serve
        print(f"dopd.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def _setup_logging(cfg: DopdConfig, level: str) -> None:
    dashboard = cfg.server.monitor and sys.stdout.isatty()
    log_file = cfg.server.log_file or ("dopd.log" if dashboard else None)
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


if __name__ == "__main__":
    sys.exit(main())
