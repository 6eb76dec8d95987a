"""model(..., user_ids=) and model.generate(..., user_ids=): the keyword form of proper.users(model, ids).

Identical results to the context in every stage, generate's expanded batches, both forms at once, missing ids,
deepcopy / pickle / save, the signature HF Trainer reads, torch.compile and gradient checkpointing."""
from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest
import torch

import proper
from proper_fixtures import patched_llama, tiny_llama

IDS = [0, 4, -1]


def _patched(stage="user", **kw):
    return patched_llama(stage, router_head=True, **kw)


def _tokens(b=3, n=5, seed=0):
    return torch.randint(1, 64, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stage", ["population", "group", "user"])
def test_keyword_gives_the_context_logits(stage):
    m, x = _patched(stage), _tokens()
    with torch.no_grad():
        with proper.users(m, IDS):
            ctx = m(x).logits
        kw = m(input_ids=x, user_ids=IDS).logits
        pos = m(x, user_ids=torch.tensor(IDS)).logits
        other = m(x, user_ids=[1, 2, 3]).logits
    assert torch.equal(kw, ctx) and torch.equal(pos, ctx)
    if stage != "population":                      # the ids really reach the layers
        assert (other - ctx).abs().max() > 1e-3


def test_keyword_gives_the_context_gradients():
    grads = []
    for use_kw in (False, True):
        m = _patched().train()
        x = _tokens()
        if use_kw:
            loss = m(x, labels=x, user_ids=IDS).loss
        else:
            with proper.users(m, IDS):
                loss = m(x, labels=x).loss
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


@pytest.mark.parametrize("how", [dict(), dict(num_return_sequences=2, do_sample=True),
                                 dict(num_beams=2, num_return_sequences=2)])
def test_generate_keyword_equals_generate_in_the_context(how):
    m, x = _patched(), _tokens(n=4)
    kw = dict(max_new_tokens=3, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **how)
    outs = []
    for ids, in_context in ((IDS, True), (IDS, False), ([1, 2, 3], False)):
        torch.manual_seed(0)                        # the same samples for do_sample
        with torch.no_grad():
            if in_context:
                with proper.users(m, ids):
                    outs.append(m.generate(x, **kw))
            else:
                outs.append(m.generate(x, user_ids=ids, **kw))
    ctx, key, other = outs
    assert torch.equal(key.sequences, ctx.sequences)
    assert all(torch.equal(a, b) for a, b in zip(key.logits, ctx.logits))
    assert (other.logits[0] - ctx.logits[0]).abs().max() > 1e-3
    assert ctx.sequences.shape[0] == 3 * how.get("num_return_sequences", 1)


def test_both_forms_must_agree():
    m, x = _patched(), _tokens()
    with torch.no_grad(), proper.users(m, IDS):
        ref = m(x).logits
        assert torch.equal(m(x, user_ids=torch.tensor(IDS)).logits, ref)          # same ids: fine
        with pytest.raises(ValueError, match=r"'user_ids' \[0, 4, 0\] disagrees .* \[0, 4, -1\]"):
            m(x, user_ids=[0, 4, 0])
        with pytest.raises(ValueError, match="disagrees"):
            m(x[:2], user_ids=[0, 4])
        with pytest.raises(ValueError, match="disagrees"):
            m.generate(x, max_new_tokens=1, pad_token_id=0, user_ids=[1, 1, 1])
    other = _patched()                              # a context for another model does not count
    with torch.no_grad(), proper.users(other, [5, 5, 5]):
        assert torch.equal(m(x, user_ids=IDS).logits, ref)


def test_missing_ids_give_todays_error_and_bad_ids_name_the_argument():
    m, x = _patched(), _tokens()
    with pytest.raises(proper.MissingUsersError) as via_wrapper:
        m(x)
    with pytest.raises(proper.MissingUsersError) as unwrapped:
        type(m).forward(m, x)                       # the class's forward: today's path, no wrapper
    assert str(via_wrapper.value) == str(unwrapped.value)
    assert "proper.users(model, user_ids)" in str(via_wrapper.value)
    with pytest.raises(proper.MissingUsersError):
        m.generate(x, max_new_tokens=1, pad_token_id=0)
    with pytest.raises(proper.MissingUsersError):
        m(x, user_ids=None)                         # None = not given
    with pytest.raises(ValueError, match=r"'user_ids' must be in \[-1, 6\)"):
        m(x, user_ids=[0, 6, 1])
    with pytest.raises(TypeError, match="'user_ids' must hold integers"):
        m(x, user_ids=[0.0, 1.0, 2.0])


def test_signature_lists_user_ids_and_the_original_parameters():
    m = _patched()
    for name in ("forward", "generate"):
        orig = inspect.signature(getattr(type(m), name).__get__(m))
        sig = inspect.signature(getattr(m, name))
        names = list(sig.parameters)
        assert "user_ids" in names and [n for n in names if n != "user_ids"] == list(orig.parameters)
        assert sig.parameters["user_ids"].default is None
    assert list(inspect.signature(m.forward).parameters)[-2:] == ["user_ids", "kwargs"]
    plain = tiny_llama()                            # no class was patched: an unpatched instance is untouched
    assert "forward" not in vars(plain) and "user_ids" not in inspect.signature(plain.forward).parameters
    proper.install_user_ids_keyword(m)             # idempotent: still one layer of wrapping
    assert m.forward.inner is None and m.generate.inner is None


def test_deepcopy_pickle_and_save_bind_to_the_copy(tmp_path):
    m, x = _patched(), _tokens()
    keys = set(m.state_dict())
    c = copy.deepcopy(m)
    assert c.forward.model is c and c.generate.model is c and m.forward.model is m
    with torch.no_grad():
        for layer in proper.proper_layers(c).values():
            layer.user_b.mul_(3.0)                  # only the copy changes
        ref = m(x, user_ids=IDS).logits
        got = c(x, user_ids=IDS).logits
        with proper.users(c, IDS):
            assert torch.equal(got, c(x).logits)
    assert (got - ref).abs().max() > 1e-3
    assert set(c.state_dict()) == keys and not any("forward" in k or "generate" in k for k in keys)

    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    p = torch.load(buf, weights_only=False)
    assert p.forward.model is p
    with torch.no_grad():
        assert torch.equal(p(x, user_ids=IDS).logits, got)

    proper.save_pretrained(c, tmp_path / "s")
    loaded = proper.from_pretrained(tiny_llama(), tmp_path / "s")
    assert loaded.forward.model is loaded
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, user_ids=IDS).logits, got, rtol=0, atol=0)


def test_torch_compile_forward_with_user_ids():
    """Dynamo traces the wrapper (and breaks the graph at the ids check's host sync, resuming after it). The
    eager backend: what the wrapper meets is Dynamo's tracing, not code generation, and the run takes seconds
    (inductor gives the same logits to 3e-7, measured)."""
    m, x = _patched(), _tokens()
    with torch.no_grad():
        with proper.users(m, IDS):
            ref = m(x).logits
        torch._dynamo.reset()
        out = torch.compile(m, backend="eager")(input_ids=x, user_ids=IDS).logits
        again = torch.compile(m, backend="eager")(input_ids=x, user_ids=[1, 2, 3]).logits
    assert torch.equal(out, ref)
    assert (again - ref).abs().max() > 1e-3        # the compiled call follows the ids it is given


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_with_user_ids(enable):
    """HF checkpointing, the current API and the deprecated one, with proper.gradient_checkpointing_kwargs():
    the recomputation in backward runs with the ids the keyword gave each batch (the call returned long before)."""
    ref, ck = _patched().train(), _patched().train()
    if not hasattr(ck, enable):
        pytest.skip(f"this transformers has no {enable}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # the deprecated alias warns; it must still work
        getattr(ck, enable)(proper.gradient_checkpointing_kwargs())
    assert any(getattr(mod, "gradient_checkpointing", False) for mod in ck.modules())
    a, b = _tokens(2, 6, seed=1), _tokens(3, 6, seed=2)
    for m in (ref, ck):          # gradient accumulation over two batches of different users, one backward
        la = m(a, labels=a, user_ids=[0, 4]).loss
        lb = m(b, labels=b, user_ids=[1, 2, 1]).loss
        (la + lb).backward()
    gr = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    gc = {n: p.grad for n, p in ck.named_parameters() if p.grad is not None}
    assert gr.keys() == gc.keys() and gr
    for n in gr:   # the recomputed forward is the same arithmetic; 1e-5: the order of the accumulation differs
        torch.testing.assert_close(gc[n], gr[n], rtol=1e-5, atol=1e-6, msg=n)
