"""The README's Python API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["positions"].shape[-1] == 3
    assert namespace["embeddings"]["transformer_embeddings"].shape[1] == 32
    imputed = namespace["imputed"]
    assert imputed.shape[1] == 30 and imputed.var["alphastomics_imputed"].sum() == 10
    tissue = namespace["tissue"]
    assert tissue.obs["slice"].value_counts().to_dict() == {"slice_2": 150, "slice_3": 150}
    assert tissue.obsm["spatial"].shape == (300, 3)
