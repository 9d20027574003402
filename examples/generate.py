"""Greedy decoding with a KV cache: every prompt in the batch has its own adapter.

The model is a small decoder-only transformer written as plain functions of a
parameter dict (no LoRA anywhere in it): a token embedding with a tied output head,
a stack of layers (stacked weights, `lax.scan` over the layer axis) and a KV cache.
Adapters of different ranks adapt the attention and MLP projections and the
embedding; one row runs the base model. Generation (prefill, then one token at a
time in a `lax.scan`) is a single jitted call for the whole batch.

Each row is then generated again alone, with its adapter merged into plain weights;
the greedy tokens must be identical.

Run: python examples/generate.py [--new-tokens 12]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax

import lorax_arrays as lx

VOCAB, D_MODEL, HEADS, LAYERS, D_FF = 64, 32, 4, 2, 64
HEAD_DIM = D_MODEL // HEADS


def init_params(key):
    ks = jr.split(key, 7)
    n = lambda k, shape, fan_in: jr.normal(k, shape) / fan_in**0.5  # noqa: E731
    return {
        "embed": n(ks[0], (VOCAB, D_MODEL), 1.0),
        "layers": {
            "wq": n(ks[1], (LAYERS, D_MODEL, D_MODEL), D_MODEL),
            "wk": n(ks[2], (LAYERS, D_MODEL, D_MODEL), D_MODEL),
            "wv": n(ks[3], (LAYERS, D_MODEL, D_MODEL), D_MODEL),
            "wo": 3 * n(ks[4], (LAYERS, D_MODEL, D_MODEL), D_MODEL),
            "w1": n(ks[5], (LAYERS, D_MODEL, D_FF), D_MODEL),
            "w2": 3 * n(ks[6], (LAYERS, D_FF, D_MODEL), D_FF),
        },
    }


def sinusoid(pos):
    freq = 1.0 / 100.0 ** (jnp.arange(D_MODEL // 2) / (D_MODEL // 2))
    angle = pos[:, None] * freq[None]
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def rms_norm(x):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def forward(params, tokens, cache, start):
    """Runs `tokens` (batch, t) at positions `start ..`, updating the KV cache.

    cache: (layers, 2, batch, max_len, heads, head_dim). Returns the logits of the
    last position and the new cache.
    """
    b, t = tokens.shape
    max_len = cache.shape[3]
    pos = start + jnp.arange(t)
    h = params["embed"][tokens] + sinusoid(pos)  # (b, t, d)
    visible = jnp.arange(max_len)[None, :] <= pos[:, None]  # (t, max_len)

    def layer(h, xs):
        p, kv = xs
        x = rms_norm(h)
        q = (x @ p["wq"]).reshape(b, t, HEADS, HEAD_DIM)
        k = (x @ p["wk"]).reshape(b, t, HEADS, HEAD_DIM)
        v = (x @ p["wv"]).reshape(b, t, HEADS, HEAD_DIM)
        kv = lax.dynamic_update_slice_in_dim(kv, jnp.stack([k, v]), start, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, kv[0]) / HEAD_DIM**0.5
        scores = jnp.where(visible[None, None], scores, -1e30)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), kv[1])
        h = h + att.reshape(b, t, D_MODEL) @ p["wo"]
        h = h + jax.nn.gelu(rms_norm(h) @ p["w1"]) @ p["w2"]
        return h, kv

    h, cache = lax.scan(layer, h, (params["layers"], cache))
    logits = rms_norm(h[:, -1]) @ params["embed"].T  # tied head
    return logits, cache


def generate(params, prompts, new_tokens):
    """Greedy decoding: prefill the prompts, then `new_tokens` single-token steps."""
    b, p = prompts.shape
    cache = jnp.zeros((LAYERS, 2, b, p + new_tokens, HEADS, HEAD_DIM))
    logits, cache = forward(params, prompts, cache, 0)

    def step(carry, i):
        logits, cache = carry
        token = jnp.argmax(logits, axis=-1)
        logits, cache = forward(params, token[:, None], cache, p + i)
        return (logits, cache), token

    _, tokens = lax.scan(step, (logits, cache), jnp.arange(new_tokens))
    return tokens.T  # (batch, new_tokens)


def make_adapters(params, ranks, key):
    adapters = []
    for r, k in zip(ranks, jr.split(key, len(ranks))):
        rules = [
            lx.LoraRule(r"layers/(wq|wv|wo|w1|w2)", rank=r, alpha=2 * r, stack_axes=0),
            lx.LoraRule(r"^embed$", rank=r, in_axes=0, out_axes=1),
        ]
        ad = lx.init_adapter(params, rules, key=k)
        # Pretend they were trained: a random B (init_adapter starts it at zero).
        # Drawn on the host: eager `jr.normal` would compile a kernel per shape.
        rng = np.random.default_rng(np.asarray(jr.key_data(k)).ravel())
        ad = jax.tree.map(
            lambda x, rng=rng: x + (0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
            ad,
        )
        adapters.append(ad)
    return adapters, rules


def main(new_tokens: int = 12, prompt_len: int = 6, seed: int = 0):
    k_params, k_ad, k_prompt = jr.split(jr.PRNGKey(seed), 3)
    params = init_params(k_params)
    names, ranks = ["french", "pirate", "haiku"], [2, 4, 8]
    adapters, rules = make_adapters(params, ranks, k_ad)
    print(lx.match_rules(params, rules))
    stack = lx.stack_adapters(adapters, names=names)

    requests = ["pirate", "french", None, "haiku", "pirate"]  # None = base model
    prompts = jr.randint(k_prompt, (len(requests), prompt_len), 0, VOCAB)
    served = lx.loraify(params, stack, stack.indices(requests))

    run = jax.jit(lx.quaxify(generate), static_argnums=2)
    print("\nCompiling prefill + decode for the whole batch…", flush=True)
    batched = run(served, prompts, new_tokens)

    alone_fn = jax.jit(generate, static_argnums=2)
    print(f"\nGenerated {new_tokens} tokens for {len(requests)} prompts in one batch:")
    all_equal = True
    for e, name in enumerate(requests):
        merged = params if name is None else lx.merge(params, stack[name])
        alone = alone_fn(merged, prompts[e : e + 1], new_tokens)[0]
        same = bool(jnp.array_equal(alone, batched[e]))
        all_equal &= same
        shown = " ".join(f"{int(t):2d}" for t in batched[e])
        verdict = "= alone" if same else f"!= alone: {alone.tolist()}"
        print(f"  row {e} {name or 'base':<7} {shown}   {verdict}")
    base_tokens = alone_fn(params, prompts, new_tokens)
    differ = int(jnp.sum(base_tokens != batched))
    print(
        f"\nIdentical to generating each row alone with its merged model: {all_equal}"
    )
    print(f"Tokens that differ from the base model's: {differ} of {batched.size}")
    return all_equal, differ


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ok, _ = main(args.new_tokens, args.prompt_len, args.seed)
    if not ok:
        raise SystemExit("batched generation differs from generating rows alone")
