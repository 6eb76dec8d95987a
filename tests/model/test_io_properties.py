"""Property-based checks of the model layer's files: save/load and peft-import round trips on drawn models.

Hypothesis draws a tiny transformers-free model (1-3 blocks of gate/up/down projections with odd sizes) and a
ProperConfig (users, experts, top-k, ranks, population rank, routers, scales, targets); every adapter tensor is
randomized, some users get ranks below user_rank with NaN in the rows past their rank (never read, so outputs
must stay finite). Checked: a save loads bit-identical with the same stage and outputs in every stage the
config has; a second save into the same folder replaces the first; an imported peft adapter lands exactly
(ranks, scales, zero padding, the output peft would give) and survives save/load and later imports.
Derandomized with a small example budget and no example database, as tests/kernels/test_op_properties.py.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import proper

PROPS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
PROJ = ("gate_proj", "up_proj", "down_proj")
FILES = ["proper_config.json", "proper_model.safetensors"]


class Block(nn.Module):
    """An FFN block with the names the default targets match: x + down(tanh(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int, bias: bool):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias), nn.Linear(d, f, bias)
        self.down_proj = nn.Linear(f, d, bias)

    def forward(self, x):
        return x + self.down_proj(torch.tanh(self.gate_proj(x)) * self.up_proj(x))


@st.composite
def bases(draw):
    """(base model, its hidden size): random weights from a drawn seed, so copies are the same base."""
    d, f, n = draw(st.integers(3, 24)), draw(st.integers(3, 24)), draw(st.integers(1, 3))
    model = nn.Sequential(*[Block(d, f, draw(st.booleans())) for _ in range(n)])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, d


alphas = st.floats(0.05, 64.0, allow_nan=False, allow_infinity=False)


@st.composite
def configs(draw, min_users=1, **fixed):
    """A valid ProperConfig over the blocks' projections; `fixed` pins fields (the peft case)."""
    K = fixed.get("num_experts", draw(st.integers(0, 3)))
    targets = draw(st.lists(st.sampled_from(PROJ), min_size=1, max_size=3, unique=True))
    kw = dict(num_users=draw(st.integers(min_users, 6)), num_experts=K, top_k=draw(st.integers(0, K)),
              expert_rank=draw(st.integers(1, 5)), user_rank=draw(st.integers(1, 5)),
              population_rank=draw(st.one_of(st.none(), st.integers(0, 4))), lora_router=draw(st.booleans()),
              use_rslora=draw(st.booleans()), alpha=draw(alphas), expert_alpha=draw(st.one_of(st.none(), alphas)),
              user_alpha=draw(st.one_of(st.none(), alphas)), init_a=draw(st.sampled_from(["kaiming", "gaussian"])),
              router_dim=draw(st.integers(1, 4)), lora_router_probes=draw(st.integers(1, 3)),
              # one regex (full match, peft's convention) or a tuple of suffixes
              target_modules=draw(st.sampled_from([tuple(targets), rf".*\.({'|'.join(targets)})"])))
    kw.update(fixed)
    return proper.ProperConfig(**kw)


def _stages(cfg) -> list:
    """The stages this config can run: group needs experts, population a population LoRA."""
    return [s for s, ok in (("population", cfg.pop_rank > 0), ("group", cfg.num_experts > 0), ("user", True)) if ok]


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Random values in every adapter tensor (A, B, routers, LoRA-router head), random per-user ranks in
    [0, user_rank] and scales > 0, and NaN in each user's rows past its rank (they must never be read)."""
    g = torch.Generator().manual_seed(seed)
    r_max = proper.get_state(model).cfg.user_rank
    for layer in proper.proper_layers(model).values():
        for part in proper.ProperLinear.PARTS:
            for t in layer.part_tensors(part).values():
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
        layer.user_ranks.copy_(torch.randint(0, r_max + 1, layer.user_ranks.shape, generator=g))
        layer.user_scale.copy_(torch.rand(layer.user_scale.shape, generator=g) + 0.1)
        for u, r in enumerate(layer.user_ranks.tolist()):
            layer.user_a[u, r:] = float("nan")
            layer.user_b[u, :, r:] = float("nan")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN == NaN when the bits agree, unlike torch.equal)."""
    return t.detach().contiguous().flatten().view(torch.uint8)


def assert_same_tensors(a, b) -> None:
    """Every part's tensors of every layer are bit-identical (same keys, dtypes, shapes, bytes)."""
    la, lb = proper.proper_layers(a), proper.proper_layers(b)
    assert la.keys() == lb.keys()
    for name in la:
        for part in proper.ProperLinear.PARTS:
            ta, tb = la[name].part_tensors(part), lb[name].part_tensors(part)
            assert ta.keys() == tb.keys(), (name, part)
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, (name, k)
                assert torch.equal(_bits(ta[k]), _bits(tb[k])), (name, k)


def outputs(model, ids, x, stage):
    proper.set_stage(model, stage, init_experts=False)
    with torch.no_grad(), proper.users(model, ids):
        return model(x)


def assert_same_outputs(a, b, d: int, U: int, seed: int, stages) -> None:
    """Identical, finite outputs of both models for random ids in [-1, U) in each of `stages`."""
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 5, (), generator=g))
    ids = torch.randint(-1, U, (B,), generator=g)
    x = torch.randn(B, int(torch.randint(1, 4, (), generator=g)), d, generator=g)
    for stage in stages:
        ya, yb = outputs(a, ids, x, stage), outputs(b, ids, x, stage)
        assert torch.isfinite(ya).all(), f"stage {stage}: padded (NaN) rows were read"
        assert torch.equal(ya, yb), stage


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


@PROPS
@given(base=bases(), cfg=configs(), seed=st.integers(0, 2 ** 16), data=st.data())
def test_save_load_round_trip(base, cfg, seed, data):
    base, d = base
    fresh = copy.deepcopy(base)
    model = proper.apply_proper(base, cfg)
    randomize(model, seed)
    stages = _stages(cfg)
    if cfg.num_experts and cfg.pop_rank == cfg.expert_rank and data.draw(st.booleans(), "init experts"):
        proper.set_stage(model, "group", init_experts=True)   # experts_initialized = True
    proper.set_stage(model, data.draw(st.sampled_from(stages), "stage"), init_experts=False)
    with tempfile.TemporaryDirectory() as tmp:
        proper.save_pretrained(model, tmp)
        loaded = proper.from_pretrained(fresh, tmp)
    sa, sb = proper.get_state(model), proper.get_state(loaded)
    assert sb.stage == sa.stage and sb.experts_initialized == sa.experts_initialized
    assert sb.cfg.same_model(cfg)
    assert _trainable(loaded) == _trainable(model)
    assert_same_tensors(model, loaded)
    assert_same_outputs(model, loaded, d, cfg.num_users, seed, stages)


@PROPS
@given(base=bases(), cfgs=st.tuples(configs(), configs()), seed=st.integers(0, 2 ** 16))
def test_second_save_replaces_the_first(base, cfgs, seed):
    base, d = base
    first, second = (proper.apply_proper(copy.deepcopy(base), c) for c in cfgs)
    randomize(first, seed)
    randomize(second, seed + 1)
    proper.set_stage(second, _stages(cfgs[1])[0], init_experts=False)
    with tempfile.TemporaryDirectory() as tmp:
        proper.save_pretrained(first, tmp)
        proper.save_pretrained(second, tmp)
        assert sorted(os.listdir(tmp)) == FILES
        loaded = proper.from_pretrained(copy.deepcopy(base), tmp)
    assert proper.get_state(loaded).cfg.same_model(cfgs[1])
    assert proper.get_stage(loaded) == proper.get_stage(second)
    assert_same_tensors(second, loaded)
    assert_same_outputs(second, loaded, d, cfgs[1].num_users, seed, _stages(cfgs[1]))


# ----------------------------------------------------------------------------------------------- peft import
#: The pure peft case: user LoRAs only, w = 1, no population LoRA under them.
PEFT_CASE = dict(num_experts=0, lora_router=False, population_rank=0)


@st.composite
def peft_adapters(draw, layers, user_rank: int):
    """(peft-style state dict, adapter config, {module: (A, B, scale)}) over a random subset of `layers`."""
    names = draw(st.lists(st.sampled_from(sorted(layers)), min_size=1, max_size=len(layers), unique=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    alpha, rslora = draw(alphas), draw(st.booleans())
    pattern = {}
    if draw(st.booleans()):   # alpha_pattern keyed by a leaf name (peft matches "(.*\.)?(key)$")
        pattern[draw(st.sampled_from(PROJ))] = draw(alphas)
    sd, want = {}, {}
    for name in names:
        layer, r = layers[name], draw(st.integers(1, user_rank))
        a = torch.randn(r, layer.in_features, generator=g)
        b = torch.randn(layer.out_features, r, generator=g)
        sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"] = a, b
        al = pattern.get(name.rsplit(".", 1)[-1], alpha)
        want[name] = (a, b, al / math.sqrt(r) if rslora else al / r)
    config = {"lora_alpha": alpha, "use_rslora": rslora, "alpha_pattern": pattern, "r": user_rank}
    return sd, config, want


def _layer_out(model, layer, ids, x):
    with torch.no_grad(), proper.users(model, ids):
        return layer(x)


def check_imported(model, u: int, want, seed: int) -> None:
    """User u of every layer holds exactly the imported adapter, and its outputs are what peft computes."""
    g = torch.Generator().manual_seed(seed)
    U = proper.get_state(model).cfg.num_users
    ids = torch.tensor([u, -1, int(torch.randint(0, U, (), generator=g))])
    for name, layer in proper.proper_layers(model).items():
        x = torch.randn(3, 2, layer.in_features, generator=g)
        base = F.linear(x, layer.weight, layer.bias)
        y = _layer_out(model, layer, ids, x)
        assert torch.equal(y[1], base[1]), f"{name}: a token without a user got a user term"
        if name not in want:
            assert int(layer.user_ranks[u]) == 0, name
            assert not layer.user_a[u].any() and not layer.user_b[u].any(), name
            assert torch.equal(y[0], base[0]), name
            continue
        a, b, s = want[name]
        r = a.shape[0]
        assert int(layer.user_ranks[u]) == r, name
        assert float(layer.user_scale[u]) == torch.tensor(s, dtype=torch.float32).item(), name
        assert torch.equal(layer.user_a[u, :r], a) and torch.equal(layer.user_b[u, :, :r], b), name
        assert not layer.user_a[u, r:].any() and not layer.user_b[u, :, r:].any(), f"{name}: padding not zero"
        # the hand computation in fp64; an fp32 dot product of n terms errs by at most ~n*eps*sum|terms|
        # (n <= 24 + 5 here, eps = 6e-8, so < 2e-6 of the absolute-value sums): 1e-5 of them leaves a 5x margin
        # and still catches any real fault (a wrong scale, a missing or extra rank row moves outputs by O(1))
        xd, ad, bd, wd = x[0].double(), a.double(), b.double(), layer.weight.double()
        bias = 0.0 if layer.bias is None else layer.bias.double()
        ref = xd @ wd.T + bias + s * (xd @ ad.T) @ bd.T
        bound = xd.abs() @ wd.abs().T + (0.0 if layer.bias is None else bias.abs()) \
            + s * (xd.abs() @ ad.abs().T) @ bd.abs().T
        err = (y[0].double() - ref).abs()
        assert (err <= 1e-5 * bound + 1e-30).all(), f"{name}: max error {float(err.max())} vs peft's output"


@st.composite
def peft_models(draw, min_users=1):
    """(patched model in the user stage, fresh copy of its base): the pure peft case."""
    (base, _), cfg = draw(bases()), draw(configs(min_users, **PEFT_CASE))
    fresh = copy.deepcopy(base)
    model = proper.apply_proper(base, cfg)
    randomize(model, draw(st.integers(0, 2 ** 16)))
    return model, fresh


def _user_slice(model, u: int):
    """User u's rows of every users-part tensor, by (module, key)."""
    return {(n, k): t[u].clone() for n, layer in proper.proper_layers(model).items()
            for k, t in layer.part_tensors("users").items()}


def _assert_user_same(before, model, u: int, what: str) -> None:
    after = _user_slice(model, u)
    for key in before:
        assert torch.equal(_bits(before[key]), _bits(after[key])), f"{what}: user {u} changed at {key}"


@PROPS
@given(mf=peft_models(), seed=st.integers(0, 2 ** 16), data=st.data())
def test_import_peft_round_trip(mf, seed, data):
    model, fresh = mf
    cfg = proper.get_state(model).cfg
    layers = proper.proper_layers(model)
    u = data.draw(st.integers(0, cfg.num_users - 1), "user")
    sd, config, want = data.draw(peft_adapters(layers, cfg.user_rank), "adapter")
    others = {v: _user_slice(model, v) for v in range(cfg.num_users) if v != u}
    ranks = proper.import_peft_adapter(model, u, sd, config=config)
    assert ranks == {n: (want[n][0].shape[0] if n in want else 0) for n in layers}
    for v, before in others.items():
        _assert_user_same(before, model, v, "import into another user")
    check_imported(model, u, want, seed)
    with tempfile.TemporaryDirectory() as tmp:
        proper.save_pretrained(model, tmp)
        loaded = proper.from_pretrained(fresh, tmp)
    assert_same_tensors(model, loaded)
    check_imported(loaded, u, want, seed)


@PROPS
@given(mf=peft_models(min_users=2), seed=st.integers(0, 2 ** 16), data=st.data())
def test_later_import_leaves_earlier_user(mf, seed, data):
    model, fresh = mf
    cfg = proper.get_state(model).cfg
    layers = proper.proper_layers(model)
    u1, u2 = data.draw(st.lists(st.integers(0, cfg.num_users - 1), min_size=2, max_size=2, unique=True), "users")
    sd1, config1, want1 = data.draw(peft_adapters(layers, cfg.user_rank), "first adapter")
    proper.import_peft_adapter(model, u1, sd1, config=config1)
    before = _user_slice(model, u1)
    with tempfile.TemporaryDirectory() as tmp:
        proper.save_pretrained(model, tmp)
        loaded = proper.from_pretrained(fresh, tmp)
    _assert_user_same(before, loaded, u1, "save/load")
    sd2, config2, want2 = data.draw(peft_adapters(proper.proper_layers(loaded), cfg.user_rank), "second adapter")
    proper.import_peft_adapter(loaded, u2, sd2, config=config2)
    _assert_user_same(before, loaded, u1, "a later import into another user")
    check_imported(loaded, u1, want1, seed)
    check_imported(loaded, u2, want2, seed + 1)


def test_lora_router_never_reads_padded_user_rows():
    """Regression (found by test_save_load_round_trip): the LoRA-aware router multiplied the padding of B past a
    user's rank by zero (0 * NaN = NaN), so padding NaN made that user's outputs and the router's gradients NaN.
    Padding must change nothing: NaN padding gives the outputs and gradients of zero padding."""
    cfg = proper.ProperConfig(num_users=3, num_experts=2, user_rank=4, target_modules=("up_proj",))
    start = proper.apply_proper(nn.Sequential(Block(5, 7, True)), cfg)
    with torch.no_grad():
        layer = proper.proper_layers(start)["0.up_proj"]
        layer.user_b.normal_(generator=torch.Generator().manual_seed(0))
        layer.lora_router.head.weight.normal_(generator=torch.Generator().manual_seed(1))
        layer.user_ranks.copy_(torch.tensor([4, 2, 0]))
    runs = []
    for pad in (0.0, float("nan")):
        model = copy.deepcopy(start)
        layer = proper.proper_layers(model)["0.up_proj"]
        with torch.no_grad():
            for u, r in enumerate(layer.user_ranks.tolist()):
                layer.user_a[u, r:], layer.user_b[u, :, r:] = pad, pad
        x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1))
        with proper.users(model, [0, 1, 2]):
            y = model(x)
        y.square().sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values()), pad
        runs.append((y.detach(), grads))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys() and len(runs[0][1]) > 0
    for n in runs[0][1]:
        assert torch.equal(runs[0][1][n], runs[1][1][n]), n
