"""Pre-train the `small` model on a second-order Markov token stream and watch the loss reach the
stream's entropy floor.

    python -m experiments.markov_pretrain            # about 80 s on a 2-core CPU

The stream: 16 tokens; each pair of previous tokens allows 4 next tokens with random probabilities,
so predicting well needs both previous tokens (attention), not just the last one. Its entropy rate
is computed exactly from the chain, which gives the floor no model can beat. Expected result on the
2-core CPU (≈8k tokens/s): the loss falls from ln 16 ≈ 2.77, past the order-1 (bigram) bound of
≈2.5, to within ~0.05 nats of the 1.115-nat floor in 300 steps of 32×64 tokens. Until the full
trainer lands, this file holds its own small loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pjlm import losses, sharding
from pjlm.config import MeshConfig, model_preset
from pjlm.metrics import flops_per_token
from pjlm.model import Transformer


@dataclasses.dataclass(frozen=True)
class MarkovChain:
    """Order-2 chain: probs[a·V + b, x] = P(next = x | previous two = a, b)."""
    vocab: int
    probs: np.ndarray
    stationary: np.ndarray  # over pairs (a, b), shape [V·V]

    @property
    def entropy_rate(self) -> float:
        """H(x_t | x_{t-2}, x_{t-1}) in nats under the stationary distribution: the loss floor."""
        return float(np.sum(self.stationary * _entropy(self.probs)))

    def conditional_entropy_order1(self) -> float:
        """H(x_t | x_{t-1}): the best a model that sees only the last token can do."""
        V = self.vocab
        joint_bx = (self.stationary[:, None] * self.probs).reshape(V, V, V).sum(axis=0)  # (b, x)
        p_b = joint_bx.sum(axis=1, keepdims=True)
        return float(np.sum(joint_bx * -np.log(np.where(joint_bx > 0, joint_bx / p_b, 1.0))))

    def loss_floor(self, seq_len: int) -> float:
        """Expected next-token loss of the true chain over targets 1 … L−1 of a stationary row: the
        first target sees one token of context, the others two."""
        return (self.conditional_entropy_first() + (seq_len - 2) * self.entropy_rate) / (seq_len - 1)

    def conditional_entropy_first(self) -> float:
        """H(x_1 | x_0) for a row that starts from the stationary pair distribution."""
        pair = self.stationary.reshape(self.vocab, self.vocab)
        p0 = pair.sum(axis=1, keepdims=True)
        return float(np.sum(pair * -np.log(np.where(pair > 0, pair / p0, 1.0))))

    def sample(self, rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
        V = self.vocab
        out = np.empty((batch, seq_len), np.int32)
        pair = rng.choice(V * V, size=batch, p=self.stationary)
        out[:, 0], out[:, 1] = pair // V, pair % V
        cum = np.cumsum(self.probs, axis=1)
        for t in range(2, seq_len):
            ctx = out[:, t - 2] * V + out[:, t - 1]
            u = rng.random(batch)[:, None]
            out[:, t] = np.minimum((cum[ctx] < u).sum(axis=1), V - 1)
        return out


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def make_chain(vocab: int = 16, branching: int = 4, seed: int = 0) -> MarkovChain:
    rng = np.random.default_rng(seed)
    probs = np.zeros((vocab * vocab, vocab))
    for ctx in range(vocab * vocab):
        successors = rng.choice(vocab, size=branching, replace=False)
        probs[ctx, successors] = rng.dirichlet(np.ones(branching))
    # Stationary distribution over pairs: (a, b) → (b, x) with probability probs[(a, b), x].
    pi = np.full(vocab * vocab, 1.0 / vocab**2)
    for _ in range(5000):
        flow = pi[:, None] * probs                        # [(a,b), x]
        new = flow.reshape(vocab, vocab, vocab).sum(axis=0).reshape(-1)  # index b·V + x
        new = 0.5 * (new + pi)                            # lazy chain: converges even if periodic
        if np.abs(new - pi).max() < 1e-13:
            break
        pi = new
    return MarkovChain(vocab, probs, pi / pi.sum())


def train_step(state, tokens_BL, *, model, optimizer):
    """One AdamW step on the next-token loss over every target of every row."""
    params, opt_state = state

    def loss_fn(p):
        logits = model.apply({"params": p}, tokens_BL)
        return losses.next_token_loss(logits, tokens_BL, jnp.ones(tokens_BL.shape, jnp.float32))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return (optax.apply_updates(params, updates), opt_state), metrics


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    chain = make_chain(seed=args.seed)
    floor = chain.loss_floor(args.seq_len)
    print(f"stream: {chain.vocab} tokens, order 2 | loss floor {floor:.4f} nats "
          f"(order-1 bound {chain.conditional_entropy_order1():.4f}, uniform {np.log(chain.vocab):.4f})")

    config = model_preset("small", vocab_size=chain.vocab)
    model = Transformer(config)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps, args.lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.01))
    state, state_shardings = sharding.init_params_and_opt_state(model, optimizer, mesh, jax.random.key(args.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state[0]))

    with sharding.use_mesh(mesh):
        step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer),
                       in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(state_shardings, None), donate_argnums=0)
        rng = np.random.default_rng(args.seed + 1)
        tokens_per_step = args.batch * args.seq_len
        print(f"model: small, {n_params / 1e6:.2f}M parameters, {jax.device_count()} {jax.devices()[0].platform} "
              f"device(s); {args.steps} steps of {args.batch}×{args.seq_len} tokens")
        t0, pending, window = time.perf_counter(), None, []
        for i in range(1, args.steps + 1):
            batch = sharding.shard_batch(chain.sample(rng, args.batch, args.seq_len), mesh)
            state, metrics = step(state, batch)
            window.append(metrics)
            if pending is not None:  # read step i−1's metrics only after step i is dispatched
                loss = _report(*pending, floor, t0, tokens_per_step, config, args.seq_len)
                pending = None
            if i % args.log_every == 0 or i == args.steps:
                pending, window = (i, window), []
        loss = _report(*pending, floor, t0, tokens_per_step, config, args.seq_len)
    print(f"final loss (mean of the last {args.log_every} steps) {loss:.4f} vs floor {floor:.4f}: "
          f"gap {loss - floor:+.4f} nats")
    return loss - floor


def _report(i, window, floor, t0, tokens_per_step, config, seq_len) -> float:
    """Print the mean loss over the steps since the last report; stop on a non-finite value."""
    losses_, norms = (np.array([float(m[k]) for m in window]) for k in ("loss", "grad_norm"))
    if not (np.all(np.isfinite(losses_)) and np.all(np.isfinite(norms))):
        bad = i - len(window) + 1 + int(np.argmin(np.isfinite(losses_) & np.isfinite(norms)))
        raise FloatingPointError(f"non-finite loss or grad-norm at step {bad}; lower --lr")
    loss = float(losses_.mean())
    tok_s = i * tokens_per_step / (time.perf_counter() - t0)
    print(f"step {i:4d}  loss {loss:.4f}  (floor {floor:.4f}, gap {loss - floor:+.4f})  "
          f"{tok_s:,.0f} tokens/s  {tok_s * flops_per_token(config, seq_len) / 1e9:.1f} GFLOP/s", flush=True)
    return loss


if __name__ == "__main__":
    main()
