"""CHTssController in a plain PyTorch loop: exact counts, exact zeros, moments, schedule, resume, errors."""

from __future__ import annotations

import pytest
import torch

from leanformers.chts import DEFAULT_TARGETS, CHTssConfig, CHTssController
from leanformers.chts.masks import find_sparse_layers
from leanformers.chts.mlp import MLP_TARGETS, MLPClassifier
from leanformers.chts.schedules import density_at, num_updates
from leanformers.chts.topology import link_count
from leanformers.training import load_state, save_state
from tests.tiny_models import random_ids, tiny_llama

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def llama_batch(step: int):
    ids = random_ids(batch=2, seqlen=12, seed=step)
    return {"input_ids": ids, "labels": ids}


def make_optimizer(kind: str, params):
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def expected_count(layer_shape, cfg: CHTssConfig, step: int, total_steps: int) -> int:
    total = num_updates(total_steps, cfg.update_interval, cfg.topology_end)
    u = min(step // cfg.update_interval, total) if cfg.update_interval else 0
    return link_count(
        layer_shape, density_at(u, total, cfg.initial_density, cfg.final_density, cfg.density_schedule)
    )


@pytest.mark.parametrize("opt_kind", ["adam", "adamw", "sgd"])
def test_exact_counts_zero_weights_and_moments_after_every_step(opt_kind):
    total_steps = 16
    model = tiny_llama()
    opt = make_optimizer(opt_kind, model.parameters())
    cfg = CHTssConfig(final_density=0.3, initial_density=0.6, update_interval=2, zeta=0.3, balance_heads=True)
    sched = CHTssController(model, opt, cfg, total_steps=total_steps)
    updates = 0
    for step in range(1, total_steps + 1):
        model(**llama_batch(step)).loss.backward()
        for layer in sched.layers:  # the hook masks gradients before clipping / reduction
            assert (layer.logical(layer.weight.grad)[~layer.mask] == 0).all()
        opt.step()
        before = {layer.name: layer.mask.clone() for layer in sched.layers}
        metrics = sched.step()
        opt.zero_grad()
        updates += metrics is not None
        for layer in sched.layers:
            mask = layer.mask
            assert int(mask.sum()) == expected_count(layer.shape, cfg, step, total_steps), (layer.name, step)
            w = layer.logical(layer.weight.data)
            assert (w[~mask] == 0).all()  # masked weights are exactly 0
            state = opt.state[layer.weight]
            grown = mask & ~before[layer.name]
            removed = before[layer.name] & ~mask
            for key in MOMENTS:
                if key in state:
                    buf = layer.logical(state[key])
                    assert (buf[~mask] == 0).all() and (buf[removed] == 0).all()
                    assert (buf[grown] == 0).all()  # new links start with zero moments
            assert (w[grown] == 0).all()  # ... and at weight 0
            if layer.groups > 1:  # per-head balance (GQA aware)
                counts = layer.to_groups(mask).sum(1)
                assert int(counts.max() - counts.min()) <= 1
    assert updates == num_updates(total_steps, 2, 0.75) == 6
    assert sched.metrics()["chtss/density_sparse_subset"] == pytest.approx(0.3, abs=1e-3)


def test_mlp_at_one_percent_with_chain_removal_keeps_exact_counts():
    torch.manual_seed(0)
    model = MLPClassifier((784, 256, 256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, weight_decay=5e-4)
    cfg = CHTssConfig.for_method(
        "chts",
        final_density=0.01,
        targets=MLP_TARGETS,
        exclude=(),
        zeta=0.3,
        update_interval=3,
        chain_removal=True,
        temperature_end=3.0,
        init_topology="brf",
        sparse_init=True,
    )
    sched = CHTssController(model, opt, cfg, total_steps=24)
    g = torch.Generator().manual_seed(0)
    for _ in range(24):
        x = torch.randn(16, 784, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        model(x, y)["loss"].backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        for layer in sched.layers:
            assert int(layer.mask.sum()) == link_count(layer.shape, 0.01)
    hist = sched.history
    assert len(hist) == 6
    assert sum(h["chtss/chain_removed"] for h in hist) > 0  # dead neurons appear at 1 % and are pruned
    assert hist[-1]["chtss/active_neurons_mean"] < 1.0


def test_rigl_regrows_the_largest_dense_gradients():
    model = MLPClassifier((32, 24, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = CHTssConfig.for_method(
        "rigl", final_density=0.2, targets=MLP_TARGETS, exclude=(), update_interval=1, zeta=0.3
    )
    sched = CHTssController(model, opt, cfg, total_steps=8)
    x, y = torch.randn(8, 32), torch.randint(0, 8, (8,))
    model(x, y)["loss"].backward()
    dense = {
        i: sched.gradients.dense(i).clone() for i in range(len(sched.layers))
    }  # collected by the hook, unmasked
    assert dense and all((g != 0).sum() > (sched.layers[i].mask.sum()) for i, g in dense.items())
    opt.step()
    before = [layer.mask.clone() for layer in sched.layers]
    metrics = sched.step()
    assert metrics["chtss/filled_uniform"] == 0
    for i, layer in enumerate(sched.layers):
        grown = layer.mask & ~before[i]
        kept = layer.mask & before[i]
        others = ~layer.mask & ~kept
        assert grown.any()
        assert dense[i].abs()[grown].min() >= dense[i].abs()[others & ~before[i]].max()


def test_rewarmup_restarts_after_each_update():
    model = MLPClassifier((16, 12, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = CHTssConfig.for_method(
        "set", final_density=0.5, targets=MLP_TARGETS, exclude=(), update_interval=2, rewarmup_steps=3
    )
    sched = CHTssController(model, opt, cfg, total_steps=8)
    lrs = []
    opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
    for _ in range(4):
        model(torch.randn(4, 16), torch.randint(0, 4, (4,)))["loss"].backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    # Update after step 2: steps 3 and 4 run at 1/4 and 2/4 of the LR (pre-hooks run in order).
    assert lrs[2] == pytest.approx(0.025) and lrs[3] == pytest.approx(0.05)
    assert opt.param_groups[0]["lr"] == 0.1


def run_loop(model, opt, sched, start: int, stop: int):
    for step in range(start + 1, stop + 1):
        model(**llama_batch(step)).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


@pytest.mark.parametrize("method", ["chtss", "rigl"])
def test_resume_from_halfway_is_bit_identical(tmp_path, method):
    cfg = CHTssConfig.for_method(method, final_density=0.3, update_interval=2, zeta=0.2, rewarmup_steps=2)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = CHTssController(model, opt, cfg, total_steps=16)
    run_loop(model, opt, sched, 0, 16)

    model_a = tiny_llama()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    sched_a = CHTssController(model_a, opt_a, cfg, total_steps=16)
    run_loop(model_a, opt_a, sched_a, 0, 8)
    save_state(tmp_path, "chtss", *sched_a.state_dict())
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt")
    model_b = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(ckpt["model"])
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    opt_b.load_state_dict(ckpt["opt"])
    sched_b = CHTssController(model_b, opt_b, cfg, total_steps=16, init_masks=False)
    sched_b.load_state_dict(*load_state(tmp_path, "chtss"))
    run_loop(model_b, opt_b, sched_b, 8, 16)

    for (name, p), q in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name
    for a, b in zip(sched.masks.values(), sched_b.masks.values()):
        assert torch.equal(a, b)


def test_unsupported_optimizer_is_refused_clearly():
    model = MLPClassifier((8, 4, 2))
    cfg = CHTssConfig(final_density=0.5, initial_density=None, targets=MLP_TARGETS, exclude=())
    with pytest.raises(ValueError, match=r"RMSprop is not supported.*Adam, AdamW or SGD"):
        CHTssController(model, torch.optim.RMSprop(model.parameters()), cfg)
    from transformers.optimization import Adafactor

    with pytest.raises(ValueError, match=r"Adafactor is not supported"):
        CHTssController(model, Adafactor(model.parameters(), lr=1e-3, relative_step=False), cfg)


def test_chtss_without_any_update_in_the_window_fails_clearly():
    model = MLPClassifier((8, 4, 2))
    cfg = CHTssConfig(
        final_density=0.2, initial_density=0.5, targets=MLP_TARGETS, exclude=(), update_interval=100
    )
    sched = CHTssController(model, None, cfg, total_steps=50)
    with pytest.raises(ValueError, match="needs at least one topology update.*Lower update_interval"):
        sched.check_schedule()


def test_static_sparse_never_rewires_and_llama_layers_match_find():
    model = tiny_llama()
    cfg = CHTssConfig.for_method("static", final_density=0.3)
    sched = CHTssController(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, total_steps=10)
    before = {k: v.clone() for k, v in sched.masks.items()}
    run_loop(model, sched.optimizer, sched, 0, 4)
    assert all(torch.equal(before[k], v) for k, v in sched.masks.items())
    assert [lay.name for lay in sched.layers] == [
        lay.name for lay in find_sparse_layers(model, cfg.targets, cfg.exclude)
    ]


@pytest.mark.parametrize(
    "initial,final,interval,total_steps,kind",
    [
        (0.5, 0.3, 3, 40, "sigmoid"),
        (0.5, 0.01, 1, 30, "sigmoid"),
        (0.9, 0.2, 4, 50, "cubic"),
        (0.6, 0.6, 5, 30, "linear"),
    ],
)
def test_masks_follow_the_schedule_to_exactly_the_final_density(initial, final, interval, total_steps, kind):
    model = MLPClassifier((40, 30, 20))
    cfg = CHTssConfig(
        final_density=final,
        initial_density=initial,
        targets=MLP_TARGETS,
        exclude=(),
        update_interval=interval,
        density_schedule=kind,
        zeta=0.2,
    )
    sched = CHTssController(model, None, cfg, total_steps=total_steps)
    sched.check_schedule()
    assert all(int(lay.mask.sum()) == link_count(lay.shape, initial) for lay in sched.layers)
    densities = []
    for _ in range(total_steps):  # topology only: no gradients needed
        if sched.step() is not None:
            densities.append(sched.metrics()["chtss/density_sparse_subset"])
    assert len(densities) == num_updates(total_steps, interval, 0.75)
    assert all(a >= b for a, b in zip(densities[:-1], densities[1:]))
    assert all(int(lay.mask.sum()) == link_count(lay.shape, final) for lay in sched.layers)


def test_gpt2_conv1d_layers_train_sparse():
    from tests.tiny_models import tiny_gpt2

    model = tiny_gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = CHTssConfig(
        final_density=0.3, initial_density=0.5, targets=(r"(c_attn|c_fc|c_proj)$",), update_interval=2
    )
    sched = CHTssController(model, opt, cfg, total_steps=8)
    assert all(layer.transposed for layer in sched.layers)
    run_loop(model, opt, sched, 0, 8)
    for layer in sched.layers:
        assert int(layer.mask.sum()) == link_count(layer.shape, 0.3)
        assert (layer.weight.data.T[~layer.mask] == 0).all()  # Conv1D weight is (in, out)
        assert (opt.state[layer.weight]["exp_avg"].T[~layer.mask] == 0).all()


def _held_tensors(obj, seen=None):
    """Tensors an object holds through its attributes, dicts and lists (model modules excluded)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    children = (
        obj.values()
        if isinstance(obj, dict)
        else obj
        if isinstance(obj, (list, tuple))
        else vars(obj).values()
        if hasattr(obj, "__dict__")
        else ()
    )
    return [t for child in children for t in _held_tensors(child, seen)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_kind", ["llama", "gpt2"])
def test_one_compact_mask_per_matrix_and_no_copy_in_the_weight_dtype(dtype, model_kind):
    # Issue 7: a bool mask plus a float copy was 5 bytes per weight at fp32 (~6 GB at 1B parameters).
    from tests.tiny_models import tiny_gpt2

    model = (tiny_llama() if model_kind == "llama" else tiny_gpt2()).to(dtype)
    targets = DEFAULT_TARGETS if model_kind == "llama" else (r"(c_attn|c_fc|c_proj)$",)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = CHTssConfig(final_density=0.3, initial_density=0.5, targets=targets, update_interval=2)
    sched = CHTssController(model, opt, cfg, total_steps=8)
    run_loop(model, opt, sched, 0, 3)  # one update, moments exist
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for layer in sched.layers:
        held = {
            t.untyped_storage().data_ptr(): t
            for t in _held_tensors(layer)
            if t.untyped_storage().data_ptr() not in params
        }
        assert len(held) == 1, (layer.name, [(t.dtype, tuple(t.shape)) for t in held.values()])
        (mask,) = held.values()
        assert mask.dtype == torch.bool and mask.untyped_storage().nbytes() == layer.weight.numel()
        assert layer.mask.data_ptr() == mask.data_ptr()  # the logical view shares it
    held_by_scheduler = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in _held_tensors(sched)
        if t.untyped_storage().data_ptr() not in params
    }
    n_weights = sum(layer.weight.numel() for layer in sched.layers)
    assert sum(held_by_scheduler.values()) == n_weights  # 1 byte per sparse weight, nothing else
    # Masking still holds exactly with the bool mask: weights, gradients and moments.
    model(**llama_batch(9)).loss.backward()
    for layer in sched.layers:
        off = ~layer.mask_param
        assert layer.weight.grad.dtype == dtype and (layer.weight.grad[off] == 0).all()
        assert (layer.weight.data[off] == 0).all()
        assert (opt.state[layer.weight]["exp_avg"][off] == 0).all()
        assert (opt.state[layer.weight]["exp_avg_sq"][off] == 0).all()


def test_auto_interval_is_kept_on_resume_and_needs_the_run_length(tmp_path):
    model = MLPClassifier((16, 12, 4))
    cfg = CHTssConfig(final_density=0.3, targets=MLP_TARGETS, exclude=())
    first = CHTssController(model, None, cfg, total_steps=100)
    assert first.update_interval == 7 and first.total_updates == 10
    first.save(tmp_path)
    # the run is resumed with another length: the interval stays the one its schedule started with
    resumed = CHTssController(model, None, cfg, total_steps=300, init_masks=False)
    assert resumed.update_interval == 22
    resumed.load(tmp_path)
    assert resumed.update_interval == 7
    with pytest.raises(ValueError, match=r"needs total_steps .* pass CHTssController\(..., total_steps=N\)"):
        CHTssController(model, None, cfg).step()
    with pytest.raises(ValueError, match="update_interval='7' must be 'auto' or a number of optimizer steps"):
        CHTssConfig(update_interval="7")
