import numpy as np
import pytest
import torch

from alphastomics.data.batch import DataHolder, center, collate_holders, masked_mean


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)


def test_center_zero_masked_centroid_and_zero_padding():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(2, 5, 3, generator=gen) + 10
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = center(pos, mask)
    assert torch.allclose(masked_mean(out, mask), torch.zeros(2, 3), atol=1e-5)
    assert torch.all(out[1, 3:] == 0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="shape mismatch"):
        DataHolder(
            expression=torch.zeros(1, 4, 2),
            positions=torch.zeros(1, 5, 3),
            node_mask=torch.ones(1, 4),
        )


def test_collate_pads_with_zeros_and_false():
    a = DataHolder.from_arrays(
        np.ones((3, 2)), np.ones((3, 3)), cell_type=np.array([0, 1, 2]), slice_index=0
    )
    b = DataHolder.from_arrays(
        np.ones((5, 2)), np.ones((5, 3)), cell_type=np.array([1] * 5), slice_index=1
    )
    batch = collate_holders([a, b])
    assert batch.expression.shape == (2, 5, 2)
    assert batch.node_mask[0].tolist() == [True, True, True, False, False]
    assert torch.all(batch.expression[0, 3:] == 0)
    assert batch.cell_type[0, 3:].tolist() == [-1, -1]
    assert batch.slice_index.tolist() == [0, 1]
    assert batch.gene_mask.shape == (2, 2)


def test_replace_and_to_make_copies():
    h = DataHolder.from_arrays(np.zeros((2, 2)), np.zeros((2, 3)))
    h2 = h.replace(expression=torch.ones(1, 2, 2))
    assert torch.all(h.expression == 0)
    assert torch.all(h2.expression == 1)
    assert h.to("cpu").expression.device.type == "cpu"
