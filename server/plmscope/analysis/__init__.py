"""Interpretation of an atlas: `plmscope analyze` (family specificity, activation patterns,
concept associations, linear probes, automatic descriptions).

Each module does one job on plain numpy / scipy data; ``run.py`` reads the atlas through
``plmscope.store.analysis_sql`` (all SQL lives in the store layer) and writes the results back.
"""
