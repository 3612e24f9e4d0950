"""A tiny causal language model trained with jaxactv's fused linear cross-entropy.

Two pre-norm transformer blocks in plain JAX, trained with optax AdamW on the Python
standard library's own source (on every machine, nothing downloaded), with a byte-level
BPE vocabulary of 8192 tokens trained locally with `tokenizers`. The output layer and the
loss are one call, ``jaxactv.linear_softmax_cross_entropy(h, w_out, targets, ...)``, which
never forms the ``[tokens, vocab]`` logits; padding is masked out with ``where=``.

  python examples/train_tiny_lm.py                    # 200 steps; times: examples/README.md
  python examples/train_tiny_lm.py --compare-unfused  # + x @ w and optax's loss, + memory
  python examples/train_tiny_lm.py --devices 8        # + the same on a (data, vocab) mesh

Writes ``metrics.json``, ``timing.json`` and plots into ``runs/tiny_lm/``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tiny_lm_support as support
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxactv


class Config(NamedTuple):
  vocab: int
  d_model: int
  heads: int
  layers: int
  seq_len: int


# --------------------------------------------------------------------------- model


def init_params(key: jax.Array, cfg: Config) -> dict:
  keys = iter(jax.random.split(key, 3 + 4 * cfg.layers))
  normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, jnp.float32)
  norm = lambda: {"scale": jnp.ones(cfg.d_model), "bias": jnp.zeros(cfg.d_model)}
  d, resid = cfg.d_model, 0.02 / math.sqrt(2 * cfg.layers)  # GPT-2's residual scaling
  blocks = [{"ln1": norm(), "qkv": normal((d, 3 * d)), "proj": normal((d, d), resid),
             "ln2": norm(), "up": normal((d, 4 * d)), "down": normal((4 * d, d), resid)}
            for _ in range(cfg.layers)]
  return {"embed": normal((cfg.vocab, d)), "pos": normal((cfg.seq_len, d)), "blocks": blocks,
          "ln_f": norm(), "w_out": normal((d, cfg.vocab))}  # untied output layer, [D, V]


def layer_norm(x: jax.Array, p: dict) -> jax.Array:
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def hidden_states(params: dict, tokens: jax.Array, heads: int) -> jax.Array:
  """``[B, T]`` token ids -> ``[B, T, D]`` final hidden states (everything but the head)."""
  b, t = tokens.shape
  x = params["embed"][tokens] + params["pos"][:t]
  for blk in params["blocks"]:
    q, k, v = jnp.split(layer_norm(x, blk["ln1"]) @ blk["qkv"], 3, axis=-1)
    q, k, v = (a.reshape(b, t, heads, -1) for a in (q, k, v))
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, -1)
    x = x + att @ blk["proj"]
    x = x + jax.nn.gelu(layer_norm(x, blk["ln2"]) @ blk["up"]) @ blk["down"]
  return layer_norm(x, params["ln_f"])


# ---------------------------------------------------------------------------- loss


def lm_loss(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array):
  """Mean next-token cross-entropy where ``mask`` is True, and the next-token accuracy. Fused.

  ``where=mask`` leaves padding out of the loss, its gradient and the mean. ``return_aux``
  adds per-token monitors at no extra pass: the logsumexp, the argmax and the z-loss.
  """
  loss, aux = jaxactv.linear_softmax_cross_entropy(h, w, targets, where=mask, return_aux=True)
  return loss, masked_mean(aux.argmax == targets, mask)


def unfused_lm_loss(h, w, targets, mask):
  """The same the usual way: ``[B, T, V]`` logits, then optax."""
  logits = h @ w
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return masked_mean(losses, mask), masked_mean(jnp.argmax(logits, -1) == targets, mask)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values, 0)) / jnp.maximum(jnp.sum(mask), 1)


def sharded_lm_loss(mesh: Mesh):
  """``lm_loss`` on a (data, vocab) mesh: each device holds a batch shard and a vocab slice."""

  def local(h, w, targets, mask):  # h, targets, mask: [B / data, T, ...]; w: [D, V / vocab]
    total, aux = jaxactv.linear_softmax_cross_entropy(
        h, w, targets, where=mask, reduction="sum", return_aux=True,
        vocab_axis="vocab")  # one pmax and one psum over "vocab"; the vocab is never gathered
    hits = jnp.sum((aux.argmax == targets) & mask)  # argmax: global token ids
    total, hits, count = jax.lax.psum((total, hits, jnp.sum(mask)), "data")
    return total / jnp.maximum(count, 1), hits / jnp.maximum(count, 1)

  return jax.shard_map(local, mesh=mesh, out_specs=(P(), P()),
                       in_specs=(P("data"), P(None, "vocab"), P("data"), P("data")))


# ------------------------------------------------------------------------ training


def make_train_step(loss_fn, optimizer, cfg: Config):
  def objective(params, inputs, targets, mask):
    return loss_fn(hidden_states(params, inputs, cfg.heads), params["w_out"], targets, mask)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, inputs, targets, mask):
    (loss, accuracy), grads = jax.value_and_grad(objective, has_aux=True)(
        params, inputs, targets, mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  return train_step, jax.jit(objective)


def make_optimizer(lr: float, steps: int):
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr / 10)
  adamw = optax.adamw(schedule, b2=0.95, weight_decay=0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), adamw)


def train(name, loss_fn, cfg, args, data, heldout, order, clock, mesh=None):
  """Trains from the init fixed by ``--seed``; returns the params, the run's record, evals."""
  optimizer = make_optimizer(args.lr, args.steps)
  train_step, evaluate = make_train_step(loss_fn, optimizer, cfg)
  params = init_params(jax.random.key(args.seed), cfg)
  put = lambda tree, spec: tree  # one device: leave arrays where they are
  if mesh is not None:  # w_out split over "vocab", the rest replicated; batches over "data"
    put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
    params = {k: put(v, P(None, "vocab") if k == "w_out" else P()) for k, v in params.items()}
  opt_state = jax.jit(optimizer.init)(params)
  if mesh is not None:  # the state where the step returns it, or step 2 compiles again:
    # each moment like its param, the step counts replicated
    opt_state = optax.tree_map_params(optimizer, lambda s, p: jax.device_put(s, p.sharding),
                                      opt_state, params, transform_non_params=lambda s: put(s, P()))
  first = put([a[order[0]] for a in data], P("data"))
  compiled = train_step.lower(params, opt_state, *first).compile()  # jit reuses it below
  run = {"train_step_temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
  progress, losses, accuracies, curve = support.Progress(name, args.steps, clock), [], [], []
  eval_at = {max(1, round(args.steps * f)) for f in (0.25, 0.5, 0.75, 1.0)}
  for step, rows in enumerate(order):
    batch = put([a[rows] for a in data], P("data"))
    params, opt_state, loss, accuracy = train_step(params, opt_state, *batch)
    losses.append(loss)
    accuracies.append(accuracy)
    progress.update(step, loss, accuracy, int(data.mask[rows].sum()))
    if step + 1 in eval_at and name == "fused":
      curve.append({"step": step + 1, **heldout_loss(evaluate, params, heldout, 4 * len(rows))})
  return params, {"losses": [float(v) for v in losses],
                  "accuracies": [float(v) for v in accuracies], **run}, curve


def heldout_batches(heldout, batch_size):
  pad = -len(heldout.inputs) % batch_size  # whole batches: the extra rows are all masked out
  heldout = [np.pad(a, ((0, pad), (0, 0))) for a in heldout]
  return [[a[lo:lo + batch_size] for a in heldout] for lo in range(0, len(heldout[0]), batch_size)]


def heldout_loss(evaluate, params, heldout, batch_size) -> dict:
  """Token-weighted mean loss, perplexity and next-token accuracy on the held-out windows."""
  sums, count = np.zeros(2), 0
  for batch in heldout_batches(heldout, batch_size):  # the fused loss, forward only
    n = int(batch[2].sum())
    sums, count = sums + np.asarray(evaluate(params, *batch), np.float64) * n, count + n
  loss, accuracy = sums / max(count, 1)
  return {"loss": loss, "perplexity": math.exp(loss), "accuracy": accuracy, "tokens": count}


@functools.partial(jax.jit, static_argnames=("heads", "new_tokens"))
def greedy_decode(params, prompt, prompt_len, *, heads, new_tokens):
  """Extends ``prompt[:prompt_len]`` by ``new_tokens`` argmax tokens (no KV cache: tiny)."""

  def step(i, tokens):
    h = hidden_states(params, tokens[None], heads)[0, prompt_len + i - 1]
    return tokens.at[prompt_len + i].set(jnp.argmax(h @ params["w_out"]).astype(tokens.dtype))

  return jax.lax.fori_loop(0, new_tokens, step, prompt)


# ---------------------------------------------------------------------------- memory


def train_step_temp_bytes(loss_fn, cfg: Config, tokens_per_step: int) -> int:
  """XLA's temp memory for one train step at this shape: lowered and compiled, never run."""
  train_step, _ = make_train_step(loss_fn, make_optimizer(1e-3, 100), cfg)
  params = jax.eval_shape(lambda key: init_params(key, cfg), jax.random.key(0))  # shapes only
  opt_state = jax.eval_shape(make_optimizer(1e-3, 100).init, params)
  shape = (tokens_per_step // cfg.seq_len, cfg.seq_len)
  batch = [jax.ShapeDtypeStruct(shape, dtype) for dtype in (jnp.int32, jnp.int32, bool)]
  compiled = train_step.lower(params, opt_state, *batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def memory_sweep(cfg: Config, tokens: int, vocabs: list[int]) -> list[dict]:
  return [{"vocab": v, "tokens": tokens,
           "fused_temp_bytes": train_step_temp_bytes(lm_loss, cfg._replace(vocab=v), tokens),
           "unfused_temp_bytes": train_step_temp_bytes(unfused_lm_loss, cfg._replace(vocab=v),
                                                       tokens)}
          for v in vocabs]


# ------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
  clock = support.Clock()
  args = support.parse_args(argv, __doc__)
  if args.devices > 1:  # host CPU devices; the same as XLA_FLAGS=--xla_force_host_platform_...
    jax.config.update("jax_num_cpu_devices", args.devices)  # (must come before jax.devices())
    if len(jax.devices()) < args.devices:
      support.fail(f"--devices {args.devices}, but {jax.default_backend()} has "
                   f"{len(jax.devices())} devices")
  corpus = support.load_corpus(args.corpus_mb)
  tokenizer = support.train_tokenizer(corpus.train, args.vocab_size)
  data = support.make_windows(tokenizer, corpus.train, args.seq_len)
  heldout = support.evenly_spaced(support.make_windows(tokenizer, corpus.heldout, args.seq_len),
                                  support.HELDOUT_WINDOWS)
  cfg = Config(args.vocab_size, args.d_model, args.heads, args.layers, args.seq_len)
  order = support.batch_order(len(data.inputs), args.batch_size, args.steps, args.seed)
  print(f"corpus: {corpus.info['train_files']} + {corpus.info['heldout_files']} held-out stdlib "
        f"files, {int(data.mask.sum()):,} + {int(heldout.mask.sum()):,} tokens, vocab "
        f"{tokenizer.get_vocab_size()} ({clock.elapsed():.1f} s)")
  clock.lap("corpus_and_tokenizer")

  params, run, curve = train("fused", lm_loss, cfg, args, data, heldout, order, clock)
  clock.lap("train_fused")
  runs = {"fused": run}
  metrics = {"config": {**{k: str(v) if k == "out" else v for k, v in vars(args).items()},
                        "jax": jax.__version__, "jaxactv": jaxactv.__version__},
             "corpus": corpus.info, "runs": runs,
             "heldout": {**curve[-1], "curve": curve}, "samples": []}
  for prompt in ("def", "import", "class", "    return"):
    ids = [1, *tokenizer.encode(prompt).ids]
    buf = np.zeros(args.seq_len, np.int32)
    buf[:len(ids)] = ids
    new = min(40, args.seq_len - len(ids))
    out = greedy_decode(params, buf, len(ids), heads=cfg.heads, new_tokens=new)
    text = tokenizer.decode(out[1:len(ids) + new].tolist())
    metrics["samples"].append({"prompt": prompt, "text": text})
  clock.lap("samples")

  if args.compare_unfused:
    runs["unfused"] = train("unfused", unfused_lm_loss, cfg, args, data, heldout, order, clock)[1]
    # The two runs drift apart as Adam carries each step's rounding into the weights; at
    # the same weights, the two losses differ by float32 rounding alone.
    fused_eval, unfused_eval = (make_train_step(f, make_optimizer(args.lr, args.steps), cfg)[1]
                                for f in (lm_loss, unfused_lm_loss))
    runs["unfused"]["max_abs_loss_diff_same_params"] = max(
        abs(float(fused_eval(params, *b)[0]) - float(unfused_eval(params, *b)[0]))
        for b in heldout_batches(heldout, 4 * args.batch_size))
    clock.lap("train_unfused")
    sweep = memory_sweep(cfg, args.memory_tokens, args.memory_vocabs)
    example = {"vocab": cfg.vocab, "tokens": args.batch_size * cfg.seq_len,
               "fused_temp_bytes": runs["fused"]["train_step_temp_bytes"],
               "unfused_temp_bytes": runs["unfused"]["train_step_temp_bytes"]}
    metrics["memory"] = {"example": example, "vocab_sweep": sweep,
                         "scaled": max(sweep, key=lambda r: r["vocab"])}
    clock.lap("memory_compiles")
  if args.devices > 1:
    shape = (args.data_parallel, args.devices // args.data_parallel)
    mesh = Mesh(np.array(jax.devices()[:args.devices]).reshape(shape), ("data", "vocab"))
    _, run, _ = train("fused_sharded", sharded_lm_loss(mesh), cfg, args, data, heldout, order,
                      clock, mesh=mesh)
    clock.lap("train_sharded")
    runs["fused_sharded"] = {**run, "mesh": {"data": shape[0], "vocab": shape[1]}}
  for run in list(runs.values())[1:]:
    run["max_abs_loss_diff_vs_fused"] = float(np.max(np.abs(
        np.subtract(run["losses"], runs["fused"]["losses"]))))

  timing = clock.report()
  support.write_reports(args.out, metrics, timing)
  support.print_summary(metrics, timing)
  return metrics


if __name__ == "__main__":
  main()
