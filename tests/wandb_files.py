"""Read W&B's offline run files (``<dir>/wandb/offline-run-*/run-<id>.wandb``) without a server.

The file is a LevelDB-style log of protobuf ``Record`` messages: a 7-byte header (``:W&B``, a
2-byte magic, a version byte), then 32 KiB blocks of chunks, each with a 7-byte header (CRC,
length, type: full, first, middle, last). wandb 0.31 ships no Python reader of its own.
"""

from __future__ import annotations

import json
import struct
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


def offline_run(path: Path) -> dict[str, Any]:
    """Return what an offline run holds: run id, group, job_type, tags, config, history rows."""
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
    return {"/".join(item.nested_key) if item.nested_key else item.key: json.loads(item.value_json)
            for item in items}
