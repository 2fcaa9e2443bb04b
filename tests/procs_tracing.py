"""``tests.procs`` workers with OpenTelemetry tracing on.

    PGJ_SPANS=/path/spans.jsonl python -m tests.procs_tracing DSN SCHEMA [options of tests.procs]

Sets a global SDK ``TracerProvider`` whose exporter writes each finished span
as one JSON line (name, trace and span ids in hex, parent span id, attributes,
status) to the file named by ``PGJ_SPANS``, flushed at once: a test reads the
spans of a worker it killed with ``kill -9``. Then serves as ``tests.procs``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tests import procs


class JsonLinesExporter(SpanExporter):
    """Each span as one JSON line, written and flushed when the span ends."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self._file.write(json.dumps(as_json(span)) + "\n")
        self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()


def as_json(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": None if span.parent is None else format(span.parent.span_id, "016x"),
        "attributes": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in (span.attributes or {}).items()},
        "status": span.status.status_code.name,
        "pid": os.getpid(),
    }


def main() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ["PGJ_SPANS"])))
    trace.set_tracer_provider(provider)
    try:
        procs.main()
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
