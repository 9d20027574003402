"""`lx.AdapterBank`: fixed device slots that adapters come and go through.

Every served row is compared with the plain model run alone with that row's adapter
merged in float64 NumPy (`model_helpers.einsum_merge`), never with `lx.merge`. The
model has all three kinds of adapted leaf: an embedding table read by lookup, a
scanned layer stack and an output head.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays._serving import slots as lx_slots
from tests.fast_init import random_adapters
from tests.model_helpers import einsum_merge

V, D, L, B, T = 13, 6, 2, 4, 3
CAPACITY = 8
BANK_RULES = [
    lx.LoraRule(r"^embed$", rank=CAPACITY, in_axes=0, out_axes=1),
    lx.LoraRule(r"layers/wq", rank=CAPACITY, stack_axes=0),
    lx.LoraRule(r"^head$", rank=CAPACITY),
]


def _params():
    rng = np.random.default_rng(0)
    return {
        "embed": jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
        "layers": {
            "wq": jnp.asarray(rng.standard_normal((L, D, D)) / D**0.5, jnp.float32)
        },
        "head": jnp.asarray(rng.standard_normal((D, V)) / D**0.5, jnp.float32),
    }


PARAMS = _params()
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)


def forward(p, tokens):
    h = p["embed"][tokens]
    h = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), h, p["layers"]["wq"])[0]
    return h @ p["head"]


def _rule_set(rank, *, alpha=None, rslora=False, leaves=("embed", "wq", "head")):
    pick = {"embed": 0, "wq": 1, "head": 2}
    out = []
    for leaf in leaves:
        r = BANK_RULES[pick[leaf]]
        out.append(
            lx.LoraRule(
                r.pattern,
                rank,
                alpha,
                in_axes=r.in_axes,
                out_axes=r.out_axes,
                stack_axes=r.stack_axes,
                use_rslora=rslora,
            )
        )
    return out


# Mixed ranks, alphas, rsLoRA and subsets of the bank's leaves.
RULE_SETS = {
    "r8": _rule_set(8),
    "r2": _rule_set(2, alpha=5.0),
    "r4-rs": _rule_set(4, alpha=3.0, rslora=True),
    "wq-only": _rule_set(6, leaves=("wq",)),
    "no-embed": _rule_set(3, alpha=1.0, leaves=("wq", "head")),
    "r1": _rule_set(1, alpha=2.0),
}
ADAPTERS = dict(
    zip(RULE_SETS, random_adapters(PARAMS, list(RULE_SETS.values()), seed=3))
)


def _bank(slots=3, names=tuple(ADAPTERS)):
    bank = lx.AdapterBank(PARAMS, BANK_RULES, slots=slots)
    for name in names:
        bank.add(name, ADAPTERS[name])
    return bank


_REFS: dict = {}


def _reference_row(name, e):
    """Row `e` of the plain model, alone, with adapter `name` merged in NumPy."""
    if name not in _REFS:
        p = PARAMS if name is None else einsum_merge(PARAMS, ADAPTERS[name], xp=np)
        _REFS[name] = np.asarray(forward(p, TOKENS))
    return _REFS[name][e]


def _check_rows(out, names):
    out = np.asarray(out)
    for e, name in enumerate(names):
        np.testing.assert_allclose(
            out[e], _reference_row(name, e), rtol=2e-5, atol=2e-5
        )


def _adapters_matter():
    base = _reference_row(None, 0)
    for name in ADAPTERS:
        assert np.abs(_reference_row(name, 0) - base).max() > 1e-2, name


# -- serving --------------------------------------------------------------------


def test_batches_through_fewer_slots_than_adapters_compile_once():
    """A stream of batches over 6 adapters through 3 slots, with adds and removes
    in between: every row equals its adapter merged alone, adapters are loaded on
    demand and evicted, and the jitted forward traces exactly once."""
    _adapters_matter()
    traces = []

    @jax.jit
    def serve(p, tokens):
        traces.append(1)
        return lx.quaxify(forward)(p, tokens)

    bank = _bank(names=["r8", "r2", "r4-rs"])
    batches = [
        ["r8", "r2", None, "r8"],
        ["r4-rs", "r4-rs", "r2", "__base__"],
        "add wq-only",
        ["wq-only", "r8", None, "r2"],
        "remove r2",
        "add no-embed",
        "add r1",
        ["no-embed", "r1", "r8", "no-embed"],
        "add r2",
        ["r2", "r2", "r2", "r2"],
        [None, None, None, None],
        ["r4-rs", "wq-only", "r1", "r4-rs"],
    ]
    for step in batches:
        if isinstance(step, str):
            verb, name = step.split()
            bank.add(name, ADAPTERS[name]) if verb == "add" else bank.remove(name)
            continue
        out = serve(lx.loraify(PARAMS, bank, bank.indices(step)), TOKENS)
        _check_rows(out, [None if n == "__base__" else n for n in step])
        assert len(bank.loaded) <= 3
    assert len(traces) == 1
    kinds = [ev.kind for ev in bank.events]
    assert kinds.count("evict") >= 3 and kinds.count("remove") == 1
    assert len(bank) == 6 and set(bank.names) == set(ADAPTERS)


def test_per_token_names():
    """A nested list gives `(batch, seq)` indices: one adapter per token."""
    bank = _bank(slots=4)
    names = [["r8", "r2", None], ["r2", "r2", "r2"], [None, "r1", "r8"], ["r1"] * 3]
    idx = bank.indices(names)
    assert idx.shape == (B, T) and idx.dtype == jnp.int32

    # The model never mixes tokens, so each token can have its own adapter.
    out = np.asarray(
        jax.jit(lx.quaxify(forward))(lx.loraify(PARAMS, bank, idx), TOKENS)
    )
    for e in range(B):
        for t in range(T):
            name = names[e][t]
            p = PARAMS if name is None else einsum_merge(PARAMS, ADAPTERS[name], xp=np)
            ref = np.asarray(forward(p, TOKENS[e : e + 1, t : t + 1]))[0, 0]
            np.testing.assert_allclose(out[e, t], ref, rtol=2e-5, atol=2e-5)


def test_lru_eviction_spares_what_the_batch_needs():
    bank = _bank(slots=3)
    bank.indices(["r8", "r2", "r4-rs"])  # slots 0, 1, 2 in that order
    bank.indices(["r8"])  # r8 is now the most recent
    idx = bank.indices(["wq-only", "r2"])  # needs one slot: r4-rs is the LRU
    events = [(ev.kind, ev.name, ev.slot) for ev in bank.last_events]
    assert events == [("evict", "r4-rs", 2), ("load", "wq-only", 2)]
    assert list(bank.events)[-2:] == list(bank.last_events)
    # Issued indices encode the slot (and its generation): slot = value % slots.
    np.testing.assert_array_equal(np.asarray(idx) % bank.slots, [2, 1])
    assert bank.loaded == {"r8": 0, "r2": 1, "wq-only": 2}
    # Already-loaded adapters are not written again.
    before = len(bank.events)
    bank.indices(["r2", "r8", "wq-only"])
    assert bank.last_events == () and len(bank.events) == before
    # A batch needing all slots evicts only what it does not use.
    bank.indices(["no-embed", "r8", "r1"])
    assert set(bank.loaded) == {"no-embed", "r8", "r1"}


def _slots_of(bank) -> dict:
    """Per path `(a, b, scale, head_scale)` as the bank serves them."""
    served = bank.served()
    return {
        p: (*served.factors[p], served.scales[j], served.head_scales[j])
        for j, p in enumerate(served.paths)
    }


def test_load_writes_one_slot_in_place():
    """A load updates the bank's buffers in place (donated): the device pointers
    do not move, the old arrays are gone, and only the loaded slot changes."""
    bank = _bank(slots=3)
    bank.indices(["r8", "r2"])
    before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(bank.served())]
    old = jax.tree.leaves(bank.served())
    # Host copies of copies: a NumPy view of the bank's own buffers would pin them
    # (JAX cannot donate a buffer NumPy can see), and the load would copy.
    host = jax.tree.map(lambda x: np.asarray(jnp.copy(x)), _slots_of(bank))
    bank.indices(["r4-rs"])  # slot 2
    after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(bank.served())]
    assert before[:-1] == after[:-1]  # all but the generations (a new host copy)
    assert all(x.is_deleted() for x in old[:-1])
    for path, (a, b, s, _) in _slots_of(bank).items():
        ns = len(bank._leaves[path].layout.stack_axes)
        a0, b0, s0, _ = host[path]
        np.testing.assert_array_equal(
            np.delete(np.asarray(a), 2, ns), np.delete(a0, 2, ns)
        )
        np.testing.assert_array_equal(
            np.delete(np.asarray(b), 2, ns), np.delete(b0, 2, ns)
        )
        np.testing.assert_array_equal(np.asarray(s)[:2], s0[:2])
        assert np.isnan(s0[2]) and np.isfinite(np.asarray(s)[2])


def test_bank_holds_fixed_shapes_and_reports_bytes():
    bank = _bank(slots=5)
    a, b, s, hs = _slots_of(bank)["layers/wq"]
    assert a.shape == (L, 5, D, CAPACITY) and b.shape == (L, 5, CAPACITY, D)
    assert s.shape == hs.shape == (5,)
    expected = sum(
        (np.prod(lay.in_shape) + np.prod(lay.out_shape)) * np.prod(lay.stack_shape)
        for lay in bank.layouts
    )
    assert bank.nbytes == 4 * (5 * CAPACITY * expected + 2 * 5 * 3)
    assert bank.host_nbytes > 0 and bank.capacity == {p: CAPACITY for p in bank.paths}
    assert "slots=5" in repr(bank) and "r8" in bank and "nope" not in bank


def test_bfloat16_bank_serves_float32_adapters():
    """A bf16 model: the bank holds bf16 factors (float32 adapters are cast on
    add), and rows match the float64 merge to bf16 precision."""
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    bank = lx.AdapterBank(p16, BANK_RULES, slots=2)
    assert _slots_of(bank)["head"][0].dtype == jnp.bfloat16
    bank.add("r4-rs", ADAPTERS["r4-rs"])
    names = ["r4-rs", None, "r4-rs", None]
    out = jax.jit(lx.quaxify(forward))(
        lx.loraify(p16, bank, bank.indices(names)), TOKENS
    )
    assert out.dtype == jnp.bfloat16
    for e, name in enumerate(names):
        ref = _reference_row(name, e)
        err = np.abs(np.asarray(out[e], np.float32) - ref).max()
        assert err < 3e-2 * np.abs(ref).max(), (name, err)


def test_compact_serves_only_the_batch_adapters():
    """`compact=True`: the batch's slots copied into a stack of the next power of
    two; one program per size; a batch of one adapter is the plain LoRA product
    (no factor gather); the tree cannot be given other indices."""
    bank = _bank(slots=4)
    traces = []

    @jax.jit
    def serve(p, tokens):
        traces.append(1)
        return lx.quaxify(forward)(p, tokens)

    sizes = []
    for names in (
        ["r8", None, "r8", "r8"],  # 1 adapter -> a stack of 1
        ["r2", "r4-rs", None, "r2"],  # 2 -> 2
        ["wq-only", "r8", "r1", None],  # 3 -> 4
        ["r8", "r8", "r8", "r8"],  # 1 again: no new program
        ["no-embed", "r2", "r1", "r8"],  # 4 -> 4 (the whole bank: no copy)
        [None, None, None, None],  # none -> 1
    ):
        served = lx.loraify(PARAMS, bank, bank.indices(names), compact=True)
        leaf = served["head"]
        sizes.append(leaf.n_adapters)
        _check_rows(serve(served, TOKENS), names)
    assert sizes == [1, 2, 4, 1, 4, 1]
    assert len(traces) == 3  # one program per size: 1, 2, 4
    one = lx.loraify(PARAMS, bank, bank.indices(["r8"] * B), compact=True)
    choices = lx.explain_strategies(forward, one, TOKENS)
    assert choices and all(c.shapes["n_adapters"] == 1 for c in choices)
    assert all("plain LoRA product" in c.reason for c in choices)
    with pytest.raises(ValueError, match="compact=True"):
        lx.with_indices(one, jnp.zeros(B, jnp.int32))
    with pytest.raises(ValueError, match="serves from an AdapterBank"):
        lx.loraify(PARAMS, ADAPTERS["r8"], jnp.zeros(B, jnp.int32), compact=True)
    with pytest.raises(lx.LoraIndexError, match="index -3 is out of range"):
        lx.loraify(PARAMS, bank, jnp.array([0, -3, 0, 0]), compact=True)


# -- never the wrong adapter ------------------------------------------------------


def test_stale_indices_are_refused():
    bank = _bank(slots=2)
    old = bank.indices(["r8", "r2"])
    bank.indices(["r1", "r4-rs"])  # both slots change hands
    with pytest.raises(
        lx.StaleIndicesError, match=r"issued for 'r\d' in slot \d, which has since"
    ):
        lx.loraify(PARAMS, bank, old)
    assert isinstance(lx.StaleIndicesError("x"), lx.LoraIndexError)
    fresh = bank.indices(["r1"])
    lx.loraify(PARAMS, bank, fresh)  # fine
    bank.remove("r1")
    with pytest.raises(lx.StaleIndicesError, match="cleared"):
        lx.loraify(PARAMS, bank, fresh)


def test_indices_not_issued_by_the_bank():
    """Slot numbers written by hand (even a loaded slot's, or an empty one's) were
    not issued: concrete, refused on the host; traced, NaN rows, never another
    adapter's output or the base model's. Issued values, traced, serve."""
    bank = _bank(slots=3)
    idx = bank.indices(["r8", None, "r2", "r8"])
    with pytest.raises(lx.StaleIndicesError, match="not issued by this bank"):
        lx.loraify(PARAMS, bank, jnp.array([0, 2, -1, 1], jnp.int32))
    served = lx.loraify(PARAMS, bank, idx)

    @jax.jit
    def run(p, i):
        return lx.quaxify(forward)(lx.with_indices(p, i), TOKENS)

    issued = np.asarray(idx)
    out = np.asarray(run(served, jnp.array([issued[0], 2, -1, 0], jnp.int32)))
    assert np.isnan(out[[1, 3]]).all()
    for e, name in ((0, "r8"), (2, None)):
        np.testing.assert_allclose(
            out[e], _reference_row(name, e), rtol=2e-5, atol=2e-5
        )


def test_a_removed_adapter_cannot_be_served():
    bank = _bank(slots=3)
    idx = bank.indices(["r8", "r2", None, "r8"])
    served = lx.loraify(PARAMS, bank, idx)
    bank.remove("r2")
    assert bank.events[-1] == lx.BankEvent("remove", "r2", 1)
    assert "r2" not in bank.loaded and "r2" not in bank.names
    with pytest.raises(ValueError, match="Serve each batch anew"):
        lx.with_indices(served, idx)
    with pytest.raises(KeyError, match="no adapter named 'r2'"):
        bank.indices(["r2"])
    # Its slot is empty (NaN scales) until reused.
    assert np.isnan(np.asarray(_slots_of(bank)["head"][2])[1])


def test_events_are_bounded_and_long_name_lists_cut():
    bank = lx.AdapterBank(PARAMS, BANK_RULES, slots=1, events_kept=5)
    for j in range(30):
        bank.add(f"n{j:02d}", ADAPTERS["r1"])
    for j in range(10):
        bank.indices([f"n{j:02d}"])
    assert len(bank.events) == 5
    assert bank.last_events == (
        lx.BankEvent("evict", "n08", 0),
        lx.BankEvent("load", "n09", 0),
    )
    with pytest.raises(KeyError) as info:
        bank.indices(["zz"])
    assert "knows 30: ['n00'," in str(info.value) and "'n19'] and 10 more" in str(
        info.value
    )


def test_the_bank_remembers_a_bounded_history(monkeypatch):
    """What each recent generation was (for messages) is kept for a bounded
    number of changes, however long the server runs."""
    monkeypatch.setattr(lx_slots, "_HISTORY_KEPT", 3)
    bank = lx.AdapterBank(PARAMS, BANK_RULES, slots=1)
    for j in range(6):
        bank.add(f"n{j}", ADAPTERS["r1"])
        bank.indices([f"n{j}"])
    assert len(bank._device.history) == 3


# -- errors -----------------------------------------------------------------------


def test_errors_name_the_problem():
    bank = _bank(slots=2, names=["r8", "r2"])
    with pytest.raises(KeyError) as info:
        bank.indices(["r8", "r3"])
    msg = str(info.value)
    assert msg.startswith("AdapterBank.indices: no adapter named 'r3'.")
    assert "knows 2: ['r2', 'r8']" in msg and "Did you mean 'r8', 'r2'?" in msg
    with pytest.raises(
        ValueError, match="uses 3 distinct adapters, but the bank has 2"
    ):
        bank.add("r1", ADAPTERS["r1"]) or bank.indices(["r8", "r2", "r1"])
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("r8", ADAPTERS["r8"])
    with pytest.raises(ValueError, match="reserved for the base model"):
        bank.add("__base__", ADAPTERS["r8"])
    with pytest.raises(TypeError, match="one Adapter, got an AdapterStack"):
        bank.add("s", lx.stack_adapters([ADAPTERS["r8"]]))
    with pytest.raises(TypeError, match="must be a str"):
        bank.add(3, ADAPTERS["r8"])
    with pytest.raises(TypeError, match="entries must be adapter names"):
        bank.indices(["r8", 0])
    with pytest.raises(TypeError, match="expected a list of adapter names"):
        bank.indices("r8")
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        bank.remove("zz")
    with pytest.raises(ValueError, match="slots` must be >= 1"):
        lx.AdapterBank(PARAMS, BANK_RULES, slots=0)
    with pytest.raises(TypeError, match="slots` must be an int"):
        lx.AdapterBank(PARAMS, BANK_RULES, slots=2.0)


def test_adapter_rank_leaf_and_layout_are_checked_on_add():
    bank = lx.AdapterBank(PARAMS, BANK_RULES[1:], slots=2)  # no embedding leaf
    with pytest.raises(ValueError) as info:
        bank.add("r8", ADAPTERS["r8"])
    msg = str(info.value)
    assert "'embed'" in msg and "not one of the bank's leaves" in msg
    (big,) = random_adapters(PARAMS, [_rule_set(12, leaves=("wq",))], seed=9)
    with pytest.raises(ValueError, match=r"rank 12, above the bank's capacity 8"):
        bank.add("big", big)
    flat = lx.AdapterBank(
        PARAMS, [lx.LoraRule("layers/wq", 4, in_axes=(0, 1), out_axes=2)], slots=1
    )
    with pytest.raises(ValueError, match=r"stack_axes=\(0,\), but the bank as"):
        flat.add("wq", ADAPTERS["wq-only"])
    broken = jax.tree.map(lambda x: x.at[0].set(jnp.nan), ADAPTERS["wq-only"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        bank.add("broken", broken)
    assert len(bank) == 0  # nothing half-added


def test_tree_must_match_the_bank():
    bank = _bank(slots=2)
    idx = bank.indices(["r8"])
    other = dict(PARAMS, head=jnp.zeros((D + 1, V)))
    with pytest.raises(ValueError, match=re.escape("shape (7, 13)")):
        lx.loraify(other, bank, idx)


# -- from disk ----------------------------------------------------------------------


def test_adapters_from_orbax_and_peft_directories(tmp_path):
    """`bank.add(name, lx.load_adapter(...))` and PEFT directories serve exactly
    what the in-memory adapters do."""
    peft_rules = [  # a PEFT directory holds plain 2-D modules: no layer stack
        lx.LoraRule(r"^embed$", rank=4, in_axes=0, out_axes=1),
        lx.LoraRule(r"^head$", rank=4, alpha=8.0),
    ]
    (peft_ad,) = random_adapters(PARAMS, [peft_rules], seed=11)
    lx.save_adapter(tmp_path / "r8", ADAPTERS["r8"])
    lx.save_adapter(tmp_path / "r4-rs", ADAPTERS["r4-rs"])
    lx.save_peft_adapter(tmp_path / "peft", peft_ad)
    bank = lx.AdapterBank(PARAMS, BANK_RULES, slots=2)
    for name in ("r8", "r4-rs"):
        bank.add(name, lx.load_adapter(tmp_path / name, PARAMS))
    bank.add("peft", lx.load_peft_adapter(tmp_path / "peft", PARAMS))
    fwd = jax.jit(lx.quaxify(forward))
    names = ["r8", "r4-rs", None, "r8"]
    _check_rows(fwd(lx.loraify(PARAMS, bank, bank.indices(names)), TOKENS), names)
    out = np.asarray(fwd(lx.loraify(PARAMS, bank, bank.indices(["peft"] * B)), TOKENS))
    # PEFT's embedding LoRA leaves the head alone; the head has its own adapter.
    ref = forward(einsum_merge(PARAMS, peft_ad, xp=np), TOKENS)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


# -- an index is bound to the adapter and version it was issued for --------------


def _copies(idx):
    """What a careless server does with the indices it got."""
    return {
        "same object": idx,
        "np.asarray": np.asarray(idx),
        "tolist": np.asarray(idx).tolist(),
        "jnp.array": jnp.array(idx),
        "int64": np.asarray(idx).astype(np.int64),
    }


def _check_stale_r8_rows(out, label):
    """The rows of `["r8", None, "r2", "r8"]` served with indices issued before r8
    left its slot (or changed version)."""
    # Rows 0 and 3 were r8's: r8 is gone, or another version now.
    assert np.isnan(out[[0, 3]]).all(), label
    # The base row and r2's row (its slot never changed) still serve.
    np.testing.assert_allclose(out[1], _reference_row(None, 1), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out[2], _reference_row("r2", 2), rtol=2e-5, atol=2e-5)


@jax.jit
def _serve_traced(p, tokens, i):
    return lx.quaxify(forward)(lx.with_indices(p, i), tokens)


@pytest.mark.parametrize("how", ["evicted", "removed", "re-added", "updated"])
def test_copies_of_old_indices_never_serve_the_slots_new_content(how):
    """However the indices were copied or passed, once their slot's content
    changed they select nothing: concrete, `StaleIndicesError` (at loraify and at
    with_indices); traced through jit, NaN rows, while fresh indices serve."""
    bank = _bank(slots=2, names=["r8", "r2", "r1"])
    old = bank.indices(["r8", None, "r2", "r8"])
    if how == "evicted":
        bank.indices(["r1", "r2"])  # r8 (the least recent) leaves for r1
    elif how == "removed":
        bank.remove("r8")
        bank.indices(["r1", "r2"])  # r1 lands in r8's old slot
    elif how == "re-added":
        bank.remove("r8")
        bank.add("r8", ADAPTERS["r4-rs"])  # same name, other weights
        bank.indices(["r8", "r2"])
    else:
        bank.update("r8", ADAPTERS["r4-rs"])
    first = "r1" if how in ("evicted", "removed") else "r8"
    fresh = bank.indices([first, None, "r2", "r2"])
    fresh_tree = lx.loraify(PARAMS, bank, fresh)
    for label, copy in _copies(old).items():
        with pytest.raises(lx.StaleIndicesError):
            lx.loraify(PARAMS, bank, copy)
        with pytest.raises(lx.StaleIndicesError):
            lx.with_indices(fresh_tree, copy)
        out = np.asarray(
            _serve_traced(fresh_tree, TOKENS, jnp.asarray(np.asarray(copy), jnp.int32))
        )
        _check_stale_r8_rows(out, label)


def test_indices_of_one_bank_never_serve_another():
    """Two banks with the same slots and the same adapters loaded the same way:
    each one's indices select nothing in the other."""
    a, b = _bank(slots=3), _bank(slots=3)
    names = ["r8", "r2", None, "r1"]
    ia, ib = a.indices(names), b.indices(names)
    assert not np.array_equal(ia, ib)
    with pytest.raises(lx.StaleIndicesError, match="not issued by this bank"):
        lx.loraify(PARAMS, b, ia)
    served_b = lx.loraify(PARAMS, b, ib)
    out = np.asarray(_serve_traced(served_b, TOKENS, ia))
    assert np.isnan(out[[0, 1, 3]]).all()
    np.testing.assert_allclose(out[2], _reference_row(None, 2), rtol=2e-5, atol=2e-5)


def test_update_publishes_a_new_version_in_place_without_recompiling():
    bank = _bank(slots=2, names=["r8", "r2"])
    traces = []

    @jax.jit
    def serve(p, tokens):
        traces.append(1)
        return lx.quaxify(forward)(p, tokens)

    assert bank.version("r8") == 1
    idx = bank.indices(["r8", "r2", None, "r8"])
    _check_rows(serve(lx.loraify(PARAMS, bank, idx), TOKENS), ["r8", "r2", None, "r8"])
    slot = bank.loaded["r8"]
    # The new version, from device arrays (as a trainer publishes it).
    new = jax.tree.map(jnp.asarray, ADAPTERS["r1"])
    bank.update("r8", new)
    assert bank.version("r8") == 2 and bank.version("r2") == 1
    assert bank.last_events == (lx.BankEvent("update", "r8", slot),)
    assert bank.loaded["r8"] == slot  # rewritten where it was
    with pytest.raises(lx.StaleIndicesError, match="updated to a new version"):
        lx.loraify(PARAMS, bank, idx)
    idx2 = bank.indices(["r8", "r2", None, "r8"])
    assert bank.last_events == ()  # nothing to load: the slot holds version 2
    out = np.asarray(serve(lx.loraify(PARAMS, bank, idx2), TOKENS))
    for e in (0, 3):  # r8's rows now serve r1's weights
        np.testing.assert_allclose(
            out[e], _reference_row("r1", e), rtol=2e-5, atol=2e-5
        )
    np.testing.assert_allclose(out[1], _reference_row("r2", 1), rtol=2e-5, atol=2e-5)
    assert len(traces) == 1
    # Not loaded: the next batch that names it loads the new weights.
    bank.indices(["r2"])
    bank.update("r2", ADAPTERS["r1"])
    assert bank.version("r2") == 2
    # Removed and added again: the version continues.
    bank.remove("r2")
    bank.add("r2", ADAPTERS["r2"])
    assert bank.version("r2") == 3
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        bank.update("zz", ADAPTERS["r1"])
    with pytest.raises(lx.NonFiniteAdapterError):
        bank.update(
            "r8",
            jax.tree.map(lambda x: x * jnp.nan, ADAPTERS["r1"]),
        )
    assert bank.version("r8") == 2  # a refused update changes nothing


def test_fingerprints_key_adapters_by_content():
    assert (
        ADAPTERS["r8"].fingerprint()
        == jax.tree.map(np.asarray, ADAPTERS["r8"]).fingerprint()
    )
    assert len({ad.fingerprint() for ad in ADAPTERS.values()}) == len(ADAPTERS)


# -- the served step: bank.served(idx) into a jitted step ------------------------


def _served_step():
    traces = []

    @jax.jit
    def step(params, served, tokens):
        traces.append(1)
        return lx.quaxify(forward)(lx.loraify(params, served), tokens)

    return step, traces


def test_served_step_serves_every_row_and_compiles_once():
    """The pattern the Serving page teaches: routing on the host, the bank's arrays
    and the batch's slots passed in as one argument, the tree rebuilt inside the
    trace. A stream of batches with loads, evictions, a remove and an update: each
    row equals its adapter merged in NumPy, with one compile."""
    _adapters_matter()
    bank = _bank(slots=3)
    step, traces = _served_step()
    stream = [
        ["r8", None, "r2", "r8"],
        ["r4-rs", "wq-only", "r1", None],  # evicts all three
        ["no-embed", "r8", "r8", "r2"],
    ]
    for names in stream:
        _check_rows(step(PARAMS, bank.served(bank.indices(names)), TOKENS), names)
    bank.remove("r8")
    bank.update("r2", ADAPTERS["r8"])
    names = [None, "r2", "r1", "r2"]
    out = np.asarray(step(PARAMS, bank.served(bank.indices(names)), TOKENS))
    for e, name in enumerate(names):
        want = _reference_row("r8" if name == "r2" else name, e)
        np.testing.assert_allclose(out[e], want, rtol=2e-5, atol=2e-5)
    assert len(traces) == 1


def test_served_step_per_token_names():
    bank = _bank(slots=3)
    step, _ = _served_step()
    grid = [["r8", "r2", None]] * 2 + [[None, None, "r1"], ["r1", "r1", "r1"]]
    out = np.asarray(step(PARAMS, bank.served(bank.indices(grid)), TOKENS))
    # Token t of row e: the model has no mixing across tokens, so each position
    # equals the row run with that token's adapter.
    for e, row in enumerate(grid):
        for t, name in enumerate(row):
            np.testing.assert_allclose(
                out[e, t], _reference_row(name, e)[t], rtol=2e-5, atol=2e-5
            )


@pytest.mark.parametrize("how", ["evicted", "removed", "updated"])
def test_served_adapters_kept_past_a_change_are_refused(how):
    """`bank.served` made before a slot changed holds arrays the bank rewrote in
    place: passing it to the step raises `StaleIndicesError` with the fix, never
    XLA's "Array has been deleted" and never another adapter's rows."""
    bank = _bank(slots=2, names=["r8", "r2", "r1"])
    step, _ = _served_step()
    served = bank.served(bank.indices(["r8", "r2", None, "r8"]))
    step(PARAMS, served, TOKENS)
    if how == "evicted":
        bank.indices(["r1", "r2"])
    elif how == "removed":
        bank.remove("r8")
    else:
        bank.update("r8", ADAPTERS["r1"])
    with pytest.raises(lx.StaleIndicesError, match=r"right before each step"):
        step(PARAMS, served, TOKENS)


def test_copied_indices_into_served_and_traced_into_the_step():
    """Old indices, however copied, are refused by `bank.served`; passed traced
    into a step that decodes them (`lx.loraify(params, served, idx)` inside), the
    stale rows are NaN and the others serve."""
    bank = _bank(slots=2, names=["r8", "r2", "r1"])
    old = bank.indices(["r8", None, "r2", "r8"])
    bank.indices(["r1", "r2"])  # r8 leaves its slot for r1

    @jax.jit
    def step(params, served, idx, tokens):
        return lx.quaxify(forward)(lx.loraify(params, served, idx), tokens)

    for label, copy in _copies(old).items():
        with pytest.raises(lx.StaleIndicesError, match="issued for 'r8'"):
            bank.served(copy)
        out = np.asarray(
            step(
                PARAMS, bank.served(), jnp.asarray(np.asarray(copy), jnp.int32), TOKENS
            )
        )
        _check_stale_r8_rows(out, label)


def test_served_inside_a_trace_is_refused():
    """Traced, the bank's arrays would be baked into the program as constants,
    and later loads would not reach it: refused, naming the pattern."""
    bank = _bank(slots=3)
    idx = bank.indices(["r8", None, "r2", "r8"])
    with pytest.raises(RuntimeError, match="pass its result in as an argument"):
        jax.jit(lambda p, t: lx.quaxify(forward)(lx.loraify(p, bank, idx), t))(
            PARAMS, TOKENS
        )
    with pytest.raises(RuntimeError, match="outside"):
        jax.jit(lambda i: bank.served(i).scales)(idx)


def test_served_compact_and_its_refusals():
    bank = _bank(slots=4)
    names = ["r8", None, "r8", "r2"]
    served = bank.served(bank.indices(names), compact=True)
    assert served.n_adapters == 2 and served.compact
    step, _ = _served_step()
    _check_rows(step(PARAMS, served, TOKENS), names)
    with pytest.raises(ValueError, match="compacted for one batch"):
        served.with_indices(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="needs the batch's indices"):
        bank.served(compact=True)
    with pytest.raises(TypeError):
        bank.served(np.asarray([0.0, 1.0, 0.0, 1.0]))


def test_stack_served_matches_the_eager_tree():
    """A stack serves through the same contract: `stack.served(idx)` into a
    jitted step equals the eagerly loraified stack, row by row."""
    stack = lx.stack_adapters([ADAPTERS[n] for n in ("r8", "r2", "no-embed")])
    idx = jnp.asarray([2, -1, 0, 1], jnp.int32)
    step, _ = _served_step()
    out = np.asarray(step(PARAMS, stack.served(idx), TOKENS))
    _check_rows(out, ["no-embed", None, "r8", "r2"])
    eager = np.asarray(
        jax.jit(lx.quaxify(forward))(lx.loraify(PARAMS, stack, idx), TOKENS)
    )
    np.testing.assert_array_equal(out, eager)
    with pytest.raises(ValueError, match="stack holds exactly"):
        stack.served(idx, compact=True)
    with pytest.raises(lx.LoraIndexError):
        stack.served(jnp.asarray([3, 0, 0, 0]))


def test_served_takes_fresh_indices_in_any_form_and_no_other_banks():
    """Fresh indices as a list, int64 or unsigned serve the same rows; another
    bank's indices, given to `bank.served` or to a record's `with_indices`, are
    refused; a NaN (float) index never becomes adapter 0."""
    a, b = _bank(slots=3), _bank(slots=3)
    names = ["r8", None, "r2", "r8"]
    ia, ib = a.indices(names), b.indices(names)
    step, _ = _served_step()
    for form in (ia.tolist(), np.asarray(ia, np.int64)):
        _check_rows(step(PARAMS, a.served(form), TOKENS), names)
    # Unsigned indices have no -1: a batch without base rows serves, and -1 cast
    # to uint32 (2**32 - 1) is refused, never wrapped to the base or a slot.
    full = ["r8", "r2", "r2", "r8"]
    _check_rows(
        step(PARAMS, a.served(np.asarray(a.indices(full), np.uint32)), TOKENS), full
    )
    with pytest.raises(lx.LoraIndexError, match="4294967295"):
        a.served(np.asarray(ia).astype(np.uint32))
    with pytest.raises(lx.StaleIndicesError, match="not issued by this bank"):
        a.served(ib)
    with pytest.raises(lx.StaleIndicesError, match="with_indices: index"):
        a.served().with_indices(ib)
    with pytest.raises(TypeError):
        a.served(np.asarray([np.nan, 0.0, 0.0, 0.0]))
