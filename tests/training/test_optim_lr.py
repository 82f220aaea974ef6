import pytest
import torch

from leanformers.training import LRRewarmup, check_optimizer, mask_state_, reset_state, seeded_generator


def _stepped(opt_cls, **kw):
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = opt_cls([p], lr=0.1, **kw)
    p.grad = torch.ones_like(p)
    opt.step()
    return p, opt


@pytest.mark.parametrize(
    "cls,kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, {}), (torch.optim.SGD, {"momentum": 0.9})]
)
def test_reset_rows_and_mask(cls, kw):
    p, opt = _stepped(cls, **kw)
    reset_state(opt, p, torch.tensor([1, 3]))
    for key, buf in opt.state[p].items():
        if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
            assert buf[[1, 3]].abs().sum() == 0 and buf[[0, 2]].abs().sum() > 0, key
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[0, 0] = True
    mask_state_(opt, p, mask)
    for buf in opt.state[p].values():
        if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
            assert (buf[~mask] == 0).all()
    reset_state(opt, p)
    assert p not in opt.state


def test_unsupported_optimizer_is_refused():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="Adagrad is not supported.*Use torch.optim.Adam, AdamW or SGD"):
        check_optimizer(torch.optim.Adagrad([p]))
    assert check_optimizer(torch.optim.AdamW([p])) == "adam"


def test_rewarmup_scales_only_the_step_and_leaves_the_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    warm = LRRewarmup(opt)
    warm.restart(3)
    moves = []
    for _ in range(5):
        before = p.detach().clone()
        p.grad = torch.ones(1)
        opt.step()
        moves.append((before - p.detach()).item())
        assert opt.param_groups[0]["lr"] == 1.0
    assert moves == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert warm.state_dict() == {"num_steps": 3, "steps_done": 3}


def test_seeded_generator_depends_only_on_keys():
    a = torch.rand(3, generator=seeded_generator(0, 5, "layer.0"))
    b = torch.rand(3, generator=seeded_generator(0, 5, "layer.0"))
    c = torch.rand(3, generator=seeded_generator(0, 6, "layer.0"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_checkpoint_state_round_trip(tmp_path):
    from leanformers.training import load_state, save_state

    assert load_state(tmp_path, "x") is None
    save_state(tmp_path, "x", {"mask": torch.tensor([True, False]), "idx": torch.arange(3)}, {"step": 7})
    tensors, meta = load_state(tmp_path, "x")
    assert meta == {"step": 7} and torch.equal(tensors["idx"], torch.arange(3))
    assert not list((tmp_path / "leanformers").glob("*.tmp"))
