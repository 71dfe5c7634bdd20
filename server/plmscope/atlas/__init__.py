"""Stage 4: the atlas build.  ``aggregate`` (streaming, mergeable per-SAE state), ``finalize``
(state -> table columns), ``structures`` (gemmi + alignment), ``pfam`` (pyhmmer), ``build`` and
``merge`` (the ``plmscope build`` / ``plmscope merge`` commands).  SQL lives in ``store.writer``."""
