from hypothesis import given
from hypothesis import strategies as st

from mpilayer.core.partition import TileGrid, block_slices, default_tile


@given(n=st.integers(0, 5000), size=st.integers(1, 700))
def test_blocks_cover_without_overlap(n, size):
    blocks = block_slices(n, size)
    covered = [i for s in blocks for i in range(s.start, s.stop)]
    assert covered == list(range(n))
    assert all(0 < s.stop - s.start <= size for s in blocks if n)


@given(m=st.integers(1, 10**6), n=st.integers(1, 10**6), k=st.integers(1, 10**7),
       itemsize=st.sampled_from([1, 2]), memory=st.integers(32 * 2**20, 2**35))
def test_default_tile_fits_the_budget(m, n, k, itemsize, memory):
    tr, tc, kp = default_tile(m, n, k, itemsize, memory)
    assert 1 <= tr <= max(m, 1) and 1 <= tc <= max(n, 1) and 1 <= kp <= k
    footprint = 4 * itemsize * (tr + tc) * kp
    if kp < k:  # cut along k: to the budget, or to the smallest panel (64) when even that is over
        assert footprint <= memory // 16 or kp == 64
        assert kp % 64 == 0
    else:       # the whole of k: only when it fits
        assert footprint <= memory // 16 or k <= 64


def test_grid_tiles():
    grid = TileGrid(1000, 700, 300, 256, 512, 128)
    assert grid.shape == (4, 2) and len(grid.tiles()) == 8 and len(grid.k_panels) == 3
