"""Bring your PEFT adapters: from PEFT directories to one mixed batch, and back out.

End to end on a tiny `transformers` Flax Llama (random weights, grouped-query
attention), with PEFT directories this script writes itself exactly as
`PeftModel.save_pretrained` lays them out (`adapter_config.json` +
`adapter_model.safetensors`, `A (r, in)` / `B (out, r)` under
`base_model.model.<module>.lora_A.weight`), so it needs no PyTorch:

1. `lx.load_peft_adapter` reads two adapters with different targets, ranks
   (`rank_pattern`), alphas and rsLoRA, one of them on the embedding;
2. one jitted call serves a batch that mixes both with base-model rows, and every
   row is checked against the model with that adapter merged by NumPy;
3. an Equinox model loads an adapter whose PEFT names differ from its own
   (`key_map`);
4. `lx.save_adapter` / `lx.load_adapter` round-trip the adapters through orbax
   bit-exactly, and `lx.save_peft_adapter` writes them back for PEFT.

Run: `python examples/peft_adapters.py` (needs the test extras, for `transformers`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import lorax_arrays as lx

PREFIX = "base_model.model."


def write_peft_dir(path: Path, config: dict, factors: dict, rng) -> None:
    """A PEFT LoRA directory as PEFT writes it: `factors` maps a torch module name
    to `(in, out, r, kind)`; A and B are drawn at random (B != 0: a trained one)."""
    from safetensors.numpy import save_file

    tensors = {}
    for module, (n_in, n_out, r, kind) in factors.items():
        a = (rng.standard_normal((r, n_in)) * 0.3).astype(np.float32)
        b = (rng.standard_normal((n_out, r)) * 0.3).astype(np.float32)
        if kind == "embedding":
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = a
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = b
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), {"format": "pt"})
    full = {
        "peft_type": "LORA",
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (path / "adapter_config.json").write_text(json.dumps({**full, **config}, indent=2))


def numpy_merged(params: dict, peft_dir: Path) -> dict:
    """The Flax params with a PEFT adapter merged in by NumPy, straight from the
    files (PEFT's rule: `W += s · (B A)`, transposed to the Flax `(in, out)`
    kernel; embeddings `E += s · (B A)ᵀ`)."""
    from safetensors.numpy import load_file

    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    merged = jax.tree.map(lambda x: np.array(x, np.float64), params)
    for key, a in tensors.items():
        if not (key.endswith("lora_A.weight") or key.endswith("lora_embedding_A")):
            continue
        module = key[len(PREFIX) :].rsplit(".lora_", 1)[0]
        b = tensors[
            key.replace("lora_A", "lora_B").replace("embedding_A", "embedding_B")
        ]
        r = a.shape[0]
        name = module.split(".")[-1]
        r_cfg = cfg["rank_pattern"].get(name, cfg["r"])
        alpha = cfg["alpha_pattern"].get(name, cfg["lora_alpha"])
        assert r == r_cfg
        s = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
        node = merged
        for part in module.split("."):
            node = node[part]
        leaf = "embedding" if "embedding" in node else "kernel"
        node[leaf] = node[leaf] + s * (b.astype(np.float64) @ a).T
    return merged


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where to write (temp dir)")
    args = parser.parse_args(argv)
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="peft_adapters_"))
    rng = np.random.default_rng(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k/v_proj are (64, 32)
        vocab_size=128,
        tie_word_embeddings=False,
    )
    model = FlaxLlamaForCausalLM(config, seed=0)
    params = jax.tree.map(np.asarray, model.params)

    # --- 1. Two PEFT directories, as PEFT writes them. -------------------------
    layers = range(config.num_hidden_layers)
    attn = {
        f"model.layers.{i}.self_attn.{m}": (64, n, 8, "linear")
        for i in layers
        for m, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("o_proj", 64))
    }
    write_peft_dir(
        work / "peft" / "support",
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        attn,
        rng,
    )
    mlp = {
        f"model.layers.{i}.mlp.{m}": (
            n_in,
            n_out,
            4 if m == "down_proj" else 6,
            "linear",
        )
        for i in layers
        for m, n_in, n_out in (("gate_proj", 64, 96), ("down_proj", 96, 64))
    }
    mlp["model.embed_tokens"] = (128, 64, 6, "embedding")
    write_peft_dir(
        work / "peft" / "legal",
        {
            "r": 6,
            "lora_alpha": 12,
            "rank_pattern": {"down_proj": 4},
            "alpha_pattern": {"down_proj": 3},
            "use_rslora": True,
            "target_modules": ["gate_proj", "down_proj", "embed_tokens"],
        },
        mlp,
        rng,
    )
    names = ["support", "legal"]
    adapters = [lx.load_peft_adapter(work / "peft" / n, params) for n in names]
    for n, ad in zip(names, adapters):
        print(
            f"loaded PEFT adapter {n!r}: {len(ad.paths)} leaves, "
            f"ranks {sorted(set(ad.ranks))}"
        )

    # --- 2. One jitted call, mixed adapters and base rows. ----------------------
    stack = lx.stack_adapters(adapters, names=names)
    requests = ["support", "legal", None, "legal", "support", None]
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (len(requests), 9)), jnp.int32)
    forward = jax.jit(lx.quaxify(lambda p, ids: model(ids, params=p).logits))
    served = lx.loraify(params, stack, stack.indices(requests))
    print("compiling the mixed batch…")
    logits = np.asarray(forward(served, ids))
    refs = {n: numpy_merged(params, work / "peft" / n) for n in names}
    refs[None] = params
    plain = jax.jit(lambda p, ids: model(ids, params=p).logits)  # no LoRA anywhere
    worst = 0.0
    print(f"{'row':>3}  {'adapter':8} {'relative error vs NumPy-merged':>30}")
    for i, req in enumerate(requests):
        ref_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), refs[req])
        ref = np.asarray(plain(ref_params, ids[i : i + 1]))[0]
        err = float(np.abs(logits[i] - ref).max() / np.abs(ref).max())
        worst = max(worst, err)
        print(f"{i:>3}  {req or 'base':8} {err:>28.2e}")
    print(f"Largest relative deviation from the merged models: {worst:.2e}")

    # --- 3. Equinox, with names of its own: key_map. ---------------------------
    class Block(eqx.Module):
        up: eqx.nn.Linear
        down: eqx.nn.Linear

        def __call__(self, x):
            return self.down(jax.nn.gelu(self.up(x)))

    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    block = Block(eqx.nn.Linear(16, 32, key=k1), eqx.nn.Linear(32, 16, key=k2))
    write_peft_dir(
        work / "peft" / "eqx",
        {"r": 4, "lora_alpha": 8, "target_modules": ["up_proj", "down_proj"]},
        {"mlp.up_proj": (16, 32, 4, "linear"), "mlp.down_proj": (32, 16, 4, "linear")},
        rng,
    )
    key_map = {"mlp.up_proj": "up", "mlp.down_proj": "down"}
    eqx_adapter = lx.load_peft_adapter(work / "peft" / "eqx", block, key_map=key_map)
    y = eqx.filter_jit(lx.quaxify(lambda m, x: jax.vmap(m)(x)))(
        lx.loraify(block, eqx_adapter, jnp.array([0, -1])), jnp.ones((2, 16))
    )
    print(f"Equinox block with key_map: paths {eqx_adapter.paths}, output {y.shape}")

    # --- 4. Orbax round trip, and back to PEFT. ----------------------------------
    lx.save_adapter(work / "orbax" / "legal", adapters[1])
    back = lx.load_adapter(work / "orbax" / "legal", tree=params)
    exact = all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for p in back.paths
        for x, y in zip(back.weights[p], adapters[1].weights[p])
    )
    print(f"orbax round trip bit-exact: {exact}")
    lx.save_peft_adapter(work / "export" / "legal", back)
    again = lx.load_peft_adapter(work / "export" / "legal", params)
    same = all(
        np.array_equal(np.asarray(x), np.asarray(y)) and again.scale(p) == back.scale(p)
        for p in again.paths
        for x, y in zip(again.weights[p], back.weights[p])
    )
    print(
        f"exported to {work / 'export' / 'legal'} for PEFT; reads back the same: {same}"
    )
    assert exact and same and worst < 2e-4
    return worst


if __name__ == "__main__":
    main()
