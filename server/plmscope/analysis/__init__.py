"""Interpretation of an atlas: `plmscope analyze` (family specificity, activation patterns,
concept associations, linear probes, automatic descriptions).

Each module does one job on plain numpy / scipy data; ``run.py`` reads the atlas through
``plmscope.store.reader`` and ``analysis_reads`` and writes the results back through
``plmscope.store.analysis_writes`` (all SQL lives in the store layer).
"""
