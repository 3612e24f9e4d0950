"""Softmax for one right answer, sigmoid for several: measured on real handwritten digits.

Three small MLPs, written in plain JAX and trained with optax on scikit-learn's UCI
8x8 handwritten digits (shipped with scikit-learn, nothing is downloaded):

1. multi-class: one digit per image, ``jaxactv.softmax_cross_entropy_with_integer_labels``;
2. multi-label: 1 to 3 distinct digits side by side, labelled with the set present,
   ``jaxactv.sigmoid_binary_cross_entropy`` (one independent yes/no per digit);
3. the wrong tool: the same multi-label data with ``jaxactv.softmax_cross_entropy``
   against the normalised label distribution (the classes share one unit of mass).

(2) and (3) are compared on the test split at the threshold 0.5 and at each model's
best validation threshold, overall and by the number of digits in the image.

Run it with ``make demo`` or ``python examples/train_digits.py [--steps N] [--seed S]
[--out DIR]``; it writes ``metrics.json`` and PNG plots into ``runs/digits/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxactv

PROG = "train_digits.py"
NUM_CLASSES = 10
SIDE = 8  # the UCI digits are 8x8 images
SLOTS = 3  # a multi-label canvas holds up to three digits side by side
THRESHOLDS = np.round(np.arange(0.02, 0.981, 0.02), 2)  # searched on the validation split
COMPOSITES = {"train": 12000, "val": 1000, "test": 1000}
HIDDEN = (256, 256)
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
DPI = 120

Params = list[dict[str, jax.Array]]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- CLI


class OneLineParser(argparse.ArgumentParser):
  """An argument parser whose errors are one line on stderr, without the usage block."""

  def error(self, message: str) -> NoReturn:
    fail(message)


def fail(message: str) -> NoReturn:
  print(f"{PROG}: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=3000,
                      help="training steps for each of the three models")
  parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
  parser.add_argument("--seed", type=int, default=0, help="seed for splits, data, init, batches")
  parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="output directory")
  args = parser.parse_args(argv)
  if args.steps < 1:
    fail(f"--steps must be >= 1, got {args.steps}")
  if args.batch_size < 1:
    fail(f"--batch-size must be >= 1, got {args.batch_size}")
  if not 0 <= args.seed < 2**32:
    fail(f"--seed must lie in [0, 2**32), got {args.seed}")
  return args


def check_writable(out: Path) -> None:
  """Create ``out`` and write a probe file there, before any time is spent training."""
  if out.exists() and not out.is_dir():
    fail(f"cannot write to {out}: it is a file, not a directory")
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".write_probe"
    probe.write_text("ok")
    probe.unlink()
  except OSError as exc:
    fail(f"cannot write to {out}: {exc.strerror or exc}")


# ---------------------------------------------------------------------------- data


class Digits(NamedTuple):
  images: np.ndarray  # [n, 8, 8] float32 in [0, 1]
  labels: np.ndarray  # [n] int32


class Composites(NamedTuple):
  images: np.ndarray  # [n, 8, 24] float32: three 8x8 slots side by side
  labels: np.ndarray  # [n, 10] float32 multi-hot: the set of digits present
  counts: np.ndarray  # [n] int: how many digits (1, 2 or 3)


def split_digits(seed: int) -> dict[str, Digits]:
  """The 1797 digits split 60/20/20 into train/val/test, stratified by class."""
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)
  labels = data.target.astype(np.int32)
  index = np.arange(len(labels))
  train, rest = train_test_split(index, test_size=0.4, stratify=labels, random_state=seed)
  val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
  return {name: Digits(images[i], labels[i]) for name, i in
          (("train", train), ("val", val), ("test", test))}


def compose(digits: Digits, n: int, rng: np.random.Generator) -> Composites:
  """``n`` canvases of 1-3 distinct digit classes, each a real image from ``digits``.

  The number of digits is uniform in {1, 2, 3}; the classes are distinct, their slots
  random, empty slots blank. Every image placed comes from ``digits`` only, so test
  composites are made of test digits the models never saw.
  """
  counts = rng.integers(1, SLOTS + 1, size=n)
  classes = np.argsort(rng.random((n, NUM_CLASSES)), axis=1)[:, :SLOTS]
  slots = np.argsort(rng.random((n, SLOTS)), axis=1)
  by_class = np.argsort(digits.labels, kind="stable")
  sizes = np.bincount(digits.labels, minlength=NUM_CLASSES)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  canvases = np.zeros((n, SIDE, SIDE * SLOTS), np.float32)
  multi_hot = np.zeros((n, NUM_CLASSES), np.float32)
  rows = np.arange(n)
  for j in range(SLOTS):
    present = j < counts
    c = classes[:, j]
    pick = by_class[starts[c] + rng.integers(0, sizes[c])]
    for s in range(SLOTS):
      here = present & (slots[:, j] == s)
      canvases[here, :, SIDE * s : SIDE * (s + 1)] = digits.images[pick[here]]
    multi_hot[rows[present], c[present]] = 1.0
  return Composites(canvases, multi_hot, counts)


# --------------------------------------------------------------------------- model


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> Params:
  """He-initialised dense layers ``sizes[0] -> ... -> sizes[-1]``."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [
      {"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}
      for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def mlp(params: Params, x: jax.Array) -> jax.Array:
  """Logits of a ReLU MLP for flattened images ``x`` of shape ``[batch, features]``."""
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


predict_logits = jax.jit(mlp)


def multiclass_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jaxactv.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")


def sigmoid_bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  # Ten independent yes/no questions: "is digit c in the image?"
  return jaxactv.sigmoid_binary_cross_entropy(logits, labels, reduction="mean")


def softmax_ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  # The wrong tool: one distribution over the digits, its mass split evenly among
  # the digits present (1/2 each for two digits).
  target = labels / labels.sum(-1, keepdims=True)
  return jaxactv.softmax_cross_entropy(logits, target, reduction="mean")


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
  """The whole step, loss, gradient and update, as one compiled function."""

  def objective(params, x, y):
    return loss_fn(mlp(params, x), y)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(objective)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


# ------------------------------------------------------------------------- metrics


def multilabel_scores(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
  """Exact match and micro-F1 of ``probs > threshold`` against multi-hot ``labels``."""
  pred = probs > threshold
  truth = labels > 0.5
  tp = int(np.sum(pred & truth))
  fp = int(np.sum(pred & ~truth))
  fn = int(np.sum(~pred & truth))
  n_pred = pred.sum(axis=1)
  return {
      "exact_match": float(np.mean(np.all(pred == truth, axis=1))),
      "micro_f1": 2 * tp / max(2 * tp + fp + fn, 1),
      "mean_digits_called": float(n_pred.mean()),
      "max_digits_called": int(n_pred.max()),
  }


def best_threshold(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """The grid threshold with the highest micro-F1 (the smallest one on a tie)."""
  f1 = [multilabel_scores(probs, labels, t)["micro_f1"] for t in THRESHOLDS]
  i = int(np.argmax(f1))
  return float(THRESHOLDS[i]), f1[i]


def rounded(tree):
  """Floats rounded to 4 decimals, for a metrics.json a person can read."""
  if isinstance(tree, dict):
    return {k: rounded(v) for k, v in tree.items()}
  if isinstance(tree, float):
    return round(tree, 4)
  return tree


# ------------------------------------------------------------------------ training


class Run(NamedTuple):
  params: Params
  losses: np.ndarray  # per-step training loss
  eval_steps: list[int]
  evals: list[dict[str, float]]  # validation figures at eval_steps


def train(
    name: str,
    loss_fn: LossFn,
    x: np.ndarray,
    y: np.ndarray,
    validate: Callable[[Params], dict[str, float]],
    *,
    key: jax.Array,
    rng: np.random.Generator,
    steps: int,
    batch_size: int,
) -> Run:
  """Adam(W) with a cosine schedule on minibatches drawn without replacement per epoch."""
  params = init_mlp(key, (x.shape[1], *HIDDEN, NUM_CLASSES))
  schedule = optax.cosine_decay_schedule(LEARNING_RATE, steps, alpha=0.02)
  optimizer = optax.adamw(schedule, weight_decay=WEIGHT_DECAY)
  opt_state = optimizer.init(params)
  train_step = make_train_step(loss_fn, optimizer)
  batch_size = min(batch_size, len(x))
  eval_every = max(1, steps // 30)
  report_every = 3 * eval_every
  losses, eval_steps, evals = [], [], []
  order, pos = rng.permutation(len(x)), 0
  start = time.perf_counter()
  for step in range(1, steps + 1):
    if pos + batch_size > len(x):
      order, pos = rng.permutation(len(x)), 0
    idx = order[pos : pos + batch_size]
    pos += batch_size
    params, opt_state, loss = train_step(params, opt_state, x[idx], y[idx])
    losses.append(loss)
    if step % eval_every and step != steps:
      continue
    figures = validate(params)
    eval_steps.append(step)
    evals.append(figures)
    if step % report_every == 0 or step == steps:
      recent = float(np.mean(jax.device_get(losses[-report_every:])))
      shown = "  ".join(f"{k} {v:.3f}" for k, v in figures.items())
      print(
          f"[{name:>11}] step {step:5d}/{steps}  train loss {recent:.4f}  {shown}"
          f"  {time.perf_counter() - start:5.1f}s",
          flush=True,
      )
  return Run(params, np.asarray(jax.device_get(losses)), eval_steps, evals)


def probabilities(kind: str, params: Params, images: np.ndarray) -> np.ndarray:
  logits = predict_logits(params, images.reshape(len(images), -1))
  probs = jaxactv.sigmoid(logits) if kind == "sigmoid_bce" else jaxactv.softmax(logits)
  return np.asarray(probs, dtype=np.float64)


# --------------------------------------------------------------------------- plots


MODEL_COLORS = {"sigmoid_bce": "tab:blue", "softmax_ce": "tab:orange"}
MODEL_NAMES = {"sigmoid_bce": "sigmoid + BCE", "softmax_ce": "softmax + CE"}


def smooth(values: np.ndarray, width: int) -> np.ndarray:
  width = max(1, min(width, len(values)))
  kernel = np.ones(width) / width
  return np.convolve(values, kernel, mode="valid")


def plot_training(runs: dict[str, Run], target_entropy: float, path: Path) -> None:
  fig = Figure(figsize=(15, 7.5), layout="constrained")
  axes = fig.subplots(2, 3, sharex="col", height_ratios=[1.3, 1])
  panels = [
      ("multiclass", "1. multi-class, softmax CE (one digit)", "tab:green",
       [("val_accuracy", "accuracy", "-")]),
      ("sigmoid_bce", "2. multi-label, sigmoid BCE", MODEL_COLORS["sigmoid_bce"],
       [("val_f1_tuned", "micro-F1, best threshold", "-"),
        ("val_f1_at_0.5", "micro-F1 at 0.5", "--")]),
      ("softmax_ce", "3. multi-label, softmax CE (the wrong tool)", MODEL_COLORS["softmax_ce"],
       [("val_f1_tuned", "micro-F1, best threshold", "-"),
        ("val_f1_at_0.5", "micro-F1 at 0.5", "--")]),
  ]
  for col, (key, title, color, val_lines) in enumerate(panels):
    run, top, bottom = runs[key], axes[0, col], axes[1, col]
    steps = np.arange(1, len(run.losses) + 1)
    width = max(1, len(run.losses) // 50)
    top.plot(steps, run.losses, color=color, alpha=0.2, lw=0.8, label="per step")
    top.plot(steps[width - 1 :], smooth(run.losses, width), color=color, lw=1.8,
             label=f"moving average ({width} steps)")
    if key == "softmax_ce":
      # Soft targets have entropy log(k) > 0: cross-entropy cannot go below their mean.
      top.axhline(target_entropy, color="black", ls=":", lw=1.2,
                  label=f"floor: mean entropy of the targets, {target_entropy:.3f}")
    else:
      top.set_yscale("log")
    top.set_title(title)
    top.set_ylabel("training loss" + ("" if key == "softmax_ce" else " (log scale)"))
    top.grid(alpha=0.3)
    top.legend(loc="upper right", fontsize=8)
    for metric, label, style in val_lines:
      values = [e[metric] for e in run.evals]
      bottom.plot(run.eval_steps, values, style, color=color, marker="o", ms=2.5, label=label)
    bottom.set_ylim(0, 1.02)
    bottom.set_xlabel("step")
    bottom.set_ylabel("validation score")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="lower right", fontsize=8)
  fig.suptitle("Training curves. Losses are not comparable across panels: BCE averages 10 "
               "yes/no questions per image, CE one distribution per image")
  fig.savefig(path, dpi=DPI)


def pick_examples(counts: np.ndarray, per_count: int = 2) -> list[int]:
  """The first ``per_count`` test composites holding 1, 2 and 3 digits."""
  return [int(i) for k in range(1, SLOTS + 1) for i in np.flatnonzero(counts == k)[:per_count]]


def plot_examples(test: Composites, probs: dict[str, np.ndarray], thresholds: dict[str, float],
                  path: Path) -> None:
  chosen = pick_examples(test.counts)
  fig = Figure(figsize=(14, 2.2 * len(chosen) + 1.0), layout="constrained")
  axes = fig.subplots(len(chosen), 3, width_ratios=[1.1, 1, 1])
  classes = np.arange(NUM_CLASSES)
  for row, i in zip(axes, chosen, strict=True):
    truth = np.flatnonzero(test.labels[i])
    row[0].imshow(test.images[i], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    row[0].set_xticks([])
    row[0].set_yticks([])
    row[0].set_title(f"test image {i}: digits {set_str(truth)}", fontsize=10)
    for ax, kind in zip(row[1:], ("sigmoid_bce", "softmax_ce"), strict=True):
      p = probs[kind][i]
      t = thresholds[kind]
      colors = [MODEL_COLORS[kind] if c in truth else "lightgray" for c in classes]
      ax.bar(classes, p, color=colors, edgecolor="black", linewidth=0.5)
      ax.axhline(0.5, color="black", ls="--", lw=1)
      ax.axhline(t, color="crimson", ls=":", lw=1.5)
      ax.set_ylim(0, 1.05)
      ax.set_xticks(classes)
      ax.set_ylabel("probability")
      ax.set_title(f"{MODEL_NAMES[kind]} (sum {p.sum():.2f}): calls "
                   f"{set_str(np.flatnonzero(p > 0.5))} at 0.5, "
                   f"{set_str(np.flatnonzero(p > t))} at {t:.2f}", fontsize=9.5)
  for ax in axes[-1][1:]:
    ax.set_xlabel("digit")
  legend = [
      *(Patch(facecolor=MODEL_COLORS[kind], edgecolor="black", label=f"{name}: digit present")
        for kind, name in (("sigmoid_bce", "sigmoid"), ("softmax_ce", "softmax"))),
      Patch(facecolor="lightgray", edgecolor="black", label="digit absent"),
      Line2D([], [], color="black", ls="--", label="threshold 0.5"),
      Line2D([], [], color="crimson", ls=":", lw=1.5,
             label="threshold tuned on validation (per model)"),
  ]
  fig.legend(handles=legend, loc="outside lower center", ncols=5, fontsize=9)
  fig.suptitle("Multi-label test images: sigmoid probabilities are independent (need not sum "
               "to 1); softmax probabilities share one unit", fontsize=12)
  fig.savefig(path, dpi=DPI)


def set_str(digits) -> str:
  return "{" + ", ".join(str(int(d)) for d in digits) + "}" if len(digits) else "{}"


def plot_per_count(multilabel: dict, path: Path) -> None:
  fig = Figure(figsize=(13, 4.5), layout="constrained")
  axes = fig.subplots(1, 2)
  groups = ["1", "2", "3", "all"]
  series = [
      ("sigmoid_bce", "at_0.5", "sigmoid, t = 0.5", 0.55, "//"),
      ("sigmoid_bce", "tuned", "sigmoid, tuned t", 1.0, ""),
      ("softmax_ce", "at_0.5", "softmax, t = 0.5", 0.55, "//"),
      ("softmax_ce", "tuned", "softmax, tuned t", 1.0, ""),
  ]
  width = 0.2
  x = np.arange(len(groups))
  for ax, metric, title in zip(axes, ("micro_f1", "exact_match"),
                               ("micro-F1", "exact match (all 10 answers right)"), strict=True):
    for j, (kind, which, label, alpha, hatch) in enumerate(series):
      values = []
      for g in groups:
        if g == "all":
          values.append(figure_at(multilabel[kind], which)[metric])
        else:
          values.append(multilabel[kind]["by_count"][g][which][metric])
      bars = ax.bar(x + (j - 1.5) * width, values, width, color=MODEL_COLORS[kind], alpha=alpha,
                    hatch=hatch, edgecolor="black", linewidth=0.5, label=label)
      ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, ["1 digit", "2 digits", "3 digits", "all images"])
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(f"test {title}")
    ax.grid(axis="y", alpha=0.3)
  for ax in axes:
    ax.legend(loc="upper center", ncols=4, fontsize=8)
  fig.suptitle("By number of digits in the image: at 0.5 softmax can call at most one digit")
  fig.savefig(path, dpi=DPI)


def figure_at(entry: dict, which: str) -> dict:
  return entry["at_0.5"] if which == "at_0.5" else entry


def plot_activations(path: Path) -> None:
  fig = Figure(figsize=(15, 5.2), layout="constrained")
  axes = fig.subplots(1, 3)

  # (a) the sigmoid, and the two-class softmax that equals it.
  z = jnp.linspace(-8, 8, 401)
  sig = jaxactv.sigmoid(z)
  two = jaxactv.softmax(jnp.stack([z, jnp.zeros_like(z)], axis=-1))[:, 0]
  ax = axes[0]
  ax.plot(z, sig, lw=2.5, color=MODEL_COLORS["sigmoid_bce"], label=r"sigmoid$(z)$")
  ax.plot(z, two, lw=1.5, ls="--", color=MODEL_COLORS["softmax_ce"],
          label=r"softmax$([z, 0])_0$ (identical)")
  ax.axhline(0.5, color="gray", lw=0.8, ls=":")
  ax.set_xlabel("logit z")
  ax.set_ylabel("probability")
  ax.set_title("sigmoid: one yes/no question per logit")
  ax.legend(loc="upper left", fontsize=9)
  ax.grid(alpha=0.3)

  # (b) two digits present: the same logits through both functions.
  logits = jnp.array([-3.0, -2.5, -4.0, 4.0, -3.0, -2.0, -3.5, 4.0, -2.5, -3.0])
  classes = np.arange(NUM_CLASSES)
  ax = axes[1]
  s_bar = np.asarray(jaxactv.sigmoid(logits))
  m_bar = np.asarray(jaxactv.softmax(logits))
  ax.bar(classes - 0.2, s_bar, 0.4, color=MODEL_COLORS["sigmoid_bce"],
         label=f"sigmoid (sum {s_bar.sum():.2f})")
  ax.bar(classes + 0.2, m_bar, 0.4, color=MODEL_COLORS["softmax_ce"],
         label=f"softmax (sum {m_bar.sum():.2f})")
  ax.axhline(0.5, color="black", ls="--", lw=1, label="threshold 0.5")
  ax.set_xticks(classes)
  ax.set_ylim(0, 1.3)
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.set_xlabel("digit")
  ax.set_ylabel("probability")
  ax.set_title("same logits, digits 3 and 7 both strong")
  ax.annotate(f"softmax: {m_bar[3]:.2f} each,\nneither is above 0.5", xy=(7.2, float(m_bar[7])),
              xytext=(4.6, 0.72), fontsize=9, arrowprops={"arrowstyle": "->", "lw": 0.8},
              ha="center")
  ax.legend(loc="upper center", ncols=3, fontsize=8.5)

  # (c) softmax outputs compete: raising one logit takes mass from the others.
  a = jnp.linspace(-4, 6, 301)
  rows = jnp.stack([a, jnp.full_like(a, 1.0), jnp.zeros_like(a)], axis=-1)
  soft = np.asarray(jaxactv.softmax(rows))
  sig = np.asarray(jaxactv.sigmoid(rows))
  ax = axes[2]
  names = ("A (logit a)", "B (logit 1)", "C (logit 0)")
  colors = ("tab:orange", "tab:purple", "tab:brown")
  for j, color in enumerate(colors):
    ax.plot(a, soft[:, j], color=color, lw=2)
    ax.plot(a, sig[:, j], color=color, lw=1.2, ls="--")
  ax.plot(a, soft.sum(1), color="black", lw=1, ls=":")
  handles = [Line2D([], [], color=c, lw=2, label=f"class {n}") for n, c in zip(
      names, colors, strict=True)]
  handles += [
      Line2D([], [], color="gray", lw=2, label="softmax([a, 1, 0])"),
      Line2D([], [], color="gray", lw=1.2, ls="--", label="sigmoid of each logit alone"),
      Line2D([], [], color="black", lw=1, ls=":", label="softmax sum (always 1)"),
  ]
  ax.set_xlim(float(a[0]), float(a[-1]))
  ax.set_ylim(0, 1.05)
  ax.set_xlabel("logit a of class A (B's logit is 1, C's is 0)")
  ax.set_ylabel("probability")
  ax.set_title("softmax: raising A takes mass from B and C")
  ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2,
            fontsize=8)
  ax.grid(alpha=0.3)
  fig.suptitle("Sigmoid answers each class on its own; softmax makes the classes compete")
  fig.savefig(path, dpi=DPI)


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
  t0 = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  # The two multi-label models start from the same weights and see the same batches:
  # only the output function and its loss differ.
  init_keys = jax.random.split(jax.random.key(args.seed), 2)
  digits = split_digits(args.seed)
  composites = {name: compose(digits[name], n, rng) for name, n in COMPOSITES.items()}
  flat = {name: c.images.reshape(len(c.images), -1) for name, c in composites.items()}
  print(
      f"data: {len(digits['train'].labels)}/{len(digits['val'].labels)}/"
      f"{len(digits['test'].labels)} single digits (train/val/test); "
      f"{'/'.join(str(v) for v in COMPOSITES.values())} composites of 1-3 digits "
      f"built from the matching split"
  )

  # 1. multi-class.
  single = {name: d.images.reshape(len(d.labels), -1) for name, d in digits.items()}

  def validate_multiclass(params):
    pred = np.argmax(np.asarray(predict_logits(params, single["val"])), axis=1)
    return {"val_accuracy": float(np.mean(pred == digits["val"].labels))}

  runs = {
      "multiclass": train(
          "multiclass", multiclass_loss, single["train"], digits["train"].labels,
          validate_multiclass, key=init_keys[0], rng=np.random.default_rng((args.seed, 0)),
          steps=args.steps,
          batch_size=args.batch_size,
      )
  }
  logits = predict_logits(runs["multiclass"].params, single["test"])
  test_accuracy = float(np.mean(np.argmax(np.asarray(logits), 1) == digits["test"].labels))

  # 2 and 3. multi-label, the right and the wrong tool.
  val = composites["val"]
  for kind, loss_fn in (("sigmoid_bce", sigmoid_bce_loss), ("softmax_ce", softmax_ce_loss)):

    def validate_multilabel(params, kind=kind):
      p = probabilities(kind, params, val.images)
      _, f1 = best_threshold(p, val.labels)
      return {"val_f1_tuned": f1,
              "val_f1_at_0.5": multilabel_scores(p, val.labels, 0.5)["micro_f1"]}

    runs[kind] = train(
        kind, loss_fn, flat["train"], composites["train"].labels, validate_multilabel,
        key=init_keys[1], rng=np.random.default_rng((args.seed, 1)), steps=args.steps,
        batch_size=args.batch_size,
    )

  train_counts = composites["train"].counts
  target_entropy = float(np.mean(np.log(train_counts)))
  test = composites["test"]
  multilabel, probs, thresholds = {}, {}, {}
  for kind in ("sigmoid_bce", "softmax_ce"):
    params = runs[kind].params
    t, val_f1 = best_threshold(probabilities(kind, params, val.images), val.labels)
    p = probabilities(kind, params, test.images)
    tuned = multilabel_scores(p, test.labels, t)
    by_count = {}
    for k in range(1, SLOTS + 1):
      sel = test.counts == k
      by_count[str(k)] = {
          "n_images": int(sel.sum()),
          "tuned": multilabel_scores(p[sel], test.labels[sel], t),
          "at_0.5": multilabel_scores(p[sel], test.labels[sel], 0.5),
      }
    multilabel[kind] = {
        **tuned,
        "threshold": t,
        "val_micro_f1": val_f1,
        "at_0.5": multilabel_scores(p, test.labels, 0.5),
        "by_count": by_count,
    }
    probs[kind], thresholds[kind] = p, t

  metrics = rounded({
      "multiclass": {
          "test_accuracy": test_accuracy,
          "val_accuracy": runs["multiclass"].evals[-1]["val_accuracy"],
          "n_test": len(digits["test"].labels),
      },
      "multilabel": multilabel,
      "config": {
          "seed": args.seed,
          "steps": args.steps,
          "batch_size": args.batch_size,
          "hidden": list(HIDDEN),
          "learning_rate": LEARNING_RATE,
          "composites": COMPOSITES,
          "threshold_grid": [float(THRESHOLDS[0]), float(THRESHOLDS[-1]), 0.02],
          "jax": jax.__version__,
          "jaxactv": jaxactv.__version__,
      },
      "notes": {
          "exact_match, micro_f1": "test split, at the threshold tuned on validation",
          "at_0.5": "test split, at the threshold 0.5 (a digit is called when p > t)",
          "by_count": "test split, by the number of digits in the image",
          "softmax at 0.5": "softmax probabilities sum to 1, so at most one can exceed 0.5",
      },
  })
  train_time = time.perf_counter() - t0

  out = args.out
  try:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_training(runs, target_entropy, out / "training_curves.png")
    plot_examples(test, probs, thresholds, out / "multilabel_examples.png")
    plot_per_count(multilabel, out / "per_count.png")
    plot_activations(out / "activations.png")
  except OSError as exc:
    fail(f"cannot write to {out}: {exc.strerror or exc}")
  print_summary(metrics, out, train_time, time.perf_counter() - t0)
  return metrics


def print_summary(metrics: dict, out: Path, train_time: float, total: float) -> None:
  mc, ml = metrics["multiclass"], metrics["multilabel"]
  print(f"\nmulti-class test accuracy: {mc['test_accuracy']:.4f} ({mc['n_test']} digits)")
  print("multi-label test set            threshold  exact match  micro-F1  max digits called")
  for kind in ("sigmoid_bce", "softmax_ce"):
    tuned = f"tuned {ml[kind]['threshold']:.2f}"
    for label, entry in (("0.5", ml[kind]["at_0.5"]), (tuned, ml[kind])):
      print(f"  {MODEL_NAMES[kind]:<24}  {label:>12}  {entry['exact_match']:11.4f}  "
            f"{entry['micro_f1']:8.4f}  {entry['max_digits_called']:17d}")
  print("micro-F1 by digits per image (tuned threshold / at 0.5):")
  for k in ("1", "2", "3"):
    cells = []
    for kind in ("sigmoid_bce", "softmax_ce"):
      c = ml[kind]["by_count"][k]
      cells.append(f"{MODEL_NAMES[kind]} {c['tuned']['micro_f1']:.3f} / "
                   f"{c['at_0.5']['micro_f1']:.3f}")
    print(f"  {k} digit(s): " + "   ".join(cells))
  print(f"\nwrote {out}/metrics.json and 4 PNG plots "
        f"(training {train_time:.1f}s, total {total:.1f}s)")


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  check_writable(args.out)
  run(args)


if __name__ == "__main__":
  main()
