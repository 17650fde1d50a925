"""`pipeline venue`: the local Gemini-compatible venue."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import console, setup_logging
from pipeline.core.errors import PipelineError


def venue(
    port: int = typer.Option(8090, help="Port on 127.0.0.1 (0 picks a free one)."),
    capture: Optional[Path] = typer.Option(None, help="Replay this recorded capture."),
    symbols: str = typer.Option("BTCUSD,ETHUSD", help="Generate books for these symbols "
                                                      "(when no capture is given)."),
    speed: Optional[float] = typer.Option(None, help="Replay speed: 1 = as recorded; "
                                                     "default as fast as possible."),
    rate: float = typer.Option(200.0, help="Generator events per second (0 = maximum)."),
    seed: int = typer.Option(1, help="Generator seed: same seed, same market."),
    heartbeat: float = typer.Option(5.0, help="Seconds between heartbeats."),
    loop: bool = typer.Option(False, help="Replay the capture again when it ends."),
    keys_file: Optional[Path] = typer.Option(None, "--keys", help="JSON {api_key: secret, "
                                             "or {\"secret\", \"time_nonce\": true, "
                                             "\"accounts\": [...]}} accepted by the venue."),
) -> None:
    """Run the local Gemini-compatible venue (WebSocket market data + REST) in the foreground."""
    import json as _json

    from pipeline.venue.server import VenueConfig, serve_forever

    if capture is not None and not capture.exists():
        raise PipelineError(f"capture {capture} does not exist")
    keys = _json.loads(keys_file.read_text()) if keys_file else {}
    config = VenueConfig(port=port, capture=capture, speed=speed, rate=rate or None, seed=seed,
                         heartbeat_s=heartbeat, loop=loop, api_keys=keys,
                         symbols=[s.strip().upper() for s in symbols.split(",") if s.strip()])
    setup_logging("INFO")
    source = f"replaying {capture}" if capture else f"generating {config.symbols}"
    console.print(f"Gemini venue on ws://127.0.0.1:{port} ({source}); Ctrl-C stops it")
    serve_forever(config)
