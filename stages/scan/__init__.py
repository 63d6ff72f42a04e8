"""Scan stage: max-activating dataset examples, densities, histograms, corpus CE and random-prompt baselines.

Entry points: :func:`scan_key`, :func:`run_scan` (see :mod:`stages.scan.stage`).
"""

from reverie.stages.scan.stage import (
    ScanResult,
    ScanState,
    finish_scan,
    run_scan,
    scan_key,
    scan_latent_ids,
    scan_pass,
    write_scan,
)

__all__ = ["ScanResult", "ScanState", "finish_scan", "run_scan", "scan_key", "scan_latent_ids", "scan_pass", "write_scan"]
