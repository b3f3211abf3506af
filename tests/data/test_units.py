"""alphastomics.data.units: positions back to the user's coordinates."""

import numpy as np

from alphastomics.data.units import to_user_units


def test_user_units_keep_the_precision_of_a_large_offset():
    # 300 cells within one unit of a 1e9 offset: float32 keeps about 10 distinct x values
    scaled = np.random.default_rng(0).uniform(-1, 1, size=(300, 3)).astype(np.float32)
    user = to_user_units(scaled, np.array([1e9, 2e9, 0.0]), 0.5, 2)
    assert user.dtype == np.float64 and user.shape == (300, 2)  # z of a 2D slice dropped
    assert len(np.unique(user[:, 0])) == 300
    np.testing.assert_allclose(user[:, 0] - 1e9, scaled[:, 0] * 0.5, atol=1e-6)
    assert len(np.unique(user[:, 0].astype(np.float32))) < 30
