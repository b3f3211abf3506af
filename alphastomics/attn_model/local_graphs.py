"""Where local attention finds each cell's neighbours: the names ``model.local_graph`` takes.

Defined once, torch-free (the config reads them without loading the network): the config
schema, the denoiser's check and the train log's wording all come from here.
"""

from __future__ import annotations

from typing import Literal, get_args

LocalGraph = Literal["positions", "expression", "cleaner"]
LOCAL_GRAPHS: tuple[str, ...] = get_args(LocalGraph)

# what each graph makes a cell read, as the train log says it
LOCAL_GRAPH_WORDS: dict[str, str] = {
    "positions": "the nearest in the current positions",
    "expression": (
        "the most similar in the current expression (items whose positions are less noisy "
        "read none)"
    ),
    "cleaner": (
        "in whichever modality is less noisy: the most similar in expression in expr_to_pos, "
        "the nearest in positions in pos_to_expr"
    ),
}
