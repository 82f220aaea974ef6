import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanformers.storage.factorize import (
    normalize_form,
    pifa_from_factors,
    pifa_from_weight,
    pifa_to_dense,
    pivot_indices,
)
from leanformers.storage.rank import pifa_num_params
from tests.helpers import rel_error


@st.composite
def factor_shapes(draw):
    m = draw(st.integers(1, 96))
    n = draw(st.integers(1, 96))
    r = draw(st.integers(1, min(m, n)))
    return m, n, r


@settings(max_examples=60, deadline=None)
@given(shape=factor_shapes(), form=st.sampled_from(["row", "column"]), seed=st.integers(0, 2**16))
def test_pifa_from_factors_is_exact_in_fp32(shape, form, seed):
    m, n, r = shape
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    f = pifa_from_factors(U, V, form=form)
    W = U.double() @ V.double()
    assert f.shape == (m, n) and f.rank == r and f.form == form
    assert rel_error(pifa_to_dense(f), W) <= 1e-5  # acceptance #5
    # stored count r(m + n) - r^2; indices int32, sorted, a partition of the rows/columns
    assert f.pivot_weight.numel() + f.coeff.numel() == pifa_num_params(m, n, r)
    d = m if form == "row" else n
    assert f.pivots.dtype == torch.int32 and f.nonpivots.dtype == torch.int32
    assert torch.equal(
        torch.sort(torch.cat([f.pivots, f.nonpivots])).values, torch.arange(d, dtype=torch.int32)
    )
    assert torch.equal(f.pivots, torch.sort(f.pivots).values)
    expected_b = (W[f.pivots.long()] if form == "row" else W[:, f.pivots.long()]).float()
    assert torch.allclose(f.pivot_weight, expected_b, rtol=1e-4, atol=1e-4 * float(W.abs().max()))


@pytest.mark.parametrize("m,n,r", [(256, 128, 64), (128, 384, 96), (200, 200, 150)])
def test_scipy_and_torch_pivoting_agree(m, n, r):
    g = torch.Generator().manual_seed(1)
    U, V = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    for form in ("row", "column"):
        a = pifa_from_factors(U, V, form, method="scipy")
        b = pifa_from_factors(U, V, form, method="torch")
        assert torch.equal(a.pivots, b.pivots)
        assert rel_error(pifa_to_dense(b), U.double() @ V.double()) <= 1e-5


def test_pivots_avoid_dependent_rows():
    # rows 0..3 are copies of row 4: pivoting must not pick two of them
    g = torch.Generator().manual_seed(2)
    U = torch.randn(12, 3, generator=g)
    U[:4] = U[4]
    piv = pivot_indices(U.T.double(), 3)
    assert len(set(piv.tolist()) & {0, 1, 2, 3, 4}) <= 1
    f = pifa_from_factors(U, torch.randn(3, 7, generator=g), "row")
    assert torch.isfinite(f.coeff).all()


def test_full_rank_stores_the_weight_itself():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 40, generator=g)
    f = pifa_from_weight(W, 16, form="row")
    assert torch.equal(f.pivots, torch.arange(16, dtype=torch.int32)) and f.coeff.shape == (0, 16)
    assert rel_error(f.pivot_weight, W) < 1e-6
    fc = pifa_from_weight(W.T.contiguous(), 16, form="column")
    assert torch.equal(fc.pivots, torch.arange(16, dtype=torch.int32)) and fc.coeff.shape == (16, 0)


def test_pifa_from_weight_is_the_truncated_svd():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(48, 32, generator=g, dtype=torch.float64)
    f = pifa_from_weight(W, 10, form="column")
    u, s, vh = torch.linalg.svd(W)
    best = (u[:, :10] * s[:10]) @ vh[:10]
    assert rel_error(pifa_to_dense(f), best) < 1e-10


def test_dtype_follows_the_factors():
    U, V = torch.randn(20, 4, dtype=torch.bfloat16), torch.randn(4, 30, dtype=torch.bfloat16)
    f = pifa_from_factors(U, V, "row")
    assert f.pivot_weight.dtype == torch.bfloat16 and f.coeff.dtype == torch.bfloat16
    assert pifa_to_dense(f).dtype == torch.bfloat16


def test_form_alias_and_errors():
    assert normalize_form("col") == "column"
    with pytest.raises(ValueError, match="form must be 'row' or 'column'"):
        pifa_from_factors(torch.randn(4, 2), torch.randn(2, 4), form="diagonal")
    with pytest.raises(ValueError, match="expected U \\(m, r\\) and V \\(r, n\\)"):
        pifa_from_factors(torch.randn(4, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="must be in \\[1, min\\(m, n\\)"):
        pifa_from_factors(torch.randn(4, 5), torch.randn(5, 8))
    with pytest.raises(ValueError, match="must be finite"):
        pifa_from_factors(torch.full((4, 2), float("nan")), torch.randn(2, 4))
    U = torch.randn(6, 3)
    U[:, 2] = U[:, 1]  # rank 2 factors pretending to be rank 3
    with pytest.raises(ValueError, match="rank deficient"):
        pifa_from_factors(U, torch.randn(3, 5), "row")
    with pytest.raises(ValueError, match="rank must be in"):
        pifa_from_weight(torch.randn(4, 4), 5)
    with pytest.raises(ValueError, match="method must be"):
        pivot_indices(torch.randn(3, 5), 2, method="magic")
