"""Scan stage: max-activating dataset examples, densities, histograms, corpus CE and random-prompt baselines.

Entry points: :func:`scan_documents` (the scan, no store: the CLI, the nightly and
:func:`reverie.scan` all run it), :func:`run_scan` (on the store: reuse, checkpoints, resume),
:func:`scan_texts` (texts in memory), :func:`scan_key`. Modules: :mod:`~stages.scan.stage` (the
pass), :mod:`~stages.scan.rows` (its rows), :mod:`~stages.scan.store`, :mod:`~stages.scan.memory`.
"""

from reverie.stages.scan.memory import scan_texts, text_documents
from reverie.stages.scan.rows import ScanResult, finish_scan, scan_documents
from reverie.stages.scan.stage import ScanState, scan_key, scan_latent_ids, scan_pass
from reverie.stages.scan.store import load_checkpoint, run_scan, write_checkpoint, write_scan

__all__ = ["ScanResult", "ScanState", "finish_scan", "load_checkpoint", "run_scan", "scan_documents", "scan_key", "scan_latent_ids",
           "scan_pass", "scan_texts", "text_documents", "write_checkpoint", "write_scan"]
