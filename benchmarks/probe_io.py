"""What the stand-alone probes share: their command line and their JSON file."""

from __future__ import annotations

import argparse
import json

import torch


def probe_main(run, doc: str, argv=None) -> None:
    """``python -m benchmarks.<probe> [--out FILE]``: run ``run(out_path)``; the first
    line of ``doc`` (the probe's module docstring) is the command's description."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    run(ap.parse_args(argv).out)


def write_rows(out_path, rows: list[dict], **fields) -> None:
    """Write ``{"device": ..., **fields, "rows": rows}`` to ``out_path`` (nothing when
    it is None)."""
    if not out_path:
        return
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), **fields, "rows": rows}, f,
                  indent=1)
