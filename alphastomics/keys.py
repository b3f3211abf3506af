"""Every AnnData key the package reads by default or writes, defined once.

Inputs are read from the keys a user names (``--position_key``, ``--slice_key``, …); these are
their defaults. Outputs are always written under the ``alphastomics`` names below, so a notebook
can find them without reading the code that wrote them.
"""

from __future__ import annotations

# Inputs: defaults of the keys a user can name.
POSITION_KEY = "ccf"  # adata.obsm: registered coordinates (N, 2) or (N, 3)
SLICE_KEY = "slice"  # adata.obs: the slice each cell belongs to
CELL_TYPE_KEY = "cell_type"  # adata.obs: cell-type labels (the synthetic tissue writes them)

# Outputs of `sample`, `extract` and the Python API.
POSITIONS = "alphastomics_positions"  # obsm: placed positions in the input's units (expr_to_pos)
POSITION_SPREAD = "alphastomics_position_spread"  # obs: per-cell spread of several placements
EXPRESSION = "alphastomics_expression"  # layers: predicted or imputed expression
EXPRESSION_STD = "alphastomics_expression_std"  # layers: spread of several draws
IMPUTED = "alphastomics_imputed"  # var: True for the genes that were imputed
GENERATED_POSITIONS = "spatial"  # obsm of a generated (joint) tissue
PREDICTED_CELL_TYPE = "alphastomics_predicted_cell_type"  # obs of a generated tissue
DENOISED_EXPRESSION = "alphastomics_denoised"  # layers of a generated tissue: expression states
REFERENCE_SLICE = "alphastomics_reference_slice"  # obs of a generated tissue
EMBEDDING = "X_alphastomics"  # obsm: cell embeddings (extract)
EMBEDDING_INFO = "alphastomics_embedding"  # uns: how the embeddings were made
UNS = "alphastomics"  # uns: what was done (mode, steps, sampler, seed, checkpoint, version)
