"""The atlas schema: one DuckDB file, one definition for writer and reader.

Conventions
-----------
* Residue positions are 1-based and inclusive everywhere (``start``, ``end``, ``max_pos``).
* ``sae_id`` is a short URL-safe name (``unirep-256.L1.topk4096``) unique within an atlas.
* Per-residue activations are stored as ``BLOB`` of ``uint8``: value ``q`` stands for
  ``q / 255 * scale`` where ``scale`` is the latent's maximum activation over the corpus
  (``latents.max_act``); the absolute error is at most ``scale / 510``.  One byte per residue;
  ``vocab.quantize`` / ``vocab.dequantize`` encode and decode.
* Lists that are short and fixed (histograms, amino-acid counts) are DuckDB arrays.
* ``atlas_meta`` holds JSON values: ``atlas_id`` (content hash of inputs + settings, embedded in
  permalinks), ``schema_version``, ``created_at``, ``versions``, ``inputs`` (paths + sha256),
  ``build_settings``, ``corpus_stats``, ``skipped`` (reason -> count, with examples).
"""

from __future__ import annotations

from .. import vocab

# 2: latent_concepts carries InterPLM's rule (validation and test numbers, interval, counts per
#    split, normalising maximum); latent_analysis names its concept by validation F1;
#    protein_embeddings.max_rep (the raw probe is pooled as the SAE probe is); probe_comparisons;
#    probe_results / probe_latents with pooling, chosen C, intervals and evidence.
# 3: saes.context_free: the pLM's context-free positions, left out of every statistic.
# 4: residue_codes: the concept proteins' per-residue codes, for analyze's concept step.
SCHEMA_VERSION = 4

AMINO_ACIDS = vocab.AMINO_ACIDS  # order of every aa_counts array

# Log-spaced edges of the per-residue activation histogram and of the quantile-bin sketch
# buckets.  Fixed for all atlases so that shard aggregates merge by addition.
HIST_MIN_EXP = -4.0  # 1e-4
HIST_MAX_EXP = 3.0  # 1e3
HIST_BINS = 56  # 8 bins per decade

TABLES: dict[str, str] = {
    "atlas_meta": """
        CREATE TABLE atlas_meta (
            key VARCHAR PRIMARY KEY,
            value JSON NOT NULL
        )""",
    "saes": """
        CREATE TABLE saes (
            sae_id VARCHAR PRIMARY KEY,
            plm VARCHAR NOT NULL,            -- pLM spec the SAE was trained on
            layer INTEGER NOT NULL,
            architecture VARCHAR NOT NULL,   -- 'topk' | 'relu'
            d_in INTEGER NOT NULL,
            d_sae INTEGER NOT NULL,
            k INTEGER,                       -- TopK only
            cfg JSON NOT NULL,               -- the SAE directory's whole cfg.json
            metrics JSON,                    -- eval-sae results stored with the SAE (may be null)
            n_dead INTEGER NOT NULL,         -- latents never active on this corpus
            n_proteins INTEGER NOT NULL,
            n_residues BIGINT NOT NULL,      -- residues counted in the statistics (context-free ones not)
            context_free INTEGER NOT NULL DEFAULT 0, -- leading residues of each protein left out of
                                             -- every statistic: the pLM's context-free positions
            hist_edges DOUBLE[] NOT NULL,    -- HIST_BINS + 1 edges
            aa_background BIGINT[] NOT NULL, -- residue counts per AMINO_ACIDS letter, whole corpus
            weights BLOB NOT NULL,           -- sae_weights.safetensors bytes: the atlas is self-contained
            built_at TIMESTAMP NOT NULL,
            position INTEGER NOT NULL        -- display order
        )""",
    "proteins": """
        CREATE TABLE proteins (
            accession VARCHAR PRIMARY KEY,
            entry_name VARCHAR NOT NULL DEFAULT '',
            protein_name VARCHAR NOT NULL DEFAULT '',
            organism VARCHAR NOT NULL DEFAULT '',
            length INTEGER NOT NULL,
            sequence VARCHAR NOT NULL,
            locations VARCHAR[] NOT NULL,     -- subcellular location classes (may be empty)
            families VARCHAR[] NOT NULL,      -- distinct Pfam ids, for display and filters
            fields JSON NOT NULL,             -- other corpus columns (GO ids ...)
            truncated_to INTEGER,             -- residues the pLM saw, when it truncated
            has_structure BOOLEAN NOT NULL DEFAULT false
        )""",
    "annotations": """
        CREATE TABLE annotations (
            accession VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,            -- 'pfam' | 'feature' | 'nls' (or a corpus TSV's own kinds)
            type VARCHAR NOT NULL,            -- 'Pfam domain', 'signal peptide', 'helix' ...
            label VARCHAR NOT NULL,           -- Pfam id / feature note
            name VARCHAR NOT NULL DEFAULT '', -- Pfam family name
            start INTEGER NOT NULL,
            "end" INTEGER NOT NULL,
            score DOUBLE
        )""",
    "families": """
        CREATE TABLE families (
            family VARCHAR PRIMARY KEY,       -- Pfam accession
            name VARCHAR NOT NULL,
            description VARCHAR NOT NULL DEFAULT ''
        )""",
    "structures": """
        CREATE TABLE structures (
            structure_id VARCHAR PRIMARY KEY, -- '<accession>:<file stem>:<chain>'
            accession VARCHAR NOT NULL,
            file_name VARCHAR NOT NULL,
            chain VARCHAR NOT NULL,
            format VARCHAR NOT NULL,          -- 'pdb' | 'mmcif'
            is_prediction BOOLEAN NOT NULL,   -- AlphaFold-style model: B-factor = pLDDT
            identity DOUBLE NOT NULL,         -- % identical over aligned pairs
            coverage DOUBLE NOT NULL,         -- % of protein residues with a mapped structure residue
            source VARCHAR NOT NULL DEFAULT '',
            content VARCHAR NOT NULL          -- the chain as PDB text (model 1), ready for 3Dmol
        )""",
    "structure_residues": """
        CREATE TABLE structure_residues (
            structure_id VARCHAR NOT NULL,
            seq_pos INTEGER NOT NULL,         -- 1-based position in proteins.sequence
            auth_seq_id INTEGER NOT NULL,     -- residue number in the structure file
            ins_code VARCHAR NOT NULL DEFAULT '',
            plddt REAL                        -- predictions only
        )""",
    "latents": """
        CREATE TABLE latents (
            sae_id VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            max_act REAL NOT NULL,            -- 0 for dead latents
            mean_act REAL NOT NULL,           -- mean over active residues
            n_active_residues BIGINT NOT NULL,
            n_active_proteins BIGINT NOT NULL,
            frac_residues DOUBLE NOT NULL,    -- density over residues
            frac_proteins DOUBLE NOT NULL,    -- density over proteins
            is_dead BOOLEAN NOT NULL,
            hist_counts BIGINT[] NOT NULL,    -- per-residue non-zero activations per hist bin
            aa_counts BIGINT[] NOT NULL,      -- active residues per AMINO_ACIDS letter
            top_family VARCHAR,               -- most common Pfam family among active residues
            top_family_frac DOUBLE,
            top_annotation_type VARCHAR,
            top_annotation_frac DOUBLE,
            PRIMARY KEY (sae_id, latent)
        )""",
    "latent_examples": """
        CREATE TABLE latent_examples (
            sae_id VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            kind VARCHAR NOT NULL,            -- 'top' | 'bin'
            bin INTEGER,                      -- 0 = weakest .. n_bins-1; NULL for 'top'
            rank INTEGER NOT NULL,            -- 0-based within (kind, bin), strongest first
            accession VARCHAR NOT NULL,
            max_act REAL NOT NULL,
            max_pos INTEGER NOT NULL,         -- 1-based residue of the maximum
            n_active INTEGER NOT NULL,        -- residues with activation > 0
            activations BLOB NOT NULL         -- uint8 per residue, scale = latents.max_act
        )""",
    "latent_bins": """
        CREATE TABLE latent_bins (
            sae_id VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            bin INTEGER NOT NULL,
            lo REAL NOT NULL,                 -- protein max activation in [lo, hi)
            hi REAL NOT NULL,                 -- the last bin includes hi
            n_proteins BIGINT NOT NULL        -- proteins of the corpus whose max falls in the bin
        )""",
    "latent_families": """
        CREATE TABLE latent_families (
            sae_id VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            family VARCHAR NOT NULL,
            n_residues BIGINT NOT NULL,       -- active residues inside this family's domains
            frac DOUBLE NOT NULL              -- of the latent's active residues
        )""",
    "latent_annotation_types": """
        CREATE TABLE latent_annotation_types (
            sae_id VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            type VARCHAR NOT NULL,
            n_residues BIGINT NOT NULL,
            frac DOUBLE NOT NULL
        )""",
    "latent_neighbors": """
        CREATE TABLE latent_neighbors (
            sae_id VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            rank INTEGER NOT NULL,
            neighbor INTEGER NOT NULL,
            cosine REAL NOT NULL               -- decoder direction cosine similarity
        )""",
    "protein_latents": """
        CREATE TABLE protein_latents (
            sae_id VARCHAR NOT NULL,
            accession VARCHAR NOT NULL,
            rank INTEGER NOT NULL,            -- 0 = strongest latent on this protein
            latent INTEGER NOT NULL,
            max_act REAL NOT NULL,
            max_pos INTEGER NOT NULL,
            n_active INTEGER NOT NULL,
            activations BLOB NOT NULL         -- uint8 per residue, scale = latents.max_act
        )""",
    "residue_codes": """
        CREATE TABLE residue_codes (
            sae_id VARCHAR NOT NULL,          -- per-residue codes of the concept proteins (build --concept-proteins),
            accession VARCHAR NOT NULL,       -- read by analyze's concept step instead of a second pLM pass
            n_rows INTEGER NOT NULL,          -- residues after the pLM's context-free positions (saes.context_free)
            row_counts BLOB NOT NULL,         -- non-zero codes per residue: uint16 (uint32 when d_sae > 65535)
            latents BLOB NOT NULL,            -- latent of each non-zero code, residue by residue: same type
            activations BLOB NOT NULL,        -- its value, value_type (vocab.code_values)
            value_type VARCHAR NOT NULL       -- float16 | float32
        )""",
    "protein_latent_stats": """
        CREATE TABLE protein_latent_stats (
            sae_id VARCHAR NOT NULL,          -- every (protein, latent) pair with any activation > 0
            accession VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            max_act REAL NOT NULL,
            sum_act REAL NOT NULL,            -- mean-pooling = sum_act / proteins.length
            n_active INTEGER NOT NULL
        )""",
    "protein_embeddings": """
        CREATE TABLE protein_embeddings (
            sae_id VARCHAR NOT NULL,          -- the SAE's pLM and layer
            accession VARCHAR NOT NULL,
            mean_rep FLOAT[] NOT NULL,        -- mean over residues of the raw pLM representation
            max_rep FLOAT[] NOT NULL          -- per-dimension max over residues (schema 2)
        )""",
    # ---- written by `plmscope analyze` (interpretation) ----
    "latent_analysis": """
        CREATE TABLE latent_analysis (
            sae_id VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            pattern VARCHAR NOT NULL,          -- dead|point|short_motif|long_motif|periodic|whole
            family VARCHAR,                    -- best family, chosen on the selection half
            family_threshold REAL,             -- fraction of the latent's max over the selection half
            family_precision DOUBLE,
            family_recall DOUBLE,
            family_f1 DOUBLE,                  -- on the held-out half
            family_auc DOUBLE,
            family_specific BOOLEAN NOT NULL,
            concept VARCHAR,                   -- associated concept with the highest validation F1
            concept_val_f1 DOUBLE,             -- its validation F1 (what chose it)
            concept_f1 DOUBLE,                 -- its test F1
            description VARCHAR NOT NULL,      -- automatic, every claim with its number
            PRIMARY KEY (sae_id, latent)
        )""",
    "latent_output_effects": """
        CREATE TABLE latent_output_effects (
            sae_id VARCHAR NOT NULL,           -- causal/output_effect.py: ablating the latent on its top
            latent INTEGER NOT NULL,           -- examples, mean log p_clean(a) - log p_ablated(a) where it reads out
            effect DOUBLE[] NOT NULL,          -- 20 values, vocab.AMINO_ACIDS order; > 0: the latent promotes a
            n_examples INTEGER NOT NULL,
            n_positions INTEGER NOT NULL,      -- read-out positions averaged over
            PRIMARY KEY (sae_id, latent)
        )""",
    "latent_concepts": """
        CREATE TABLE latent_concepts (
            sae_id VARCHAR NOT NULL,           -- the reported pairs: each latent's best by validation F1, and
            latent INTEGER NOT NULL,           -- every associated pair (analysis/concepts.py)
            concept VARCHAR NOT NULL,
            level VARCHAR NOT NULL,            -- 'region' | 'residue': what recall and n_val / n_test count
            threshold REAL NOT NULL,           -- fraction of norm_max, chosen on validation
            norm_max REAL NOT NULL,            -- the latent's max over proteins outside the test split's clusters
            val_precision DOUBLE NOT NULL,
            val_recall DOUBLE NOT NULL,
            val_f1 DOUBLE NOT NULL,
            test_precision DOUBLE NOT NULL,    -- at the validation's threshold
            test_recall DOUBLE NOT NULL,
            test_f1 DOUBLE NOT NULL,
            test_f1_lo DOUBLE,                 -- bootstrap 95 % interval of test F1 (test clusters resampled)
            test_f1_hi DOUBLE,
            n_val INTEGER NOT NULL,            -- regions (residue-level: residues) of the concept in validation
            n_test INTEGER NOT NULL,           -- ... and in test
            associated BOOLEAN NOT NULL        -- val_f1 > 0.5 and test_f1 > 0.5, n_val and n_test >= 10
        )""",
    "probe_results": """
        CREATE TABLE probe_results (
            sae_id VARCHAR NOT NULL,
            task VARCHAR NOT NULL,             -- e.g. 'location'
            features VARCHAR NOT NULL,         -- '<source>_<pooling>' | 'majority'
            source VARCHAR NOT NULL,           -- 'sae' | 'raw' | 'majority' (always the training set's top class)
            pooling VARCHAR,                   -- 'mean' | 'mean_max'; NULL for the baseline
            accuracy DOUBLE NOT NULL,          -- on the held-out test proteins
            accuracy_lo DOUBLE NOT NULL,       -- 95 % bootstrap interval, test clusters resampled
            accuracy_hi DOUBLE NOT NULL,
            macro_f1 DOUBLE NOT NULL,
            n_train INTEGER NOT NULL,          -- the same rows for every fit of the task
            n_test INTEGER NOT NULL,
            n_features INTEGER NOT NULL,
            c DOUBLE,                          -- inverse L2 strength chosen by CV on the training rows only
            cv_accuracy DOUBLE,                -- that C's mean accuracy over the inner folds
            classes VARCHAR[] NOT NULL
        )""",
    "probe_comparisons": """
        CREATE TABLE probe_comparisons (
            sae_id VARCHAR NOT NULL,
            task VARCHAR NOT NULL,
            pooling VARCHAR NOT NULL,          -- SAE and raw fits compared at this same pooling
            sae_accuracy DOUBLE NOT NULL,
            raw_accuracy DOUBLE NOT NULL,
            diff DOUBLE NOT NULL,              -- SAE - raw
            diff_lo DOUBLE NOT NULL,           -- 95 % paired bootstrap interval (test clusters)
            diff_hi DOUBLE NOT NULL,
            n_sae_only INTEGER NOT NULL,       -- test proteins only the SAE probe gets right
            n_raw_only INTEGER NOT NULL,       -- ... only the raw probe gets right
            mcnemar_p DOUBLE NOT NULL          -- exact binomial test on those discordant proteins
        )""",
    "probe_latents": """
        CREATE TABLE probe_latents (
            sae_id VARCHAR NOT NULL,
            task VARCHAR NOT NULL,
            features VARCHAR NOT NULL,         -- the SAE fit: 'sae_mean' | 'sae_mean_max'
            class VARCHAR NOT NULL,
            sign VARCHAR NOT NULL,             -- 'positive' | 'negative'
            rank INTEGER NOT NULL,
            latent INTEGER NOT NULL,
            pooling VARCHAR NOT NULL,          -- 'mean' | 'max'
            weight DOUBLE NOT NULL,            -- on standardised features
            frac_class DOUBLE,                 -- share of the class's test proteins the latent is active on
            frac_rest DOUBLE                   -- ... of the other classes' test proteins
        )""",
    "analysis_summary": """
        CREATE TABLE analysis_summary (
            sae_id VARCHAR PRIMARY KEY,
            summary JSON NOT NULL              -- counts per category, concepts covered, settings, timing
        )""",
    "concept_sources": """
        CREATE TABLE concept_sources (
            sae_id VARCHAR NOT NULL,           -- every concept of the corpus, as one SAE's association saw it
            concept VARCHAR NOT NULL,
            level VARCHAR NOT NULL,            -- 'region' | 'residue': what n_val / n_test count
            sources JSON NOT NULL,             -- {source: regions}: 'UniProt features', 'Pfam domains', 'NLS motifs', 'DSSP', 'CA rule'
            n_proteins INTEGER NOT NULL,       -- corpus proteins with the concept
            n_regions INTEGER NOT NULL,        -- its regions in the corpus
            n_val INTEGER NOT NULL,            -- regions (residue-level: residues) among the validation proteins
            n_test INTEGER NOT NULL,           -- ... among the test proteins
            scored BOOLEAN NOT NULL,           -- present in both splits
            tested BOOLEAN NOT NULL,           -- >= 10 in each split: can be associated
            n_associated_latents INTEGER NOT NULL
        )""",
    # ---- written by `plmscope analyze` over all analysed SAEs (analysis/findings.py) ----
    "findings": """
        CREATE TABLE findings (
            claim VARCHAR PRIMARY KEY,         -- 'family_middle' | 'point_later' | 'nls_probe' | ...
            position INTEGER NOT NULL,         -- display order
            statement VARCHAR NOT NULL,        -- the paper's claim
            test VARCHAR NOT NULL,             -- how it is tested here
            metric VARCHAR NOT NULL,           -- what the values are
            verdict VARCHAR NOT NULL,          -- 'reproduced' | 'not reproduced' | 'not enough evidence' | 'measured' | 'not tested'
            reason VARCHAR NOT NULL,           -- the numbers that decided it
            details JSON NOT NULL              -- test statistics, base rates, sweep rows
        )""",
    "finding_values": """
        CREATE TABLE finding_values (
            claim VARCHAR NOT NULL,
            series VARCHAR NOT NULL,           -- e.g. 'family-specific', 'helix'
            layer INTEGER NOT NULL,
            value DOUBLE,                      -- NULL: nothing to measure in this layer
            lo DOUBLE,                         -- 95 % interval
            hi DOUBLE,
            k BIGINT,                          -- count behind a share (secondary structure: associated latents)
            n BIGINT,                          -- its denominator
            sae_ids VARCHAR[] NOT NULL         -- the layer's analysed SAEs (pooled)
        )""",
}

# Written by `plmscope analyze`, per SAE; empty in a freshly built atlas.
ANALYSIS_TABLES = ("latent_analysis", "latent_concepts", "probe_results", "probe_comparisons", "probe_latents",
                   "analysis_summary", "latent_output_effects")
# Added after schema 2 was published: analyze creates them in an atlas that lacks them, and the
# page shows what they hold when they are there.
LATER_ANALYSIS_TABLES = ("concept_sources", "findings", "finding_values")

# The web app's point lookups.  protein_latent_stats has none: it is only read whole, per SAE (by
# the analysis), and an ART index over its rows (13M at 20k proteins) was the writer's largest
# allocation.
INDEXES: list[str] = [
    "CREATE INDEX idx_annotations_acc ON annotations (accession)",
    "CREATE INDEX idx_examples ON latent_examples (sae_id, latent)",
    "CREATE INDEX idx_protein_latents ON protein_latents (sae_id, accession)",
    "CREATE INDEX idx_structures_acc ON structures (accession)",
    "CREATE INDEX idx_structure_residues ON structure_residues (structure_id)",
]


def create_all(con) -> None:
    """Create every table and index on an empty DuckDB connection."""
    for ddl in TABLES.values():
        con.execute(ddl)
    for ddl in INDEXES:
        con.execute(ddl)
