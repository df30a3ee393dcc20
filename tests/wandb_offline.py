"""Reading back an offline W&B run file, so tests check what was logged without a server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_wandb_offline(run_file: Path) -> dict[str, Any]:
    """Read back an offline wandb run (`run-<id>.wandb`): its name, group, config, history rows
    and summary.

    The file is wandb's transaction log: a 7-byte header, then LevelDB-log records (4-byte
    checksum, 2-byte length, 1-byte type: full/first/middle/last) in 32 KiB blocks, each holding
    a serialized `wandb.proto` Record. Lets tests and reports check what was logged without a
    server.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    block, header = 32768, 7
    position, pending, payloads = header, b"", []
    while position + header <= len(data):
        if block - position % block < header:  # too little room left in this block: padding
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + header : position + header + length]
        position += header + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):  # full or last: one record complete
            payloads.append(pending)
            pending = b""

    def item_key(item) -> str:
        return item.key or "/".join(item.nested_key)

    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "name": "", "group": ""}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["group"] = record.run.display_name, record.run.run_group
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            run["config"].update({item_key(i): json.loads(i.value_json) for i in updates})
        elif kind == "history":
            run["history"].append(
                {item_key(i): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            run["summary"].update(
                {item_key(i): json.loads(i.value_json) for i in record.summary.update}
            )
    return run
