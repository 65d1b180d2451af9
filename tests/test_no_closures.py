"""No jitted library function closes over an array.

On several processes (`jax.distributed`) parameters are global arrays spanning devices this process
cannot address, and `jax.jit` refuses to embed such an array as a constant of its program ("Closing
over jax.Array that spans non-addressable (non process local) devices is not allowed"). A jitted
function that reads parameters from an enclosing scope therefore runs on one process and crashes on
two. Two checks keep pjlm's jitted functions taking their arrays as arguments:

- traced: the programs a library call runs (`jax.make_jaxpr` of the call, every `jit` inside it)
  embed no array of more than a few elements, for the reward-model scorer PPO and `pjlm.evaluate`
  call on parameters sharded over the 8-device mesh;
- source: every function pjlm hands to `jax.jit` (a lambda, a nested `def`, a `functools.partial`)
  reads from enclosing scopes only names of static things (models, configs, optimizers, functions),
  and no `functools.partial` under jit binds an argument named like an array.

The multi-process run itself is `tests/test_launch.py`'s PPO with two reward models.
"""

from __future__ import annotations

import ast
import re
import symtable
from pathlib import Path

import jax
import numpy as np
import pytest

from pjlm_testing import tiny_config
from pjlm import scorers, sharding
from pjlm.model import Transformer

PJLM = Path(__file__).resolve().parents[1] / "pjlm"
MAX_CONSTANT = 16
"""The most elements a constant embedded in a jitted program may have (an iota, a small table)."""


def _inner_jaxprs(jaxpr):
    """Every closed jaxpr nested in `jaxpr`'s equations (jit, scan, cond, custom rules), depth first."""
    for eqn in jaxpr.eqns:
        stack = list(eqn.params.values())
        while stack:
            value = stack.pop()
            if isinstance(value, (tuple, list)):
                stack.extend(value)
            elif hasattr(value, "consts") and hasattr(value, "jaxpr"):  # a ClosedJaxpr
                yield value
                yield from _inner_jaxprs(value.jaxpr)
            elif hasattr(value, "eqns"):  # an open Jaxpr
                yield from _inner_jaxprs(value)


def embedded_arrays(fn, *args) -> list[str]:
    """The arrays of more than MAX_CONSTANT elements, or on more than one device, that the jitted
    programs `fn(*args)` runs embed as constants: what their functions close over. The traced call's
    own constants (the arrays the host code passes in as arguments) are not counted."""
    found = []
    for closed in _inner_jaxprs(jax.make_jaxpr(fn)(*args).jaxpr):
        for c in closed.consts:
            devices = len(c.sharding.device_set) if isinstance(c, jax.Array) else 1
            if np.size(c) > MAX_CONSTANT or devices > 1:
                found.append(f"{type(c).__name__} {np.shape(c)} {getattr(c, 'dtype', '')} on {devices} device(s)")
    return found


@pytest.fixture(scope="module")
def reward_model():
    """A reward model as `scorers.load_reward_model` gives one (full or LoRA, its adapters merged into
    plain parameters): the tiny scalar-head model, its parameters sharded over the 8-device mesh."""
    config = tiny_config(train=dict(phase="reward"))
    mesh = sharding.make_mesh(config.mesh)
    model = Transformer(config.model, head="scalar")
    abstract, shardings = sharding.abstract_params(model, mesh)  # placed as a restore places them
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a, sh: jax.device_put(
        (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), sh), abstract, shardings)
    rm = scorers.RewardModel(name="rm", path="", config=config, model=model, params=params, tokenizer=None,
                             mean=0.0, std=1.0)
    return rm, mesh


def _rollout(mesh, B: int = 8, P: int = 4, T: int = 6) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[left-padded prompt | right-padded response] rows in the tiny vocabulary, sharded like a rollout."""
    rng = np.random.default_rng(0)
    prompt_mask_BP = (np.arange(P)[None] >= rng.integers(0, P, (B, 1))).astype(np.int32)
    response_mask_BT = (np.arange(T)[None] < rng.integers(1, T + 1, (B, 1))).astype(np.int32)
    tokens_BS = rng.integers(3, 256, (B, P + T)).astype(np.int32)
    return tuple(sharding.shard_batch(x, mesh) for x in (tokens_BS, prompt_mask_BP, response_mask_BT))


def test_the_reward_model_scorer_takes_its_parameters_as_an_argument(reward_model):
    rm, mesh = reward_model
    rows = _rollout(mesh)
    assert embedded_arrays(rm.score_tokens, *rows) == []
    # (Its scores are checked against the model's forward in tests/train/test_reward_models.py.)


def test_the_reward_model_scorer_compiles_once_per_model_and_shape(reward_model):
    rm, mesh = reward_model
    rows = _rollout(mesh)
    rm.score_tokens(*rows)
    compiled = scorers._score_rows._cache_size()
    # Another call, and another RewardModel of the same architecture: no new program.
    twin = scorers.RewardModel(**{**rm.__dict__, "name": "twin"})
    jax.block_until_ready((rm.score_tokens(*rows), twin.score_tokens(*rows)))
    assert scorers._score_rows._cache_size() == compiled


def test_embedded_arrays_sees_a_closure_over_parameters(reward_model):
    """The traced check itself: a jit that reads the parameters from its scope is caught."""
    rm, mesh = reward_model
    closed = jax.jit(lambda tokens: rm.model.apply({"params": rm.params}, tokens))
    found = embedded_arrays(closed, _rollout(mesh)[0])
    leaves = jax.tree_util.tree_leaves(rm.params)
    assert len(found) == len(leaves) and all(f.endswith("on 8 device(s)") for f in found), found


# --- source: what pjlm hands to jax.jit ---

STATIC_NAME = re.compile(r"^(\w+_)?(model|cfg|config|fn)$|^tx(_\w+)?$|^(schedule|run)$")
"""Names that hold static things by pjlm's conventions: models, configs, optimizers, functions, and a
`run` (read for its model and config). Anything else a jitted function reads from an enclosing
function's scope may be an array, and must be an argument instead."""
ARRAY_NAME = re.compile(r"(^|_)(params|frozen|state|weights|ref|rng|key|tokens)(_|$)|_[A-Z]{1,4}$")
"""Names of arrays: parameters, states, keys, shape-named tensors."""


def _is_jax_jit(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "jit" and isinstance(node.value, ast.Name)
            and node.value.id == "jax") or (isinstance(node, ast.Name) and node.id == "jit")


def _is_partial(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == "partial") or
        (isinstance(node.func, ast.Name) and node.func.id == "partial"))


def _is_jit(node: ast.AST, aliases: set[str]) -> bool:
    """`jax.jit`, `functools.partial(jax.jit, …)`, or a name assigned one of those in this file."""
    return _is_jax_jit(node) or (_is_partial(node) and bool(node.args) and _is_jax_jit(node.args[0])) or (
        isinstance(node, ast.Name) and node.id in aliases)


class _JitSites(ast.NodeVisitor):
    """The functions a module hands to jit: (the function's node, or a bound argument's, and what
    to check: "closure" or the name it binds)."""

    def __init__(self, tree: ast.Module):
        self.aliases = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and
                        _is_jit(node.value, set()) for t in node.targets if isinstance(t, ast.Name)}
        self.nested: dict[str, list[ast.AST]] = {}  # functions defined (or lambdas named) inside functions
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(fn):
                    if inner is not fn and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.nested.setdefault(inner.name, []).append(inner)
                    elif isinstance(inner, ast.Assign) and isinstance(inner.value, ast.Lambda):
                        for t in inner.targets:
                            if isinstance(t, ast.Name):
                                self.nested.setdefault(t.id, []).append(inner.value)
        self.sites: list[tuple[ast.AST, str]] = []
        self.visit(tree)

    def visit_Call(self, node: ast.Call):
        if _is_jit(node.func, self.aliases) and node.args:
            self._jitted(node.args[0])
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef):
        if any(_is_jit(d, self.aliases) for d in node.decorator_list):
            self.sites.append((node, "closure"))
        self.generic_visit(node)

    def _jitted(self, fn: ast.AST):
        if isinstance(fn, ast.Lambda):
            self.sites.append((fn, "closure"))
        elif isinstance(fn, ast.Name):
            self.sites.extend((d, "closure") for d in self.nested.get(fn.id, []))
        elif _is_partial(fn) and fn.args:
            self._jitted(fn.args[0])
            bound = [(kw.value, kw.arg) for kw in fn.keywords if kw.arg] + \
                [(a, a.id) for a in fn.args[1:] if isinstance(a, ast.Name)]
            self.sites.extend((node, name) for node, name in bound if ARRAY_NAME.search(name))


def _function_tables(source: str, path: Path) -> dict[tuple[int, str], list[symtable.SymbolTable]]:
    """Every function scope of a module's symbol table by (line, name) ("lambda" for a lambda)."""
    tables, stack = {}, [symtable.symtable(source, str(path), "exec")]
    while stack:
        table = stack.pop()
        if table.get_type() == "function":
            tables.setdefault((table.get_lineno(), table.get_name()), []).append(table)
        stack.extend(table.get_children())
    return tables


def _enclosing_names(tables: list[symtable.SymbolTable]) -> set[str]:
    """The names a function reads from enclosing functions' scopes. Functions of one name that start
    on one line (a lambda inside a lambda) are taken together: what one binds, the others may read."""
    frees = set().union(*(t.get_frees() for t in tables))
    return frees - set().union(*(t.get_locals() for t in tables))


def jit_closures(path: Path, root: Path = PJLM.parent) -> list[str]:
    """Where `path` hands jit a function that reads a non-static name from an enclosing function, or
    a partial that binds an array-named argument: 'file:line: …' each, the file relative to `root`."""
    source = path.read_text()
    tables = _function_tables(source, path)
    found = []
    for node, check in _JitSites(ast.parse(source, str(path))).sites:
        where = f"{path.relative_to(root)}:{node.lineno}"
        if check != "closure":
            found.append(f"{where}: a partial under jax.jit binds {check}=, an array: pass it as an argument")
            continue
        name = "lambda" if isinstance(node, ast.Lambda) else node.name
        frees = _enclosing_names(tables[(node.lineno, name)])
        found.extend(f"{where}: the jitted {name} reads {free!r} from its enclosing function: pass it as an "
                     "argument (or, if it is static, name it as tests/test_no_closures.py's STATIC_NAME says)"
                     for free in sorted(frees) if not STATIC_NAME.search(free))
    return found


def test_no_function_pjlm_jits_closes_over_a_non_static_name():
    files = sorted(PJLM.rglob("*.py"))
    assert len(files) > 30
    found = [f for path in files for f in jit_closures(path)]
    assert found == [], "\n".join(found)


def test_the_source_check_sees_each_kind_of_closure(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text('''
import functools
import jax


def build(model, params, cfg):
    score = jax.jit(lambda tokens: model.apply(params, tokens))

    @jax.jit
    def nested(tokens):
        return model.apply(params, tokens)

    jit_step = functools.partial(jax.jit, donate_argnums=0)
    bound = jit_step(functools.partial(model.apply, params=params, cfg=cfg))
    fine = jax.jit(lambda p, tokens: model.apply(p, tokens, cfg))
    named = lambda tokens: model.apply(params, tokens)
    inner = jax.jit(lambda p, idx: jax.tree_util.tree_map(lambda x: x[idx], p))
    return score, nested, bound, fine, jax.jit(named), inner
''')
    found = jit_closures(path, tmp_path)
    assert [f.split(": ", 1)[0] for f in found] == ["probe.py:7", "probe.py:10", "probe.py:14", "probe.py:16"], found
    assert all("'params'" in found[i] for i in (0, 1, 3)) and "binds params=" in found[2]
