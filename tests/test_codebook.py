"""SimVQ code tables: release state-dict layout, exact effective table, nearest-code search, round trips."""
import pytest
import torch

from illume_edge.config import preset
from illume_edge.errors import CheckpointError
from illume_edge.export import codebook
from illume_edge.export.codebook import SimVQ


def _quantizer(n=512, dim=8, seed=0) -> SimVQ:
    torch.manual_seed(seed)
    q = SimVQ(n, dim)
    torch.nn.init.normal_(q.code_transform.weight, std=0.5)  # a non-trivial transform
    return q


def _brute_force(z: torch.Tensor, table: torch.Tensor):
    """(indices [B,h,w], sorted squared distances [B,h,w,N]) by explicit differences, in float64."""
    x = z.permute(0, 2, 3, 1).double()  # [B, h, w, dim]
    d2 = ((x[..., None, :] - table.double()) ** 2).sum(-1)  # [B, h, w, N]
    return d2.argmin(-1), d2.sort(-1).values


def test_state_dict_matches_release_layout():
    q = SimVQ(40, 8)
    sd = q.state_dict()
    assert set(sd) == {"frozen_codebook", "code_transform.weight"}
    assert tuple(sd["frozen_codebook"].shape) == (40, 8)
    assert tuple(sd["code_transform.weight"].shape) == (8, 8)
    assert "frozen_codebook" in dict(q.named_buffers())  # a buffer, as the release registers it
    assert [n for n, _ in q.named_parameters()] == ["code_transform.weight"]  # no bias


def test_preset_levels_build():
    cfg = preset("tiny-plus")
    for lv in cfg.levels:
        q = SimVQ(lv.codebook_size, lv.code_dim)
        assert tuple(q.effective_table().shape) == (lv.codebook_size, lv.code_dim)


def test_effective_table_is_transform_of_frozen_codebook():
    q = _quantizer()
    expected = q.frozen_codebook.double() @ q.code_transform.weight.double().T
    assert torch.allclose(q.effective_table().double(), expected, atol=1e-6, rtol=0)


def test_indices_to_codes_matches_release_formula():
    q = _quantizer()
    idx = torch.randint(0, 512, (2, 3, 5))
    release = q.code_transform(q.frozen_codebook[idx]).permute(0, 3, 1, 2)  # gather, then Linear, channel first
    got = q.indices_to_codes(idx)
    assert got.shape == (2, 8, 3, 5)
    assert (got - release).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 3, 3)])
def test_quantize_matches_brute_force(shape):
    q = _quantizer()
    b, h, w = shape
    z = torch.randn(b, 8, h, w)
    got = q.quantize(z)
    assert got.shape == (b, h, w) and got.dtype == torch.int64
    ref, d2 = _brute_force(z, q.effective_table().detach())
    chosen = ((z.permute(0, 2, 3, 1).double() - q.effective_table().detach().double()[got]) ** 2).sum(-1)
    assert (chosen - d2[..., 0]).abs().max().item() <= 1e-4  # always a nearest code (up to cdist rounding)
    clear = (d2[..., 1] - d2[..., 0]) > 1e-3  # no near-tie: the index itself must agree
    assert clear.sum() > 0.9 * clear.numel()
    assert torch.equal(got[clear], ref[clear])


@pytest.mark.parametrize("shape", [(2, 4, 6), (1, 9, 9)])
def test_round_trip_codes_quantize_to_their_indices(shape):
    q = _quantizer()
    idx = torch.randint(0, 512, shape)
    codes = q.indices_to_codes(idx)  # every position sits exactly on its code
    assert torch.equal(q.quantize(codes), idx)


def test_blockwise_search_matches_single_pass(monkeypatch):
    q = _quantizer(n=500)
    z = torch.randn(2, 8, 4, 5)
    whole = q.quantize(z)
    monkeypatch.setattr(codebook, "SEARCH_BLOCK", 64)  # 8 blocks, the last one partial
    assert torch.equal(q.quantize(z), whole)


def test_blockwise_tie_keeps_earlier_block(monkeypatch):
    """The release stacks per-block minima and takes the first minimum: a duplicate code in a later block loses."""
    q = SimVQ(8, 4)
    with torch.no_grad():
        q.code_transform.weight.copy_(torch.eye(4))
        q.frozen_codebook.copy_(torch.randn(8, 4) * 5)
        q.frozen_codebook[6] = q.frozen_codebook[1]
    monkeypatch.setattr(codebook, "SEARCH_BLOCK", 4)
    z = q.frozen_codebook[1].view(1, 4, 1, 1)
    assert q.quantize(z).item() == 1


def test_large_codebook_uses_release_block_size():
    """> 32,768 codes: searched in release-sized blocks; still the global nearest neighbour."""
    q = _quantizer(n=codebook.SEARCH_BLOCK + 1000, dim=4, seed=1)
    table = q.effective_table().detach()
    idx = torch.tensor([[[5, codebook.SEARCH_BLOCK + 17]]])  # one code from each block
    assert torch.equal(q.quantize(q.indices_to_codes(idx)), idx)
    z = torch.randn(1, 4, 2, 3)
    got = q.quantize(z)
    ref, d2 = _brute_force(z, table)
    chosen = ((z.permute(0, 2, 3, 1).double() - table.double()[got]) ** 2).sum(-1)
    assert (chosen - d2[..., 0]).abs().max().item() <= 1e-4


def test_bad_inputs_fail_clearly():
    q = _quantizer()
    with pytest.raises(ValueError, match=r"\[B, 8, h, w\]"):
        q.quantize(torch.randn(1, 7, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        q.indices_to_codes(torch.tensor([[[512]]]))
    with pytest.raises(ValueError, match="integer indices"):
        q.indices_to_codes(torch.zeros(1, 2, 2))


def test_from_state_dict_strict():
    q = _quantizer(n=64)
    sd = {f"semantic_quantizer.{k}": v for k, v in q.state_dict().items()}
    sd["pixel_decoder.conv.weight"] = torch.zeros(1)  # other modules' keys are not this loader's business
    loaded = SimVQ.from_state_dict(sd, "semantic_quantizer", codebook_size=64, dim=8)
    assert torch.equal(loaded.effective_table(), q.effective_table())

    with pytest.raises(CheckpointError, match=r"semantic_quantizer.frozen_codebook.*\(32, 8\)"):
        SimVQ.from_state_dict(sd, "semantic_quantizer", codebook_size=32, dim=8)
    missing = {k: v for k, v in sd.items() if not k.endswith("code_transform.weight")}
    with pytest.raises(CheckpointError, match="missing key.*code_transform.weight"):
        SimVQ.from_state_dict(missing, "semantic_quantizer")
    extra = dict(sd, **{"semantic_quantizer.code_transform.bias": torch.zeros(8)})
    with pytest.raises(CheckpointError, match="unexpected key.*code_transform.bias"):
        SimVQ.from_state_dict(extra, "semantic_quantizer")
