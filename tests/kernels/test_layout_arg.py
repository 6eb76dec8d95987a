"""routed_lora(layout=...): the caller's token layout (built once per batch) gives exactly what each backend
computes without it, forward and every gradient; a layout of the wrong shape fails by name; and the model layer
builds one layout per batch shape, shared by every adapted layer."""
import pytest
import torch

import proper
import proper_kernels as pk
from cases import grad_out_for, make_case, run_with_grads
from proper import context

BACKENDS = [b for b in pk.available_backends("cpu") if b in ("torch", "cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("popularity", ["uniform", "zipf", "half_none"])
def test_layout_given_equals_layout_built_inside(backend, popularity):
    case = make_case(T=37, popularity=popularity, seed=3)
    lay = pk.token_layout(case["user_ids"], case["user_a"].shape[0])
    go = grad_out_for(case, case["user_b"].shape[1])
    plain = run_with_grads(pk.routed_lora, case, go, backend=backend)
    given = run_with_grads(pk.routed_lora, case, go, backend=backend, layout=lay)
    assert plain.keys() == given.keys()
    for k in plain:
        assert torch.equal(plain[k], given[k]), k      # the same computation: bit-identical


def test_layout_of_the_wrong_shape_names_the_argument():
    case = make_case(T=12, seed=1)
    U = case["user_a"].shape[0]
    args = [case[k] for k in ("x", "expert_a", "expert_b", "gates", "user_a", "user_b", "user_ids")]
    wrong_users = pk.token_layout(case["user_ids"], U + 2)             # built for another table size
    with pytest.raises(ValueError, match=r"layout.seg_start.*\[7\]"):
        pk.routed_lora(*args, layout=wrong_users, user_ranks=case["user_ranks"])
    with pytest.raises(TypeError, match="'layout' must be a proper_kernels.TokenLayout"):
        pk.routed_lora(*args, layout=(1, 2, 3), user_ranks=case["user_ranks"])
    with pytest.raises(ValueError, match="'layout' was given without user adapters"):
        pk.routed_lora(case["x"], case["expert_a"], case["expert_b"], case["gates"], None, None, None,
                       layout=pk.token_layout(case["user_ids"], U))


def test_the_model_builds_one_layout_per_batch_shape(monkeypatch):
    from proper_fixtures import patched_llama

    m = patched_llama()
    n_layers = len(proper.proper_layers(m))
    builds, seen = [], set()
    real = context.token_layout
    monkeypatch.setattr(context, "token_layout", lambda *a: builds.append(1) or real(*a))
    real_op = pk.routed_lora

    def spy(*a, layout=None, **k):
        seen.add(id(layout))
        return real_op(*a, layout=layout, **k)

    import proper.modules.linear as L
    monkeypatch.setattr(L, "routed_lora", spy)
    with proper.users(m, [0, 3, -1]):
        m(torch.ones(3, 5, dtype=torch.long)).logits.sum().backward()   # forward and backward
    assert n_layers > 1 and len(builds) == 1 and len(seen) == 1
