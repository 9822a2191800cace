"""Structured logs: one JSON object per line (docs/health.md section 7).

    configure_logging(json_lines=True)                       # once, at start-up (serve --log-json)
    log_event("eject", model="mlp", version=2, reason="5 consecutive failures ...")

Every event is a record of the `tinyserve.events` logger whose message reads well as text
(`eject model='mlp' version=2 reason='...'`) and which `JsonFormatter` writes as
`{"ts": "2026-11-27T10:00:00.123Z", "level": "WARNING", "logger": "tinyserve.events", "event": "eject",
"model": "mlp", "version": 2, "reason": "...", "msg": "eject model='mlp' ..."}`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys

__all__ = ["EVENTS", "JsonFormatter", "configure_logging", "log_event"]

# kind -> level.  Other kinds are logged too (at INFO): a log call never fails.
EVENTS = {
    "load": logging.INFO, "load_failed": logging.ERROR, "unload": logging.INFO, "evict": logging.INFO,
    "eject": logging.WARNING, "readmit": logging.INFO, "fail": logging.ERROR, "device_fault": logging.ERROR,
    "device_recovered": logging.INFO,
}
RESERVED = ("ts", "level", "logger", "event", "msg")
MAX_FIELD = 4096  # characters of one string field
events_log = logging.getLogger("tinyserve.events")


def _clean(value):
    """A JSON-friendly value: str/int/float/bool/None as they are (strings capped), sequences and
    maps recursively (map keys as strings), anything else as its str()."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_FIELD else value[:MAX_FIELD] + "..."
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    return _clean(str(value))


def log_event(kind: str, *, logger: logging.Logger | None = None, level: int | None = None, **fields) -> None:
    """Log one event of `kind` with its fields (a field named like a reserved key gets a `field_` prefix)."""
    kind = str(kind)
    clean = {}
    for k, v in fields.items():
        clean[f"field_{k}" if k in RESERVED else k] = _clean(v)
    text = kind + "".join(f" {k}={v!r}" for k, v in clean.items())
    lg = logger or events_log
    lvl = level if level is not None else EVENTS.get(kind, logging.INFO)
    if lg.isEnabledFor(lvl):
        lg.log(lvl, "%s", text, extra={"tinyserve_event": kind, "tinyserve_fields": clean})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601, milliseconds), level, logger, event (for
    log_event records), the event's fields, msg, and exc (a traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
               + f"{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name}
        kind = getattr(record, "tinyserve_event", None)
        if kind is not None:
            out["event"] = kind
            out.update(getattr(record, "tinyserve_fields", {}))
        try:
            out["msg"] = record.getMessage()
        except Exception as exc:  # noqa: BLE001 - a bad format string must not lose the record
            out["msg"] = f"{record.msg!r} (formatting failed: {exc})"
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str, allow_nan=False)


def configure_logging(json_lines: bool = False, *, stream=None, level: int = logging.INFO,
                      logger_name: str = "tinyserve") -> logging.Handler:
    """Send the `tinyserve` loggers to `stream` (stderr), as JSON lines or as plain text; returns the
    handler (remove it to undo).  Replaces a handler this function installed before."""
    lg = logging.getLogger(logger_name)
    for h in list(lg.handlers):
        if getattr(h, "_tinyserve_handler", False):
            lg.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._tinyserve_handler = True
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lg.addHandler(handler)
    lg.setLevel(level)
    return handler
