import numpy as np

from mpilayer.io.tile_accumulators import TileAccumulators


def test_spill_and_reload_keep_every_sum(tmp_path):
    shape, tile = (50, 70), (16, 32)
    acc = TileAccumulators(budget=3 * 16 * 32 * 8, scratch_path=str(tmp_path / "s.h5"), shape=shape, tile_shape=tile)
    rng = np.random.default_rng(0)
    expected = {}
    tiles = [(i, j) for i in range(4) for j in range(3)]
    for _ in range(3):
        for t in tiles:
            rows = min(tile[0], shape[0] - t[0] * tile[0])
            cols = min(tile[1], shape[1] - t[1] * tile[1])
            inc = rng.integers(-1000, 1000, (rows, cols))
            expected[t] = expected.get(t, 0) + inc
            np.testing.assert_array_equal(acc.add(t, inc.copy()), expected[t])
            assert acc.nbytes <= acc.budget or len(acc._memory) == 1
    assert acc.spills > 0
    acc.close()
    assert not (tmp_path / "s.h5").exists()
