"""`cltvit-stream`: image paths or JSONL on stdin -> one JSONL result per input line on stdout.

    find imgs -name '*.png' | cltvit-stream --bundle B > results.jsonl
    producer | cltvit-stream --bundle B --reference ref.json --metrics-file /var/lib/node_exporter/cltvit.prom | consumer

Input lines, one image each (blank lines are ignored):
  - a plain file path: `imgs/a.png`
  - a JSON object: `{"path": "imgs/a.png"}` or `{"image": "<base64 bytes>"}`, with an optional `id`
    that is copied to the output.
Output lines are result records in input order (serving.explainer: path, error, label, top,
shares; plus `id` when given, `drift` with `--reference`, `spatial` with `--spatial`, `total_effect` with
`--total-effect`). A bad input line (unreadable image,
malformed JSON or base64) gets a record with `error`; the stream goes on.

Latency vs throughput: the first waiting line is processed at once, together with any lines that
have already arrived (up to --batch-size), and the results are flushed after every batch, so the
tool answers immediately on a trickle and batches under load.
"""
from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

_EOF = object()


def parse_line(line: str) -> tuple[Any, dict[str, Any]]:
    """(image source: path str or bytes, extra output fields) of one input line; raises ValueError."""
    text = line.strip()
    if not text.startswith("{"):
        return text, {"path": text}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON input line ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("a JSON input line must be an object with \"path\" or \"image\"")
    extra: dict[str, Any] = {"id": obj["id"]} if "id" in obj else {}
    if isinstance(obj.get("path"), str) and obj["path"]:
        return obj["path"], {"path": obj["path"], **extra}
    if isinstance(obj.get("image"), str):
        try:
            return base64.b64decode(obj["image"], validate=True), {"path": None, **extra}
        except (binascii.Error, ValueError):
            raise ValueError("field \"image\" is not valid base64") from None
    raise ValueError("a JSON input line needs a non-empty \"path\" string or an \"image\" (base64) string")


def _reader(stream: TextIO, q: "queue.Queue[Any]") -> None:
    for line in stream:
        if line.strip():
            q.put(line)
    q.put(_EOF)


def batches(stream: TextIO, batch_size: int) -> Iterator[list[str]]:
    """Lines of `stream` grouped: block for the first, then take whatever has already arrived."""
    q: "queue.Queue[Any]" = queue.Queue(maxsize=4 * batch_size)
    threading.Thread(target=_reader, args=(stream, q), daemon=True, name="cltvit-stdin").start()
    done = False
    while not done:
        item = q.get()
        if item is _EOF:
            return
        batch = [item]
        while len(batch) < batch_size:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if item is _EOF:
                done = True
                break
            batch.append(item)
        yield batch


def run_stream(explainer: Any, stdin: TextIO, stdout: TextIO, *, batch_size: int = 16, workers: int = 2,
               monitor: Any = None, metrics_file: str | Path | None = None) -> int:
    """Process `stdin` to `stdout` until EOF; returns the number of records written."""
    written = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cltvit-decode") as pool:
        for lines in batches(stdin, batch_size):
            metas: list[dict[str, Any]] = []
            futures = []
            for line in lines:
                try:
                    src, meta = parse_line(line)
                    futures.append(pool.submit(_load, explainer, src))
                except ValueError as e:
                    meta = {"path": None, "_error": str(e)}
                    futures.append(None)
                metas.append(meta)
            loaded, errors = [], []
            for meta, fut in zip(metas, futures):
                pix, err = fut.result() if fut is not None else (None, meta.pop("_error"))
                loaded.append(pix)
                errors.append(err)
            records = explainer.assemble([m.get("path") for m in metas], loaded, errors)
            out = []
            for meta, rec in zip(metas, records):
                if "id" in meta:
                    rec = {"id": meta["id"], **rec}
                if rec["error"] is None and monitor is not None:
                    monitor.update(np.array([rec["shares"][t] for t in monitor.term_names]))
                    rec["drift"] = monitor.summary()
                out.append(json.dumps(rec) + "\n")
            stdout.write("".join(out))
            stdout.flush()
            written += len(out)
            if monitor is not None and metrics_file is not None:
                monitor.write_metrics(metrics_file)
    return written


def _load(explainer: Any, src: Any) -> tuple[np.ndarray | None, str | None]:
    try:
        return explainer.load(src), None
    except Exception as e:  # noqa: BLE001 - one bad input never stops the stream
        return None, str(e) if type(e).__name__ == "ImageError" else f"{type(e).__name__}: {e}"
