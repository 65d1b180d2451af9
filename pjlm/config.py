"""Typed, frozen configuration: the model and the device mesh (later phases add their own sections).

Every field has a docstring. `validate()` methods raise `ConfigError` naming the field to change.
Presets: `model_preset("tiny" | "small" | "tinyllama-1.1b" | "llama3-8b", **overrides)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

Remat = Literal["none", "full", "save_dots"]
Attention = Literal["einsum", "xla", "cudnn", "splash", "auto"]


from pjlm.errors import ConfigError  # noqa: E402  (re-exported: pjlm.config.ConfigError)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama, Mistral, Qwen2/3, Gemma 2/3, TinyLlama); `pjlm.hf.mapping.FAMILIES`
    says which fields each Hugging Face family sets."""

    vocab_size: int = 256
    """Vocabulary size. Presets carry a default; a run replaces it with its tokenizer's size."""
    d_model: int = 64
    """Residual stream width D."""
    n_layers: int = 2
    """Number of decoder blocks (stacked under `nn.scan`)."""
    n_heads: int = 4
    """Query heads N."""
    n_kv_heads: int = 2
    """Key/value heads K (grouped-query attention); must divide `n_heads`."""
    head_dim: Optional[int] = None
    """Per-head width H; None means d_model // n_heads."""
    mlp_dim: int = 128
    """SwiGLU hidden width F."""
    max_len: int = 128
    """Longest sequence the model is meant for (positions beyond it are an error at call time)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Output head shares the input embedding (no `lm_head/kernel`)."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    sliding_window: Optional[int] = None
    """Attend only to the last `sliding_window` positions, self included (Mistral); None = full causal."""
    global_every: int = 0
    """With a sliding window: layers n, 2n, … (counting from 1) attend globally, the rest use the
    window (Gemma 2: 2, Gemma 3: 6); 0 = every layer uses the window (Mistral)."""
    rope_local_theta: Optional[float] = None
    """RoPE base of the sliding-window layers, unscaled (Gemma 3's rope_local_base_freq); None = the same
    RoPE as the global layers, rope_scaling included."""
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """RoPE frequency scaling, as Hugging Face's rope_type (not of the sliding-window layers when
    rope_local_theta is set): linear divides every frequency by `rope_factor`; llama3 (Llama 3.1/3.2)
    divides only the low ones, smoothly."""
    rope_factor: float = 1.0
    """RoPE scaling factor (linear, llama3)."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above rope_original_max_len / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below rope_original_max_len / this are kept."""
    rope_original_max_len: int = 8192
    """llama3 scaling: the context length of pre-training (original_max_position_embeddings)."""
    qk_norm: bool = False
    """RMSNorm over the head dimension on each query and key head before RoPE (Qwen3, Gemma 3)."""
    norm_offset: float = 0.0
    """Every RMSNorm multiplies by (norm_offset + scale): 0 (Llama), or 1 (Gemma, whose stored scales
    start at 0)."""
    post_norms: bool = False
    """RMSNorm on the attention and MLP outputs before they join the residual stream (Gemma)."""
    activation: Literal["silu", "gelu_tanh"] = "silu"
    """Gated MLP activation: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma's gelu_pytorch_tanh)."""
    embed_scale: bool = False
    """Multiply the token embeddings by sqrt(d_model), in the compute dtype (Gemma)."""
    query_pre_attn_scalar: Optional[float] = None
    """Attention scores are scaled by query_pre_attn_scalar**-0.5 (Gemma); None = head_dim."""
    attn_softcap: Optional[float] = None
    """Attention logits become c·tanh(s/c) before the mask (Gemma 2); None = off. Needs attention einsum, splash
    or auto."""
    final_softcap: Optional[float] = None
    """LM-head logits become c·tanh(z/c) (Gemma 2); None = off."""
    dtype: str = "float32"
    """Compute dtype of matmuls: float32 on the CPU, bfloat16 on accelerators."""
    param_dtype: str = "float32"
    """Storage dtype of parameters."""
    remat: Remat = "none"
    """Rematerialisation of each block in the backward pass: none, full, or save_dots (keep weight matmuls)."""
    attention: Attention = "einsum"
    """einsum: the plain reference; xla / cudnn: `jax.nn.dot_product_attention` with that implementation;
    splash: the Pallas splash kernel (TPU); auto: the platform's kernel — splash on TPU, cudnn on GPU
    where the model allows, else xla (einsum with attn_softcap). See `pjlm.attention`."""
    scan_unroll: int = 1
    """Unroll factor of the scan over layers (n_layers = a fully unrolled loop, same parameters)."""
    init_std: float = 0.02
    """Standard deviation of the embedding initialiser (kernels use 1/sqrt(fan_in))."""

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def validate(self) -> "ModelConfig":
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
                "set n_kv_heads to a divisor of n_heads")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "change one of them or set model.head_dim explicitly")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim={self.resolved_head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window must be positive or None, got {self.sliding_window}")
        if self.global_every < 0:
            raise ConfigError(f"model.global_every must be ≥ 0, got {self.global_every}")
        if self.rope_scaling not in ("none", "linear", "llama3"):
            raise ConfigError(f"model.rope_scaling={self.rope_scaling!r}; choose none, linear or llama3")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                              f"model.rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"model.activation={self.activation!r}; choose silu or gelu_tanh")
        if self.attn_softcap is not None and self.attention in ("xla", "cudnn"):
            raise ConfigError(f"model.attn_softcap={self.attn_softcap} needs model.attention='einsum', 'splash' "
                              "or 'auto'; "
                              f"{self.attention!r} attention has no logit soft-capping")
        if self.remat not in ("none", "full", "save_dots"):
            raise ConfigError(f"model.remat={self.remat!r}; choose none, full or save_dots")
        if self.attention not in ("einsum", "xla", "cudnn", "splash", "auto"):
            raise ConfigError(f"model.attention={self.attention!r}; choose einsum, xla, cudnn, splash or auto")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{name}={getattr(self, name)!r}; choose float32, bfloat16 or float16")
        return self

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") device mesh; exactly one may be -1 (fills the rest)."""

    data: int = 1
    """Pure data parallelism (parameters replicated across it)."""
    fsdp: int = -1
    """Data parallelism with parameters and optimizer state sharded across it (ZeRO-3 style)."""
    tensor: int = 1
    """Tensor (model) parallelism over heads, MLP width and vocabulary."""

    AXES = ("data", "fsdp", "tensor")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes for `n_devices`, or a ConfigError naming the field to change."""
        sizes = [self.data, self.fsdp, self.tensor]
        fill = [i for i, s in enumerate(sizes) if s == -1]
        for name, size in zip(self.AXES, sizes):
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}={size}; use a positive size or -1 to fill the rest")
        if len(fill) > 1:
            names = ", ".join(f"mesh.{self.AXES[i]}" for i in fill)
            raise ConfigError(f"only one mesh axis may be -1, got {names}; give the others sizes")
        fixed = math.prod(s for s in sizes if s != -1)
        if fill:
            if n_devices % fixed:
                raise ConfigError(
                    f"the mesh's fixed axes multiply to {fixed}, which does not divide the {n_devices} "
                    f"devices; set mesh.{self.AXES[fill[0]]} explicitly or change the other sizes")
            sizes[fill[0]] = n_devices // fixed
        elif fixed != n_devices:
            raise ConfigError(
                f"mesh data×fsdp×tensor = {self.data}×{self.fsdp}×{self.tensor} = {fixed} but there are "
                f"{n_devices} devices; make the product {n_devices} or set one axis to -1")
        return tuple(sizes)


def check_divides_mesh(model: ModelConfig, mesh_sizes: dict[str, int]) -> None:
    """Every sharded model dimension must divide the mesh axes it is sharded over (DESIGN.md's rules)."""
    tensor, fsdp = mesh_sizes.get("tensor", 1), mesh_sizes.get("fsdp", 1)
    checks = [
        ("vocab_size", model.vocab_size, "tensor", tensor),
        ("n_heads", model.n_heads, "tensor", tensor),
        ("n_kv_heads", model.n_kv_heads, "tensor", tensor),
        ("mlp_dim", model.mlp_dim, "tensor", tensor),
        ("d_model", model.d_model, "fsdp", fsdp),
    ]
    for field, dim, axis, size in checks:
        if dim % size:
            raise ConfigError(
                f"model.{field}={dim} is not divisible by the mesh's {axis} axis ({size}); "
                f"change model.{field} or mesh.{axis}")


def check_batch_divides_mesh(batch_size: int, mesh_sizes: dict[str, int], field: str = "batch_size") -> None:
    """The batch axis is sharded over data×fsdp."""
    n = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)
    if batch_size % n:
        raise ConfigError(
            f"batch {batch_size} is not divisible by the mesh's data×fsdp = {n}; "
            f"set {field} to a multiple of {n}")


_PRESETS: dict[str, dict] = {
    # Tests: compiles in seconds.
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                 max_len=128, tie_embeddings=True),
    # CPU demos: about 1M parameters with the default vocabulary.
    "small": dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384,
                  max_len=256, tie_embeddings=True),
    "tinyllama-1.1b": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                           mlp_dim=5632, max_len=2048, rope_theta=10000.0, norm_eps=1e-5,
                           tie_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      mlp_dim=14336, max_len=8192, rope_theta=500000.0, norm_eps=1e-5,
                      tie_embeddings=False),
}

PRESETS = tuple(_PRESETS)


def model_preset(name: str, **overrides) -> ModelConfig:
    """A named model shape, with any field overridden (e.g. `vocab_size=tokenizer.vocab_size`)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return ModelConfig(**{**_PRESETS[name], **overrides}).validate()


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and decay, global-norm clipping, masked weight decay, gradient accumulation."""

    learning_rate: float = 3e-4
    """Peak learning rate, reached after `warmup_steps`; > 0."""
    warmup_steps: int = 100
    """Linear warmup from 0; ≥ 0. Replaced by `warmup_ratio` when that is set."""
    warmup_ratio: Optional[float] = None
    """Warmup as a fraction of the run's steps (warmup = round(ratio · steps)); in [0, 1) or None."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from the peak to `min_lr_ratio`·peak over the rest of the run."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak; in [0, 1]."""
    b1: float = 0.9
    """Adam β1; in [0, 1)."""
    b2: float = 0.95
    """Adam β2; in [0, 1)."""
    eps: float = 1e-8
    """Adam ε; > 0."""
    weight_decay: float = 0.1
    """Decoupled weight decay, ≥ 0; never applied to norms and biases."""
    decay_embeddings: bool = False
    """Also decay the embedding table (and the untied output head)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; ≥ 0 (0 = off)."""
    grad_accum: int = 1
    """Micro-batches per step, ≥ 1; the step's batch is split k ways and the gradients are exact."""
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of Adam's moments (bfloat16 for memory and like-for-like benchmarks)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is cut into batches."""

    source: str = "synthetic"
    """A local json/jsonl/parquet/text file (comma-separate several), a Hub dataset name, or
    'synthetic' (the built-in review corpus; for SFT, sentiment-conditioned review prompts)."""
    schema: Optional[str] = None
    """The dataset format (language_modeling, prompt_completion, explicit_preference, implicit_preference,
    prompt_only; see `pjlm.data.formats`) or a normalised kind (text, sft, preference, prompts); None
    detects the format from the columns, among those the phase takes."""
    split: str = "train"
    """The split of a Hub dataset (e.g. train_prefs, or train+test); local files are one split."""
    subset: Optional[str] = None
    """A Hub dataset's configuration (subset) name, e.g. 'default'; None when it has one."""
    revision: Optional[str] = None
    """A Hub dataset's revision (branch, tag or commit); None = the default branch."""
    eval_source: Optional[str] = None
    """Held-out data; None holds out the last `eval_rows` rows of `source`."""
    eval_rows: int = 500
    """Rows held out of `source` when there is no `eval_source`; ≥ 0 (0 = none)."""
    synthetic_docs: int = 20000
    """Documents of the built-in corpus; ≥ 1."""
    tokenizer: Optional[str] = None
    """A `.model`, `tokenizer.json` or directory; None: the run's saved tokenizer, else `init_from`'s,
    else a sentencepiece BPE trained on the training data."""
    tokenizer_vocab_size: int = 2048
    """Vocabulary of a tokenizer trained here; ≥ 265 (256 byte pieces, 4 special tokens, 4 chat markers, and
    one more), and at most what the corpus can fill."""
    seq_len: int = 256
    """Packed row length (pre-training) and the longest SFT row; ≥ 2."""
    pack: bool = True
    """Pack several documents/examples per row; False pads one example per row to `buckets`."""
    buckets: tuple[int, ...] = ()
    """Padded lengths for unpacked rows, each ≥ 2; each is one compile. Empty means (seq_len,)."""
    max_prompt_len: Optional[int] = None
    """Prompt tokens kept (its end) when a row is too long, ≥ 1; None = seq_len // 2."""
    batch_size: int = 32
    """Global batch size in rows, ≥ 1; a multiple of the mesh's data×fsdp."""
    seed: int = 0
    """Seeds the batch order (with epoch and step)."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed row stops the run naming it, or is skipped and counted."""
    text_unit: Literal["paragraph", "file", "line"] = "paragraph"
    """A plain text file's documents: each blank-line-separated paragraph, the whole file, or each line.
    Blank lines only separate documents; they are never errors."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """SFT on a multi-turn conversation: the loss covers every assistant turn, or only the last."""
    prepared: Optional[str] = None
    """A directory made by `pjlm prepare` (the corpus tokenized and packed once, in ArrayRecord shards):
    pre-training streams its rows through grain instead of tokenizing `source` in memory. The data
    fields it was made from (source, seq_len, eval_rows, …) and its tokenizer must match this config's.
    Pre-training only; None = the in-memory path."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run: phase, length, cadences."""

    phase: Literal["pretrain", "sft", "reward", "dpo", "ppo"] = "pretrain"
    """Which step to run."""
    steps: int = 1000
    """Total optimizer steps; ≥ 1. Replaced by `epochs` when that is set."""
    epochs: Optional[float] = None
    """Passes over the training data (fractions allowed): when set, `steps` becomes
    ⌈epochs · steps per epoch⌉, counted on the tokenized (packed) data at the run's start; > 0 or None."""
    log_every: int = 10
    """Pull and write metrics every N steps; ≥ 1."""
    eval_every: int = 200
    """Held-out loss/perplexity every N steps; ≥ 0 (0 = never)."""
    eval_batches: int = 4
    """Batches per evaluation; ≥ 1."""
    checkpoint_every: int = 200
    """Save every N steps (and at the end, and on SIGTERM/SIGINT); ≥ 1."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk; ≥ 1."""
    init_from: Optional[str] = None
    """A work directory (its latest checkpoint) or a checkpoint step directory whose parameters
    start this run; the optimizer starts fresh. A work directory is resolved to its latest step at the
    run's first start and pinned there for every resume (see `pjlm.train.rundir`)."""
    seed: int = 0
    """Seeds parameter initialisation and the step RNG."""
    logprob_chunk: int = 0
    """Compute log-probs this many vocabulary entries at a time; ≥ 0 (0 = full logits)."""
    masked_logprob_chunk: int = 0
    """DPO-family losses: apply the LM head only at the loss-masked (response) positions, this many
    positions at a time (`pjlm.ops.masked_token_logprobs`; the same values, and the head's cost follows
    the response tokens instead of every padded position); ≥ 0 (0 = the head at every position, the
    plain path, with `logprob_chunk`). Takes precedence over `logprob_chunk`."""
    resume_step: Optional[int] = None
    """Resume from this saved step instead of the newest good one (later checkpoints are moved aside to
    `checkpoints_superseded/`, never deleted); ≥ 1 or None."""
    lease_timeout_s: float = 300.0
    """A run refreshes its lease on the work directory every tenth of this; a lease older than this is
    stale and a new run takes it over (> 0 seconds)."""
    report_to: tuple[Literal["tensorboard", "wandb", "none"], ...] = ("tensorboard",)
    """Where metrics go besides `metrics.jsonl` (always written), as Hugging Face's `report_to`:
    "tensorboard", "wandb" (`pip install 'pjlm[wandb]'`; see `pjlm.wandb_log`), or "none" alone."""
    wandb_project: Optional[str] = None
    """The Weights & Biases project; None = $WANDB_PROJECT, else "pjlm"."""
    fit: Literal["check", "adjust", "off"] = "check"
    """Before the state is allocated, the train step is compiled from abstract arrays at the longest row
    the data reaches and its memory compared with the device's (`pjlm.fit`). check: a step that does not
    fit stops the run (exit 2) naming the settings that would; adjust (the recipes' default): first turn
    on train.logprob_chunk, then model.remat=full, as far as needed, and stop only when even that does
    not fit; off: no check."""
    memory_limit_gib: Optional[float] = None
    """Memory one device may use, in GiB, for the fit check; None = the device's own (an accelerator's
    bytes_limit; on the CPU the host's available memory, shared by its devices); > 0 or None."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters W' = W + (α/r)·A·B on the kernels whose paths match `targets`."""

    rank: int = 8
    """r; ≥ 1."""
    alpha: float = 16.0
    """α, > 0; the update is scaled by α/r."""
    targets: tuple[str, ...] = (r"attn/(q|k|v|o)/kernel", r"mlp/(gate|up|down)/kernel")
    """Regular expressions searched in '/'-joined parameter paths (e.g. layers/attn/q/kernel); at least
    one, and each must match a kernel."""


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Reward-model and DPO-family settings."""

    beta: float = 0.1
    """KL strength β > 0: DPO's inverse temperature on the implicit reward."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = "sigmoid"
    """DPO-family loss (see `pjlm.losses.dpo_loss`)."""
    label_smoothing: float = 0.0
    """ε in [0, 0.5): conservative DPO's smoothing (sigmoid) or the assumed label-flip rate (robust)."""
    simpo_gamma: float = 0.0
    """SimPO's target reward margin γ; ≥ 0."""
    ipo_length_normalize: bool = True
    """IPO on per-token (length-normalised) log-probs rather than summed ones."""
    nll_coef: float = 0.0
    """Weight of an NLL term on the chosen response; ≥ 0."""
    reference: Optional[str] = None
    """DPO's frozen reference policy: a work directory (its latest checkpoint) or a checkpoint step
    directory, pinned at the run's first start as `train.init_from` is; None = `train.init_from`. It must
    have init_from's model shape and tokenizer. Lets a run start from one policy and be regularised
    towards another (iterative DPO: round k starts from round k−1's policy, the SFT policy stays the
    reference). Not with LoRA (its reference is the frozen base) nor loss_type simpo (no reference)."""
    precompute_ref: bool = False
    """Compute the reference log-probs once over the dataset before training and cache them in the work
    directory by example_id (then the reference model is not kept in memory)."""
    reward_margin: float = 0.0
    """Reward model: required margin in −log σ(r_w − r_l − margin); ≥ 0."""
    center_coef: float = 0.0
    """Reward model: weight of (r_w + r_l)², keeping rewards centred; ≥ 0."""


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """RLHF with PPO (or a critic-free group baseline) against a KL penalty to the reference."""

    reward_model: Optional[str] = None
    """Work directory of a reward-model run (full or LoRA): the value model's start (it must share the
    policy's architecture and tokenizer), and the 'model' reward components that name no path=."""
    rewards: tuple[str, ...] = ("model:1.0",)
    """Reward components as kind:weight[:key=value...]: model, vader, length:w:target=40:scale=0.05,
    regex:w:pattern=..., eos_penalty:w:penalty=1, python:w:fn=package.module:function (a function of
    (prompts, responses) → scores), model:w:path=DIR (a reward-model run of any architecture; text
    re-encoded when its tokenizer differs; :normalize=false skips its saved mean/std); any may add
    :clip=C (scores clipped to [−C, C] before weighting) and :name=N. With --set, comma-separated, or a JSON list when a pattern holds a comma."""
    group_size: int = 1
    """Samples per prompt, ≥ 1 (RLOO/GRPO need ≥ 2); a rollout is data.batch_size prompts × group_size.
    Prompts longer than data.max_prompt_len are cut from the left (and counted)."""
    max_new_tokens: int = 48
    """Response budget, ≥ 1; a response that never emits EOS still trains (see rewards' eos_penalty)."""
    temperature: float = 1.0
    """Sampling temperature, > 0; policy, old-policy and reference log-probs are all taken at it."""
    epochs: int = 2
    """Passes over each rollout; ≥ 1."""
    minibatches: int = 2
    """Minibatches per pass; ≥ 1."""
    clip: float = 0.2
    """PPO ratio clip ε; > 0."""
    value_clip: float = 0.2
    """Value clip around the rollout's values; > 0."""
    value_coef: float = 0.5
    """Weight of the value loss, ≥ 0 (its own optimizer; the weight scales its gradient)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight; ≥ 0."""
    gamma: float = 1.0
    """Discount; in [0, 1]."""
    lam: float = 0.95
    """GAE λ; in [0, 1]."""
    kl_kind: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward."""
    kl_coef: float = 0.05
    """β, ≥ 0 (initial β when adaptive; 0 = no KL penalty)."""
    kl_target: Optional[float] = None
    """Adaptive controller's target sequence KL (Ziegler et al. 2019), > 0; None keeps β fixed."""
    kl_horizon: int = 10000
    """Adaptive controller's horizon, in samples; ≥ 1. β moves by at most 20% per `kl_horizon` samples:
    Ziegler et al.'s 10,000 is 20 of their 512-sample batches, so with small rollouts scale it down
    (e.g. 20 × the samples per step), or β stays near `kl_coef` for the whole run."""
    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    """gae uses the value model; rloo and grpo a group baseline (no critic)."""
    whiten_advantages: bool = True
    """Normalise advantages over the rollout's response tokens."""


@dataclasses.dataclass(frozen=True)
class Config:
    """One run of one phase. Experiment files define `get_config() -> Config`."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: model_preset("small"))
    """The model; its vocab_size is replaced by the tokenizer's at run time."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """Optimizer."""
    data: DataConfig = DataConfig()
    """Data."""
    train: TrainConfig = TrainConfig()
    """Run length and cadences."""
    preference: PreferenceConfig = PreferenceConfig()
    """Reward-model and DPO settings (used by those phases)."""
    lora: Optional[LoraConfig] = None
    """Train low-rank adapters on a frozen base (train.init_from) instead of all weights."""
    ppo: PPOConfig = PPOConfig()
    """RLHF settings (phase ppo)."""

    def validate(self) -> "Config":
        """Every field in its range (`pjlm.config_rules.RANGES`) and the fields consistent with each
        other; a ConfigError names the field and what is accepted."""
        from pjlm.config_rules import check_ranges

        self.model.validate()
        check_ranges(self)
        if "wandb" in self.train.report_to:
            from pjlm.wandb_log import require_wandb

            require_wandb()
        if self.optimizer.grad_accum > 1 and self.train.phase == "ppo":
            raise ConfigError("optimizer.grad_accum > 1 does not apply to train.phase=ppo: its batch is split "
                              "by ppo.minibatches (and data.batch_size prompts × ppo.group_size samples)")
        if self.optimizer.grad_accum < 1 or self.data.batch_size % self.optimizer.grad_accum:
            raise ConfigError(f"data.batch_size={self.data.batch_size} is not divisible by "
                              f"optimizer.grad_accum={self.optimizer.grad_accum}")
        if self.train.phase == "ppo" and not self.ppo.reward_model and any(
                r.split(":", 1)[0] == "model" and ":path=" not in r for r in self.ppo.rewards):
            raise ConfigError("ppo.rewards has a 'model' component without path= and ppo.reward_model is not set; "
                              "give the component its reward-model run (model:1.0:path=runs/rm) or set "
                              "ppo.reward_model, or use rule-based rewards only (e.g. vader:1.0)")
        self._check_reference()
        if self.model.final_softcap is not None and self.train.masked_logprob_chunk:
            raise ConfigError(f"train.masked_logprob_chunk={self.train.masked_logprob_chunk} cannot apply "
                              "model.final_softcap; set train.masked_logprob_chunk=0")
        if self.model.final_softcap is not None and self.train.logprob_chunk:
            raise ConfigError(f"train.logprob_chunk={self.train.logprob_chunk} cannot apply model.final_softcap "
                              "(the chunked log-probs never form the capped logits); set train.logprob_chunk=0")
        longest = max((self.data.seq_len, *self.data.buckets))
        if self.data.max_prompt_len is not None and self.data.max_prompt_len >= longest:
            raise ConfigError(f"data.max_prompt_len={self.data.max_prompt_len} leaves no room for a response in rows "
                              f"of {longest} tokens (data.seq_len / data.buckets); lower it (None = half the row)")
        if longest > self.model.max_len:
            raise ConfigError(f"data.seq_len / data.buckets reach {longest}, beyond model.max_len="
                              f"{self.model.max_len}; shorten them or raise model.max_len")
        return self

    def _check_reference(self) -> None:
        """`preference.reference` only where DPO reads a reference checkpoint."""
        ref = self.preference.reference
        if ref is None:
            return
        if self.train.phase != "dpo":
            raise ConfigError(f"preference.reference={ref!r} is DPO's reference policy, but train.phase="
                              f"{self.train.phase}; unset preference.reference")
        if self.lora is not None:
            raise ConfigError(f"preference.reference={ref!r} cannot be used with LoRA: a LoRA run's reference is "
                              "its frozen base (train.init_from); unset preference.reference, or train without lora")
        if self.preference.loss_type == "simpo":
            raise ConfigError(f"preference.reference={ref!r} is unused by preference.loss_type=simpo, which has no "
                              "reference; unset preference.reference or choose another loss_type")


# Serialisation and command-line overrides live in pjlm/overrides.py; re-exported here.
from pjlm.overrides import apply_overrides, from_dict, to_dict  # noqa: E402,F401
