"""Batch jobs on a bundle, no HTTP: folder scoring (local threads or Ray Data), the JSONL stream, and
drift monitoring of per-layer contribution shares. Their console scripts are in `cli.py`."""
