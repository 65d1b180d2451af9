"""Helpers shared by the tests: optional-dependency imports, a tiny training run, small data files,
`assert_close`, DESIGN.md's tolerance rule, and a preempted run to resume.

(A plain module, not a conftest, so `from pjlm_testing import ...` names exactly one file.)
"""

import dataclasses
import importlib
import os

import pytest

from pjlm.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, model_preset


def require(*modules: str):
    """Import and return the named modules; skip without them, or fail under PJLM_REQUIRE_HF=1."""
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as e:
            msg = f"{name} is not installed ({e}); install the test extra: pip install -e '.[hf,test]'"
            if os.environ.get("PJLM_REQUIRE_HF") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
    return loaded[0] if len(loaded) == 1 else loaded


def tiny_config(**sections) -> Config:
    """A run that compiles in seconds: the tiny model on 600 synthetic reviews, 300-piece BPE."""
    config = Config(
        model=model_preset("tiny", max_len=64),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5, weight_decay=0.01),
        data=DataConfig(source="synthetic", synthetic_docs=600, tokenizer_vocab_size=320, seq_len=32,
                        batch_size=8, eval_rows=60),
        train=TrainConfig(steps=20, log_every=5, eval_every=0, checkpoint_every=10),
    )
    return dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k), **v) for k, v in sections.items()})


def hf_tokenizer_dir(directory, texts, vocab_size: int = 400):
    """A byte-level BPE tokenizer.json trained on `texts` (eos <|endoftext|> = 0, bos <s> = 1) and its
    tokenizer_config.json, written into `directory`; returns the `tokenizers.Tokenizer`."""
    import json

    tokenizers = require("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<s>"}, f)
    return hf


def clear_preferences(path, n: int = 400) -> str:
    """A JSONL preference file at `path` — chosen praises, rejected complains: a preference a tiny model
    can learn in a few dozen steps. Returns the path as a string."""
    import json

    nouns = ["pasta", "staff", "phone", "movie", "room", "soup", "screen", "plot"]
    good, bad = ["great", "lovely", "excellent", "superb"], ["awful", "terrible", "rude", "boring"]
    with open(path, "w") as f:
        for i in range(n):
            noun = nouns[i % len(nouns)]
            f.write(json.dumps({"prompt": "Review:", "chosen": f" The {noun} was {good[i % 4]}.",
                                "rejected": f" The {noun} was {bad[(i // 4) % 4]}."}) + "\n")
    return str(path)


# The bounds of DESIGN.md's tolerance rule, by how the value under test was computed.
F32 = 1e-5
"""float32 elementwise, or one matmul."""
F32_DEEP = 1e-4
"""float32 through a model or a long reduction: logits, gradients, losses over a batch."""
BF16 = 2e-2
"""bf16 compute."""


def assert_close(got, want, rel: float, *, what: str = "", scale: float | None = None) -> None:
    """DESIGN.md's tolerance rule, leaf by leaf: max|got − want| / max|want| ≤ `rel`.

    `got` and `want` are arrays, scalars or pytrees of one structure (or one array against nested
    lists of numbers); a scalar `want` stands for every entry of its leaf, other shapes must match.
    Both are compared in float64. `rel` is the rule's bound for how `got` was computed: `F32`,
    `F32_DEEP` or `BF16`; a test that passes another says why next to the call. `what` names the
    value in the failure message, followed by the leaf's path.

    A reference that is all zeros has no scale: then the leaf must be exactly zero, unless `scale`
    gives the size of the quantities the zero came from (e.g. a sum that cancels, or a mean of
    whitened values), and the bound is max|got| ≤ rel·scale. `scale`, when given, replaces max|want|
    for every leaf. Non-finite entries must match exactly: NaN where NaN, the same ±inf.
    """
    import jax
    import numpy as np

    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    if jax.tree_util.treedef_is_leaf(got_tree) or jax.tree_util.treedef_is_leaf(want_tree):
        got_leaves, want_leaves = [((), got)], [want]  # one array (against, maybe, a list of numbers)
    elif got_tree != want_tree:
        raise AssertionError(f"{what or 'value'}: tree structures differ: got {got_tree}, want {want_tree}")
    for (path, g), w in zip(got_leaves, want_leaves):
        name = f"{what}{jax.tree_util.keystr(path)}" or "value"
        g, w = np.asarray(g).astype(np.float64), np.asarray(w).astype(np.float64)
        if w.ndim == 0:
            w = np.broadcast_to(w, g.shape)
        if g.shape != w.shape:
            raise AssertionError(f"{name}: shape {g.shape} != reference shape {w.shape}")
        finite = np.isfinite(w)
        odd = ~(finite & np.isfinite(g))
        if not np.array_equal(g[odd], w[odd], equal_nan=True):
            raise AssertionError(f"{name}: non-finite entries differ: got {g[odd]}, want {w[odd]}")
        if not finite.any():
            continue
        err = np.zeros(g.shape)
        err[finite] = np.abs(g[finite] - w[finite])
        denom, denom_name = (float(np.abs(w[finite]).max()), "max|want|") if scale is None else (float(scale), "scale")
        worst = float(err.max())
        if worst == 0.0 or (denom > 0 and worst <= rel * denom):
            continue
        at = np.unravel_index(int(err.argmax()), err.shape)
        where = f" at index {tuple(int(i) for i in at)}" if err.ndim else ""
        if denom == 0:
            raise AssertionError(f"{name}: the reference is zero, so the rule asks for exact equality (or a "
                                 f"`scale`); largest |got| = {worst:.3g}{where}")
        raise AssertionError(f"{name}: max|got − want| / {denom_name} = {worst / denom:.3g} > {rel:g} (largest error "
                             f"{worst:.3g}{where}: got {g[at]:.9g}, want {w[at]:.9g}; {denom_name} = {denom:.3g})")


CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>",
                       "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def hf_chat_tokenizer_dir(directory, texts, chat_template: str, *, vocab_size: int = 500, bos: str = "<s>",
                          eos: str = "<|endoftext|>", template_file: bool = False):
    """`hf_tokenizer_dir` with the chat markers of ChatML/Qwen, Gemma and Llama-3 as added special tokens
    (after <|endoftext|> = 0 and <s> = 1), and `chat_template` in tokenizer_config.json, or with
    `template_file` in chat_template.jinja beside it (as transformers ≥ 4.43 writes it). Returns the
    `tokenizers.Tokenizer`."""
    import json

    tokenizers = require("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size,
                                             special_tokens=["<|endoftext|>", "<s>", *CHAT_SPECIAL_TOKENS],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
              "pad_token": "<|endoftext|>"}
    if template_file:
        with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
            f.write(chat_template)
    else:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return hf


def preempt_run(config: Config, workdir, batcher_cls, *, at_batch: int):
    """Run `config` in `workdir`, this process sent SIGTERM while `batcher_cls.batch` makes the batch of
    step index `at_batch`; check that the run saves and raises `Preempted` once that step is done (step
    at_batch + 1 of config.train.steps, the signal SIGTERM, that step's checkpoint the latest), and
    return the error. The patch is undone on return, so the same config then resumes the run."""
    import signal

    from pjlm import checkpoint as ckpt_lib
    from pjlm.train import loop

    original = batcher_cls.batch

    def preempt(self, step):
        if step == at_batch:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves after this step and raises
        return original(self, step)

    done = at_batch + 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batcher_cls, "batch", preempt)
        with pytest.raises(loop.Preempted, match=f"preempted at step {done} of {config.train.steps}") as stopped:
            loop.run(config, workdir)
    assert (stopped.value.step, stopped.value.signum) == (done, signal.SIGTERM)
    assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == done
    return stopped.value


def assert_same_training_state(got, want) -> None:
    """Two runs' parameters and optimizer states are bit-for-bit equal (e.g. resumed and uninterrupted)."""
    import chex
    import jax

    chex.assert_trees_all_equal(jax.device_get(got.state.params), jax.device_get(want.state.params))
    chex.assert_trees_all_equal(jax.device_get(got.state.opt_state), jax.device_get(want.state.opt_state))


def _saved_metadata(step_dir, item: str):
    """The tree of an item's saved array metadata (shape, dtype) in a checkpoint step folder."""
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, item))
    meta = getattr(meta, "item_metadata", meta)  # orbax ≥ 0.11: StepMetadata → TreeMetadata → its tree
    return getattr(meta, "tree", meta)


def _is_array_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def saved_leaf_bytes(step_dir, item: str = "params") -> dict:
    """{'/'-joined path: bytes} of the arrays a checkpoint's item holds, from its metadata (shape and
    dtype of each saved leaf; a folder's size would be mostly Orbax's own files at this scale)."""
    import math

    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves_with_path(_saved_metadata(step_dir, item), is_leaf=_is_array_meta)
    return {"/".join(str(k.key) for k in path): math.prod(m.shape) * np.dtype(m.dtype).itemsize for path, m in leaves}


def saved_arrays(step_dir, item: str = "params"):
    """A checkpoint item's arrays as host numpy, whatever mesh or process count wrote them: for
    comparing what two runs saved."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                  _saved_metadata(step_dir, item), is_leaf=_is_array_meta)
    return ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, item), restore_args=args)
