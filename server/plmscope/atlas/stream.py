"""The build's streaming pass: for each chunk of this shard not yet done, one pLM forward that
serves every layer with an SAE, the SAEs' encode and aggregation (``encode.SAEStage``, on the pipeline's worker
thread), the chunk file, the spills and a checkpoint now and then.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from .. import faults
from ..plm.base import ProteinLM
from .buildstate import BuildJob
from .chunks import annotate_pfam, iter_chunks, label_spans, read_families, write_chunk
from .encode import Pipeline, SAEStage, release_free_heap, residue_batches
from .settings import BuildSettings


@dataclass
class Models:
    """The pLM and the SAEs of a build; ``encoders[j]`` is SAE j's TopK screen or None (dense)."""

    plm: ProteinLM
    saes: list
    encoders: list

    def layers(self) -> dict[int, list[int]]:
        """pLM layer -> the SAEs (indices) that read it, in SAE order: one forward serves them all."""
        groups: dict[int, list[int]] = defaultdict(list)
        for j, s in enumerate(self.saes):
            groups[int(s.layer)].append(j)
        return dict(groups)

    def encode_stats(self, ids: list[str]) -> dict[str, dict]:
        """Per SAE id, its TopK screen's counters of this run."""
        return {i: e.stats for i, e in zip(ids, self.encoders) if e is not None}


class StreamPass:
    """One streaming pass of ``job``'s chunks still to do; ``run`` returns seconds per stage.

    ``on_checkpoint(n)`` is called after each chunk whose checkpoint is written, with the number
    of chunks done; ``on_progress(proteins_done, proteins_total, residues)`` after each batch (and
    once at the start), in place of the progress bar.  ``codes_for``: the proteins whose residue
    codes the aggregates keep (``chunks.concept_code_proteins``)."""

    def __init__(self, settings: BuildSettings, models: Models, job: BuildJob,
                 on_checkpoint: Callable[[int], None] | None = None,
                 on_progress: Callable[[int, int, int], None] | None = None,
                 codes_for: frozenset[str] = frozenset()) -> None:
        self.s, self.models, self.job, self.on_checkpoint = settings, models, job, on_checkpoint
        self.on_progress = on_progress
        self.families = read_families(settings.families) if settings.families else {}
        self.stage = SAEStage(models.saes, models.encoders, job.aggs, job.ids, job.state.root, models.plm.device,
                              slots=settings.pipeline + 1, codes_for=codes_for)
        self.timings: dict[str, float] = defaultdict(float)  # reported in the summary and atlas_meta
        self.last_ckpt = time.time()
        self.n_res = 0

    def run(self) -> dict[str, float]:
        todo = self.job.todo()
        layers = self.models.layers()
        with Pipeline(in_flight=self.s.pipeline) as pipeline, self._progress_bar(todo) as bar:
            for c, chunk in iter_chunks(self.s, self.models.plm.max_residues, set(todo)):
                self._write_chunk(c, chunk)
                faults.point("chunk:written")
                self.stage.start_chunk(c, label_spans(chunk))
                self._forward(chunk, layers, pipeline, bar)
                self._end_chunk(c, pipeline, last=c == todo[-1])
        for k, v in self.stage.timings.items():
            self.timings[k] += v
        if not todo:
            self.job.checkpoint()
        return self.timings

    def _progress_bar(self, todo: list[int]):
        from tqdm import tqdm

        plan = self.job.plan
        total = plan.proteins(plan.mine)
        bar = tqdm(total=total, initial=total - plan.proteins(todo), unit="prot", desc="build",
                   dynamic_ncols=True, mininterval=1.0, disable=self.on_progress is not None)
        self.n_prot, self.n_total = total - plan.proteins(todo), total  # a disabled bar counts nothing
        if self.on_progress is not None:
            self.on_progress(self.n_prot, total, 0)
        return bar

    def _write_chunk(self, c: int, chunk: list) -> None:
        pfam_families = annotate_pfam(chunk, self.s.pfam) if self.s.pfam else {}
        tw = time.perf_counter()
        write_chunk(self.job.state.root, c, chunk, self.models.plm.max_residues, self.s, self.families, pfam_families)
        self.timings["structures+chunk_files"] += time.perf_counter() - tw

    def _forward(self, chunk: list, layers: dict[int, list[int]], pipeline: Pipeline, bar) -> None:
        """The chunk's forward, once for all ``layers`` (layer -> its SAEs' indices); each batch is
        handed to each layer's SAEs as it comes."""
        items = [(p.accession, p.sequence) for p in chunk]
        budget = self.s.token_budget
        stream = self.models.plm.iter_layer_representations(items, list(layers), token_budget=budget,
                                                            sort_window=len(items) or 1)
        t = self.timings
        tf = time.perf_counter()
        for batch in residue_batches(stream, budget):
            t["plm_forward"] += time.perf_counter() - tf
            n_prot, n_res = len(batch), sum(len(b[1]) for b in batch)
            for j, members in enumerate(layers.values()):
                tw = time.perf_counter()
                packed = self.stage.pack([(rid, seq, reps[j]) for rid, seq, reps in batch])
                ts = time.perf_counter()
                # waits for the batch before (serial build: runs this one, so the wait is the
                # stage's own encode + aggregation time, also counted under their names)
                pipeline.submit(self.stage, packed, members)
                t["sae_handoff"] += ts - tw
                t["sae_wait"] += time.perf_counter() - ts
            del batch  # the forward's tensors: gone before the next forward (see pack)
            self.n_res += n_res
            bar.update(n_prot)
            bar.set_postfix(residues=self.n_res, refresh=False)
            self.n_prot += n_prot
            if self.on_progress is not None:
                self.on_progress(self.n_prot, self.n_total, self.n_res)
            tf = time.perf_counter()

    def _end_chunk(self, c: int, pipeline: Pipeline, *, last: bool) -> None:
        """Wait for the chunk's last batch, spill what is pending, checkpoint when it is time."""
        tw = time.perf_counter()
        pipeline.wait()
        self.timings["sae_wait"] += time.perf_counter() - tw
        tw = time.perf_counter()
        self.stage.end_chunk()
        self.job.done.append(c)
        self.timings["spill"] += time.perf_counter() - tw
        every = self.s.checkpoint_every
        if every <= 0 or time.time() - self.last_ckpt >= every or last:
            tw = time.perf_counter()
            self.job.checkpoint()
            self.last_ckpt = time.time()
            self.timings["checkpoint"] += time.perf_counter() - tw
        release_free_heap()
        if self.on_checkpoint is not None and self.job.checkpointed:
            self.on_checkpoint(len(self.job.done))
