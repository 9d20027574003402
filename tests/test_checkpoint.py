"""`save_adapter` / `load_adapter`: bit-exact round trips, atomic saves, corruption.

Every adapter here has random non-zero A and B (drawn with NumPy, in the layout
`lx.init_adapter` gives). Round trips compare the raw bytes of every array. The
atomicity tests kill (SIGKILL) a subprocess in the middle of a save, at each step of
it, and check that the previous checkpoint still loads bit for bit, unchanged; the
corruption tests damage every file of a checkpoint in turn.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays import CheckpointError, load_adapter, save_adapter
from lorax_arrays._io.checkpoint import store
from tests.fast_init import numpy_init
from tests.helpers import assert_base_rows, nonzero

REPO = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------


def random_adapter(tree, rules, seed: int, dtype=None) -> lx.Adapter:
    """`lx.init_adapter`'s layout, with random non-zero A and B."""
    shapes = eqx.filter_eval_shape(
        lx.init_adapter, tree, rules, key=jr.key(0), dtype=dtype
    )
    rng = np.random.default_rng(seed)

    def draw(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jnp.asarray(nonzero(rng, x.shape).astype(x.dtype))

    return jax.tree.map(draw, shapes)


def assert_same(x, y) -> None:
    """Same kind and metadata; every array of the same dtype, shape and bytes."""
    assert type(x) is type(y)
    assert x.layouts == y.layouts
    assert x.ranks == y.ranks
    assert x.alphas == y.alphas
    assert x.use_rslora == y.use_rslora
    pairs = [(x.weights[p], y.weights[p]) for p in x.paths]
    if isinstance(x, lx.AdapterStack):
        assert x.names == y.names
        assert set(x.scales) == set(y.scales)
        pairs += [((x.scales[p],), (y.scales[p],)) for p in x.paths]
    assert set(x.weights) == set(y.weights)
    for xs, ys in pairs:
        for u, v in zip(xs, ys, strict=True):
            u, v = np.asarray(u), np.asarray(v)
            assert u.dtype == v.dtype and u.shape == v.shape
            assert u.tobytes() == v.tobytes()


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` but the lock file."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".lorax_adapter.lock":
            out[p.relative_to(root).as_posix()] = hashlib.sha256(
                p.read_bytes()
            ).hexdigest()
    return out


def checksum(m: dict) -> str:
    """The manifest's checksum, as the format defines it: the SHA-256 of the
    canonical JSON (sorted keys, no spaces) of everything but `checksum`."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def reseal(mpath: Path, m: dict) -> None:
    """Writes `m` to `mpath` as a save would: with its checksum, in the bytes a
    save writes."""
    m["checksum"] = checksum(m)
    mpath.write_text(json.dumps(m, sort_keys=True, indent=1) + "\n")


def checkpoint_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.name != ".lorax_adapter.lock"
    )


# A dict tree with every kind of layout: plain 2-D, a multi-axis output group, a
# stack axis, multi-axis input and output groups, and both at once.
LAYOUT_TREE = {
    "dense": np.zeros((6, 5), np.float32),
    "qkv": np.zeros((6, 3, 4), np.float32),
    "blocks": {"w": np.zeros((2, 5, 6), np.float32)},
    "conv": np.zeros((2, 3, 4, 5), np.float32),
    "scan": np.zeros((3, 4, 2, 5), np.float32),
}
LAYOUT_RULES = [
    lx.LoraRule("^dense$", 3, alpha=6.0),
    lx.LoraRule("^qkv$", 2, in_axes=(0,), out_axes=(1, 2), use_rslora=True),
    lx.LoraRule("^blocks/w$", 4, alpha=1.5, stack_axes=(0,), in_axes=(1,)),
    lx.LoraRule("^conv$", 1, in_axes=(0, 2), out_axes=(1, 3)),
    lx.LoraRule("^scan$", 5, alpha=0.25, stack_axes=(0,), in_axes=(1, 2)),
]


@pytest.fixture(scope="module")
def mlp():
    return numpy_init(eqx.filter_eval_shape(eqx.nn.MLP, 4, 3, 8, 2, key=jr.key(0)), 0)


@pytest.fixture(scope="module")
def mlp_stack(mlp):
    adapters = [
        random_adapter(mlp, lx.LoraRule("layers/[01]", 2), seed=1),
        random_adapter(mlp, [lx.LoraRule("layers/0", 1), lx.LoraRule("", 4)], 2),
        random_adapter(mlp, lx.LoraRule("layers/2", 3, use_rslora=True), seed=3),
    ]
    return lx.stack_adapters(adapters, names=["alpha", "beta", "gamma"])


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_adapter(tmp_path, dtype):
    ad = random_adapter(LAYOUT_TREE, LAYOUT_RULES, seed=0, dtype=dtype)
    ranks = dict(zip(ad.paths, ad.ranks))
    assert ranks == {"dense": 3, "qkv": 2, "blocks/w": 4, "conv": 1, "scan": 5}
    save_adapter(tmp_path / "ck", ad)
    back = load_adapter(tmp_path / "ck", LAYOUT_TREE)
    assert_same(ad, back)
    for a, b in back.weights.values():
        assert isinstance(a, jax.Array) and a.dtype == dtype and b.dtype == dtype


@pytest.fixture(scope="module")
def layout_stack():
    """Three adapters of LAYOUT_TREE with different ranks and sets of leaves."""
    adapters = [
        random_adapter(LAYOUT_TREE, LAYOUT_RULES, seed=1),
        random_adapter(LAYOUT_TREE, LAYOUT_RULES[1:4], seed=2),
        random_adapter(
            LAYOUT_TREE,
            [
                lx.LoraRule("^conv$", 3, in_axes=(0, 2), out_axes=(1, 3)),
                lx.LoraRule("^scan$", 2, stack_axes=(0,), in_axes=(1, 2)),
            ],
            seed=3,
        ),
    ]
    stack = lx.stack_adapters(adapters, names=["one", "two", "three"])
    assert stack.ranks[stack.paths.index("conv")] == (1, 1, 3)
    assert stack.ranks[stack.paths.index("dense")] == (3, 0, 0)
    return stack


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("names", [("one", "two", "three"), None])
def test_round_trip_stack(tmp_path, layout_stack, dtype, names):
    # The same stack in another dtype (cast on the host) and with or without names.
    weights = {
        p: tuple(jnp.asarray(np.asarray(x).astype(dtype)) for x in ab)
        for p, ab in layout_stack.weights.items()
    }
    stack = lx.AdapterStack(
        weights,
        layout_stack.scales,
        layout_stack.layouts,
        layout_stack.ranks,
        layout_stack.alphas,
        layout_stack.use_rslora,
        names,
    )
    save_adapter(str(tmp_path / "ck"), stack)  # a str path works too
    back = load_adapter(str(tmp_path / "ck"), LAYOUT_TREE)
    assert_same(stack, back)
    assert back.weights["conv"][0].dtype == dtype
    assert back.scales["conv"].dtype == jnp.float32


def test_numpy_and_jax_arrays(tmp_path):
    """Adapters holding NumPy arrays save too; loading gives JAX arrays."""
    ad = random_adapter(LAYOUT_TREE, LAYOUT_RULES, seed=4)
    as_numpy = jax.tree.map(np.asarray, ad)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(as_numpy))
    save_adapter(tmp_path / "np", as_numpy)
    save_adapter(tmp_path / "jax", ad)
    from_np, from_jax = load_adapter(tmp_path / "np"), load_adapter(tmp_path / "jax")
    assert_same(ad, from_np)
    assert_same(ad, from_jax)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(from_np))


def test_zero_size_arrays(tmp_path):
    """Orbax cannot store zero-size arrays; the manifest alone describes them."""
    rng = np.random.default_rng(0)
    layouts = (
        lx.LeafLayout("empty", (0, 4), (0,), (1,), ()),
        lx.LeafLayout("full", (3, 4), (0,), (1,), ()),
    )
    weights = {
        "empty": (jnp.zeros((0, 2)), jnp.asarray(nonzero(rng, (2, 4)))),
        "full": (jnp.asarray(nonzero(rng, (3, 1))), jnp.asarray(nonzero(rng, (1, 4)))),
    }
    ad = lx.Adapter(weights, layouts, (2, 1), (2.0, 1.0), (False, False))
    save_adapter(tmp_path / "ck", ad)
    assert_same(ad, load_adapter(tmp_path / "ck"))


def test_loaded_stack_serves(tmp_path, mlp, mlp_stack):
    save_adapter(tmp_path / "ck", mlp_stack)
    back = load_adapter(tmp_path / "ck", mlp)
    assert_same(mlp_stack, back)
    xs = jnp.asarray(nonzero(np.random.default_rng(5), (5, 4)))
    idx = back.indices(["gamma", "alpha", None, "beta", "alpha"])
    run = eqx.filter_jit(lx.quaxify(jax.vmap(lambda m, x: m(x), in_axes=(None, 0))))
    out = np.asarray(run(lx.loraify(mlp, back, idx), xs))
    expected = np.asarray(run(lx.loraify(mlp, mlp_stack, idx), xs))
    base = np.asarray(run(mlp, xs))
    np.testing.assert_array_equal(out, expected)
    assert_base_rows(out[2:3], base[2:3])  # another program: within a few ulps
    assert np.all(np.abs(out[[0, 1, 3, 4]] - base[[0, 1, 3, 4]]).max(axis=1) > 1e-3)
    # One adapter of it, loaded on its own, serves the same rows.
    save_adapter(tmp_path / "one", mlp_stack["beta"])
    one = load_adapter(tmp_path / "one", mlp)
    row = np.asarray(run(lx.loraify(mlp, one, jnp.zeros(1, jnp.int32)), xs[3:4]))
    np.testing.assert_allclose(row[0], out[3], rtol=1e-5, atol=1e-5)


def test_manifest_contents(tmp_path, mlp_stack):
    save_adapter(tmp_path / "ck", mlp_stack)
    m = json.loads((tmp_path / "ck" / "lorax_adapter.json").read_text())
    assert m["format"] == "lorax_arrays.adapter" and m["format_version"] == 1
    assert m["kind"] == "stack" and m["library_version"] == lx.__version__
    assert m["names"] == ["alpha", "beta", "gamma"] and m["n_adapters"] == 3
    leaf = m["leaves"][0]
    assert leaf["path"] == "layers/0/weight" and leaf["shape"] == [8, 4]
    assert leaf["in_axes"] == [1] and leaf["out_axes"] == [0]
    assert leaf["stack_axes"] == [] and leaf["ranks"] == [2, 1, 0]
    a = np.asarray(mlp_stack.weights["layers/0/weight"][0])
    assert leaf["arrays"]["a"]["dtype"] == "float32"
    assert leaf["arrays"]["a"]["shape"] == list(a.shape)
    assert leaf["arrays"]["a"]["sha256"] == hashlib.sha256(a.tobytes()).hexdigest()
    # The checksum and the bytes are those the format defines.
    assert m["checksum"] == checksum(m)
    text = (tmp_path / "ck" / "lorax_adapter.json").read_text()
    assert text == json.dumps(m, sort_keys=True, indent=1) + "\n"
    arrays_dir = tmp_path / "ck" / m["arrays_dir"]
    assert set(m["files"]) == {
        p.relative_to(arrays_dir).as_posix() for p in checkpoint_files(arrays_dir)
    }


def test_the_schema_covers_every_field():
    """The manifest is derived from the types' fields: each array field has its
    roles, each static field is per-leaf metadata with a JSON type or one of the
    whole-adapter fields. A field added to either type fails here until the schema
    knows how to write it (instead of being silently dropped by saves)."""
    import dataclasses

    from lorax_arrays._io.checkpoint import manifest

    for cls in (lx.Adapter, lx.AdapterStack):
        for f in dataclasses.fields(cls):
            if f.metadata.get("static"):
                assert f.name in (*manifest._WHOLE, *manifest._PER_LEAF), f.name
            else:
                assert f.name in manifest._ARRAY_FIELDS, f.name


def test_resave_replaces_and_cleans_up(tmp_path, mlp, mlp_stack):
    root = tmp_path / "ck"
    save_adapter(root, mlp_stack)
    v2 = random_adapter(mlp, lx.LoraRule("layers", 2), seed=9)
    save_adapter(root, v2)
    assert_same(v2, load_adapter(root))
    names = sorted(os.listdir(root))
    assert len(names) == 3 and names[0] == ".lorax_adapter.lock"
    assert names[1].startswith("arrays-") and names[2] == "lorax_adapter.json"


def test_rejects_non_adapters(tmp_path, mlp):
    with pytest.raises(TypeError, match="Adapter"):
        save_adapter(tmp_path / "ck", mlp)
    assert not (tmp_path / "ck").exists()


# -- refusing to overwrite what is not ours --------------------------------------------


def test_refuses_a_file(tmp_path, mlp_stack):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"user data")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_adapter(f, mlp_stack)
    assert f.read_bytes() == b"user data"


def test_refuses_a_foreign_directory(tmp_path, mlp_stack):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a lorax_arrays checkpoint"):
        save_adapter(d, mlp_stack)
    assert os.listdir(d) == ["notes.txt"] and (d / "notes.txt").read_text() == "keep me"


def test_accepts_empty_dirs_and_leftovers_of_a_first_save(tmp_path, mlp_stack):
    d = tmp_path / "empty"
    d.mkdir()
    save_adapter(d, mlp_stack)
    assert_same(mlp_stack, load_adapter(d))
    # What a first save killed before its manifest leaves behind.
    d = tmp_path / "killed"
    (d / f"arrays-{'0' * 32}.orbax-checkpoint-tmp-123").mkdir(parents=True)
    (d / f"arrays-{'1' * 32}").mkdir()
    (d / ".lorax_adapter.lock").touch()
    with pytest.raises(CheckpointError, match="no lorax_arrays checkpoint at"):
        load_adapter(d)
    save_adapter(d, mlp_stack)
    assert_same(mlp_stack, load_adapter(d))
    assert len(os.listdir(d)) == 3


# -- missing, damaged and newer checkpoints --------------------------------------------


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no lorax_arrays checkpoint at") as e:
        load_adapter(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no lorax_arrays checkpoint at"):
        load_adapter(tmp_path / "empty")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mlp_stack):
    root = tmp_path_factory.mktemp("saved") / "ck"
    save_adapter(root, mlp_stack)
    return root


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_every_flipped_byte_is_caught(saved, tmp_path, mlp_stack):
    """One byte flipped in any file (at its start, middle or end): an error that
    names that file, never an adapter with other values."""
    files = [p.relative_to(saved) for p in checkpoint_files(saved)]
    assert len(files) > 5 and Path("lorax_adapter.json") in files
    for rel in files:
        size = (saved / rel).stat().st_size
        for pos in sorted({0, size // 2, size - 1}):
            root = _copy(saved, tmp_path)
            data = bytearray((root / rel).read_bytes())
            data[pos] ^= 0xFF
            (root / rel).write_bytes(bytes(data))
            with pytest.raises(CheckpointError) as e:
                load_adapter(root)
            msg = str(e.value)
            assert str(root / rel) in msg, (rel, pos, msg)
            assert "backup" in msg and "Re-save" in msg
            shutil.rmtree(root)
    assert_same(mlp_stack, load_adapter(saved))


def test_truncated_deleted_and_extra_files_are_caught(saved, tmp_path):
    for p in checkpoint_files(saved):
        rel = p.relative_to(saved)
        root = _copy(saved, tmp_path)
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError) as e:
            load_adapter(root)
        assert str(root / rel) in str(e.value), rel
        (root / rel).unlink()
        if rel.name == "lorax_adapter.json":
            match = "no lorax_arrays checkpoint at"
        else:
            match = "missing"
        with pytest.raises(CheckpointError, match=match) as e:
            load_adapter(root)
        assert str(root / rel if match == "missing" else root) in str(e.value)
        shutil.rmtree(root)
    root = _copy(saved, tmp_path)
    m = json.loads((root / "lorax_adapter.json").read_text())
    extra = root / m["arrays_dir"] / "d" / "stray"
    extra.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not part of the checkpoint") as e:
        load_adapter(root)
    assert str(extra) in str(e.value)
    shutil.rmtree(root / m["arrays_dir"])
    with pytest.raises(CheckpointError, match="arrays directory") as e:
        load_adapter(root)
    assert str(root / m["arrays_dir"]) in str(e.value)


def test_restored_arrays_are_checked(saved, monkeypatch):
    """Past orbax, each array is checked against its own checksum."""
    read = store.read_arrays

    def tampered(*args):
        out = dict(read(*args))
        key = sorted(out)[0]
        x = np.array(out[key])
        x.reshape(-1)[0] += 1
        out[key] = x
        return out

    monkeypatch.setattr(store, "read_arrays", tampered)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_adapter(saved)


def test_edited_manifest_is_caught(saved, tmp_path):
    root = _copy(saved, tmp_path)
    mpath = root / "lorax_adapter.json"
    m = json.loads(mpath.read_text())
    # Valid JSON, same bytes otherwise: the checksum catches it.
    m["leaves"][0]["alphas"][0] = 3.0
    mpath.write_text(json.dumps(m, sort_keys=True, indent=1) + "\n")
    with pytest.raises(CheckpointError, match="checksum") as e:
        load_adapter(root)
    assert str(mpath) in str(e.value)
    # Same content, other bytes (re-indented).
    m = json.loads((saved / "lorax_adapter.json").read_text())
    mpath.write_text(json.dumps(m, sort_keys=True, indent=2) + "\n")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_adapter(root)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(arrays_dir="../elsewhere"),
        lambda m: m["leaves"][0].update(shape=[8, 5]),
        lambda m: m["leaves"][0].update(in_axes=[2]),
        lambda m: m["leaves"][1].update(path=m["leaves"][0]["path"]),
        lambda m: m["leaves"][0].pop("ranks"),
        lambda m: m.update(names=["just one"]),
    ],
)
def test_malformed_manifest_is_caught(saved, tmp_path, edit):
    """A manifest with a valid checksum but inconsistent content (not something a
    save writes) is an error too, not a crash or a wrong adapter."""
    root = _copy(saved, tmp_path)
    mpath = root / "lorax_adapter.json"
    m = json.loads(mpath.read_text())
    edit(m)
    reseal(mpath, m)
    with pytest.raises(CheckpointError, match="malformed") as e:
        load_adapter(root)
    assert str(mpath) in str(e.value)


def test_newer_format_is_refused(saved, tmp_path):
    root = _copy(saved, tmp_path)
    mpath = root / "lorax_adapter.json"
    m = json.loads(mpath.read_text())
    m["format_version"] = 99
    # A flipped digit (the checksum no longer matches) is damage, not a newer
    # format: the checksum is checked before any field is trusted.
    mpath.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_adapter(root)
    # A manifest a newer lorax_arrays wrote (its checksum matches).
    m["checksum"] = checksum(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format 99.*Upgrade lorax_arrays"):
        load_adapter(root)
    m["format"] = "something.else"
    mpath.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="not a lorax_arrays adapter manifest"):
        load_adapter(root)


# -- validating against the model ------------------------------------------------------


def test_tree_validation(saved, mlp, mlp_stack):
    assert_same(mlp_stack, load_adapter(saved, mlp))
    # Another width: a shape mismatch, naming the path and both shapes.
    wider = eqx.filter_eval_shape(eqx.nn.MLP, 4, 3, 16, depth=2, key=jr.key(0))
    with pytest.raises(ValueError, match=r"\(8, 4\) at 'layers/0/weight'.*\(16, 4\)"):
        load_adapter(saved, wider)
    # Another depth: a path the model lacks.
    shallow = eqx.filter_eval_shape(eqx.nn.MLP, 4, 3, 8, depth=1, key=jr.key(0))
    with pytest.raises(ValueError, match="'layers/2/weight'.*no weight there"):
        load_adapter(saved, shallow)
    # A renamed leaf: the error suggests the close match.
    tree = {"layers": {"0": {"weight": np.zeros((8, 4), np.float32)}}}
    ad = random_adapter(tree, lx.LoraRule("weight", 2), seed=0)
    save_adapter(saved.parent / "dict", ad)
    renamed = {"layers": {"0": {"weights": np.zeros((8, 4), np.float32)}}}
    with pytest.raises(ValueError, match="Did you mean 'layers/0/weights'"):
        load_adapter(saved.parent / "dict", renamed)
    assert_same(ad, load_adapter(saved.parent / "dict", tree))


# -- a save killed half way ------------------------------------------------------------

# Runs in a fresh interpreter, which imports everything once and then forks one
# child per kill point (nothing has started JAX or any thread pool but OpenBLAS's
# yet, so forking is safe). Each child stalls its save at its point, after writing
# a marker with its pid, so that the test can SIGKILL it there.
_KILLED_SAVES = textwrap.dedent(
    """
    import os, pickle, sys, time, traceback
    from pathlib import Path

    import orbax.checkpoint
    from orbax.checkpoint._src.path import atomicity

    import lorax_arrays as lx
    from lorax_arrays._io.checkpoint import store

    adapter_file, base, *points = sys.argv[1:]
    adapter = pickle.loads(Path(adapter_file).read_bytes())

    def run(point):
        here = Path(base, point)

        def signal(text):
            (here / "marker.tmp").write_text(text)
            os.replace(here / "marker.tmp", here / "marker")

        def stall(*args, **kwargs):
            signal(f"{point} {os.getpid()}")
            time.sleep(120)

        if point == "orbax_rename":

            async def finalize(self, *args, **kwargs):
                stall()

            atomicity.AtomicRenameTemporaryPath.finalize = finalize
        else:
            setattr(store, point, stall)
        lx.save_adapter(here / "ck", adapter)
        signal("finished")

    children = []
    for point in points:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(Path(base, point, "log"), os.O_WRONLY | os.O_CREAT)
                os.dup2(log, 1)
                os.dup2(log, 2)
                run(point)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    """
)

# Where the save is killed, and which version must load afterwards.
KILL_POINTS = {
    "_write_arrays": "v1",  # before orbax writes anything
    "orbax_rename": "v1",  # orbax's temporary directory written, not yet renamed
    "_fsync_tree": "v1",  # the new arrays directory complete, no manifest yet
    "_replace": "v1",  # the new manifest written to a temporary file
    "_remove_leftovers": "v2",  # the manifest replaced; old arrays not yet removed
}


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory, mlp_stack):
    """Each KILL_POINT: a v1 checkpoint and a save of v2 over it, killed there."""
    base = tmp_path_factory.mktemp("killed")
    v1 = mlp_stack
    # Other factors and names (made on the host: no eager JAX compiles); the
    # scales stay those of the alphas and ranks, which a load cross-checks.
    v2 = lx.AdapterStack(
        jax.tree.map(lambda x: np.asarray(x) * -2 + 0.5, v1.weights),
        jax.tree.map(np.asarray, v1.scales),
        v1.layouts,
        v1.ranks,
        v1.alphas,
        v1.use_rslora,
        ("x", "y", "z"),
    )
    adapter_file = base / "v2.pkl"
    adapter_file.write_bytes(pickle.dumps(jax.tree.map(np.asarray, v2)))
    script = base / "killed_saves.py"
    script.write_text(_KILLED_SAVES)
    before = {}
    for point in KILL_POINTS:
        save_adapter(base / point / "ck", v1)
        before[point] = digests(base / point / "ck")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    args = [sys.executable, str(script), str(adapter_file), str(base), *KILL_POINTS]
    server = subprocess.Popen(args, cwd=REPO, env=env)
    reached, pending = {}, set(KILL_POINTS)
    deadline = time.monotonic() + 120
    try:
        while pending and server.poll() is None and time.monotonic() < deadline:
            for point in sorted(pending):
                marker = base / point / "marker"
                if not marker.exists():
                    continue
                text = marker.read_text().split()
                if text[0] == point:
                    os.kill(int(text[1]), signal.SIGKILL)
                reached[point] = text[0]
                pending.discard(point)
            time.sleep(0.02)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
    results = {}
    for point in KILL_POINTS:
        log = base / point / "log"
        output = log.read_text() if log.exists() else ""
        results[point] = (
            base / point / "ck",
            before[point],
            reached.get(point),
            output,
        )
    return v1, v2, results


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_save_leaves_a_loadable_checkpoint(killed_saves, point):
    v1, v2, results = killed_saves
    root, before, reached, output = results[point]
    assert reached == point, f"the save never stalled at {point}:\n{output[-3000:]}"
    expected = KILL_POINTS[point]
    loaded = load_adapter(root)
    assert_same(v1 if expected == "v1" else v2, loaded)
    names = os.listdir(root)
    if expected == "v1":
        # Unchanged: every file of version 1 still there with the same bytes.
        after = digests(root)
        assert {k: after.get(k) for k in before} == before
        leftovers = {
            "orbax_rename": ".orbax-checkpoint-tmp",
            "_fsync_tree": "arrays-",
            "_replace": ".lorax_adapter.json.tmp-",
        }
        if point in leftovers:  # the kill really came in the middle of the save
            n = sum(leftovers[point] in name for name in names)
            assert n == (2 if point == "_fsync_tree" else 1), names
    else:
        assert sum(name.startswith("arrays-") for name in names) == 2
    # A later save that completes wins, and clears the leftovers.
    # (Other factors; the scales must stay those of the alphas and ranks.)
    v3 = eqx.tree_at(
        lambda s: s.weights, v1, jax.tree.map(lambda x: np.asarray(x) + 1, v1.weights)
    )
    save_adapter(root, v3)
    assert_same(v3, load_adapter(root))
    assert sorted(os.listdir(root))[0::2] == [
        ".lorax_adapter.lock",
        "lorax_adapter.json",
    ]
    assert len(os.listdir(root)) == 3


# -- LoRA variants (DoRA, IA3) ---------------------------------------------------------


VARIANT_TREE = {
    "dense": np.ones((6, 5), np.float32),
    "blocks": {"w": np.ones((2, 5, 6), np.float32)},
    "k": np.ones((6, 4), np.float32),
    "ff": np.ones((4, 6), np.float32),
    "plain": np.ones((5, 5), np.float32),
}
VARIANT_RULES = [
    lx.LoraRule("^dense$", 3, alpha=6.0, variant="dora"),
    lx.LoraRule("^blocks/w$", 2, stack_axes=(0,), in_axes=(1,), variant="dora"),
    lx.LoraRule("^k$", 0, variant="ia3"),
    lx.LoraRule("^ff$", 0, variant="ia3_feedforward"),
    lx.LoraRule("^plain$", 2),
]


def assert_same_vectors(x, y) -> None:
    for field in ("magnitudes", "in_scales", "out_scales"):
        xs, ys = getattr(x, field), getattr(y, field)
        assert set(xs) == set(ys), field
        for p in xs:
            u, v = np.asarray(xs[p]), np.asarray(ys[p])
            assert u.dtype == v.dtype and u.shape == v.shape
            assert u.tobytes() == v.tobytes()


@pytest.fixture(scope="module")
def variant_adapter():
    ad = random_adapter(VARIANT_TREE, VARIANT_RULES, seed=5)
    assert [ad.kind(p) for p in ad.paths] == ["dora", "dora", "ia3", "ia3", "lora"]
    return ad


def test_round_trip_variant_adapter(tmp_path, variant_adapter):
    ad = variant_adapter
    save_adapter(tmp_path / "ck", ad)
    m = json.loads((tmp_path / "ck" / "lorax_adapter.json").read_text())
    assert m["format_version"] == 2
    back = load_adapter(tmp_path / "ck", VARIANT_TREE)
    assert_same(ad, back)
    assert_same_vectors(ad, back)
    assert [back.kind(p) for p in back.paths] == [ad.kind(p) for p in ad.paths]
    assert back.weights["k"][0].shape == (6, 0)  # rank 0: nothing stored


def test_round_trip_variant_stack(tmp_path, variant_adapter):
    plain = random_adapter(VARIANT_TREE, lx.LoraRule("^(k|plain)$", 1), seed=6)
    stack = lx.stack_adapters([plain, variant_adapter, plain], names=["p", "v", "q"])
    save_adapter(tmp_path / "ck", stack)
    back = load_adapter(tmp_path / "ck")
    assert_same(stack, back)
    assert_same_vectors(stack, back)
    assert back.variants == stack.variants
    assert back.variants[back.paths.index("k")] == (
        (False, False, False),
        (False, False, True),
        (False, False, False),
    )
    assert_same_vectors(stack[1], back[1])
    # A plain stack round-trips as before, in format 1.
    save_adapter(tmp_path / "plain", lx.stack_adapters([plain]))
    m = json.loads((tmp_path / "plain" / "lorax_adapter.json").read_text())
    assert m["format_version"] == 1 and "variants" not in m["leaves"][0]


def test_variant_vectors_are_checked(tmp_path, variant_adapter):
    stack = lx.stack_adapters([variant_adapter])
    root = tmp_path / "ck"
    save_adapter(root, stack)
    mpath = root / "lorax_adapter.json"
    good = json.loads(mpath.read_text())

    def leaf(m, path):
        return next(x for x in m["leaves"] if x["path"] == path)

    def rewrite(edit):
        m = json.loads(json.dumps(good))
        edit(m)
        reseal(mpath, m)

    # Flags that disagree with the arrays saved.
    rewrite(lambda m: leaf(m, "k").update(variants=[[True, False, False]]))
    with pytest.raises(CheckpointError, match="malformed.*arrays"):
        load_adapter(root)
    # A vector of the wrong shape for its layout.
    rewrite(lambda m: leaf(m, "dense")["arrays"]["magnitude"].update(shape=[1, 6]))
    with pytest.raises(CheckpointError, match="magnitude has shape"):
        load_adapter(root)
    # A vector's checksum.
    rewrite(lambda m: leaf(m, "ff")["arrays"]["in_scale"].update(sha256="0" * 64))
    with pytest.raises(CheckpointError, match="'in_scale' array of 'ff'.*checksum"):
        load_adapter(root)
    rewrite(lambda m: None)
    assert_same_vectors(stack, load_adapter(root))


# -- identity: fingerprints, redundant fields, odd lock files -------------------------


def test_fingerprints_are_stored_and_survive_the_round_trip(tmp_path, mlp, mlp_stack):
    ad = mlp_stack[1]
    save_adapter(tmp_path / "one", ad)
    back = load_adapter(tmp_path / "one", mlp)
    assert back.fingerprint() == ad.fingerprint()
    assert back.fingerprint().startswith("sha256:")
    manifest = json.loads((tmp_path / "one" / "lorax_adapter.json").read_text())
    assert manifest["fingerprint"] == ad.fingerprint()
    # Different values, different fingerprints.
    assert len({mlp_stack[i].fingerprint() for i in range(len(mlp_stack))}) == 3
    a, b = ad.weights[ad.paths[0]]
    nudged = eqx.tree_at(
        lambda x: x.weights[ad.paths[0]][0], ad, a.at[(0,) * a.ndim].add(1e-3)
    )
    assert nudged.fingerprint() != ad.fingerprint()


def test_a_manifest_whose_fingerprint_disagrees_is_refused(tmp_path, mlp_stack):
    """Arrays that pass their checksums but are not the adapter that was saved
    (a manifest edited, or arrays swapped with a correctly re-checksummed set)."""
    save_adapter(tmp_path / "ck", mlp_stack)
    mpath = tmp_path / "ck" / "lorax_adapter.json"
    m = json.loads(mpath.read_text())
    m["fingerprints"][1] = "sha256:" + "0" * 64
    reseal(mpath, m)
    with pytest.raises(CheckpointError, match="adapter 1.*fingerprint"):
        load_adapter(tmp_path / "ck")


def test_stack_scales_must_agree_with_alphas(tmp_path, mlp_stack):
    path = mlp_stack.paths[0]
    wrong = eqx.tree_at(
        lambda s: s.scales[path], mlp_stack, mlp_stack.scales[path] * 2.0
    )
    save_adapter(tmp_path / "ck", wrong)
    with pytest.raises(CheckpointError, match="stored scales"):
        load_adapter(tmp_path / "ck")


def test_a_stack_with_a_head_only_adapter_round_trips(tmp_path):
    """A head-only adapter has scale 0 in its stack's scales (lookups see the
    base) and its own in `head_scales`: a load's cross-check expects that."""
    ad = random_adapter(LAYOUT_TREE, LAYOUT_RULES[:1], seed=7)
    head = lx.Adapter(
        ad.weights, ad.layouts, ad.ranks, ad.alphas, ad.use_rslora, head_only=(True,)
    )
    stack = lx.stack_adapters([head, ad], names=["head", "plain"])
    save_adapter(tmp_path / "ck", stack)
    back = load_adapter(tmp_path / "ck", LAYOUT_TREE)
    assert_same(stack, back)
    assert back.head_only == stack.head_only == ((True, False),)
    assert back["head"].fingerprint() == head.fingerprint()


def test_a_lock_file_that_is_a_fifo_is_an_error_not_a_hang(tmp_path, mlp_stack):
    save_adapter(tmp_path / "ck", mlp_stack)
    lock = tmp_path / "ck" / ".lorax_adapter.lock"
    lock.unlink(missing_ok=True)
    os.mkfifo(lock)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_adapter(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a regular file"):
        save_adapter(tmp_path / "ck", mlp_stack)
