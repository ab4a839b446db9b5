"""Read W&B's offline run files (``<dir>/wandb/offline-run-*/run-<id>.wandb``) without a server.

The file is a LevelDB-style log of protobuf ``Record`` messages: a 7-byte header (``:W&B``, a
2-byte magic, a version byte), then 32 KiB blocks of chunks, each with a 7-byte header (CRC,
length, type: full, first, middle, last). wandb 0.31 ships no Python reader of its own.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Iterator

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Yield the protobuf records of one .wandb file, in the order they were written."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    position, pending = 7, b""
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        chunk = data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
        if len(chunk) < length:  # still being written
            return
        position += CHUNK_HEADER + length
        if kind not in (FULL, FIRST, MIDDLE, LAST):
            raise ValueError(f"{path}: chunk of unknown type {kind} at byte {position}")
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_run(path: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Return what an offline run holds: run id, project, group, job_type, tags, config,
    history rows, summary.

    W&B writes the file in its own process, which may still be writing when ``finish()`` has
    returned: this waits (up to ``timeout`` seconds) for the run's exit record, the last one.
    """
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in records(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.1)
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, group=record.run.run_group,
                       job_type=record.run.job_type, tags=list(record.run.tags),
                       project=record.run.project)
            run["config"].update(_items(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
    return run


def _items(items) -> dict[str, Any]:
    """Return {key: value} of config, history or summary items; W&B sends a nested value as
    one item per leaf (``nested_key`` its path), which is nested again here."""
    values: dict[str, Any] = {}
    for item in items:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(item.value_json)
    return values


def wandb_table(path: Path) -> Any:
    """Return a table a run logged (``files/<path>`` of its ``table-file`` entry) as a pandas
    DataFrame."""
    import pandas

    table = json.loads(Path(path).read_text())
    return pandas.DataFrame(table["data"], columns=table["columns"])
