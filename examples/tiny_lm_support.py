"""Bookkeeping for train_tiny_lm.py: command line, corpus, tokenizer, batches, reports, plots.

Nothing here touches the model or the loss; read train_tiny_lm.py for those. This module
does not import jax, so a bad flag is reported before jax starts.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np

PROG = "train_tiny_lm.py"
PAD, EOS = "<pad>", "<eos>"  # token ids 0 and 1
HELDOUT_EVERY = 10  # every 10th standard-library file (in sorted order) is held out
HELDOUT_WINDOWS = 96  # evaluated windows, spread evenly over the held-out files
DPI = 120


# ----------------------------------------------------------------------------- CLI


class OneLineParser(argparse.ArgumentParser):
  """An argument parser whose errors are one line on stderr, without the usage block."""

  def error(self, message: str) -> NoReturn:
    fail(message)


def fail(message: str) -> NoReturn:
  print(f"{PROG}: error: {message}", file=sys.stderr)
  sys.exit(2)


def int_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  return values


def parse_args(argv: list[str] | None, doc: str) -> argparse.Namespace:
  p = OneLineParser(prog=PROG, description=doc.split("\n\n")[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--steps", type=int, default=200, help="training steps")
  p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
  p.add_argument("--d-model", type=int, default=96, help="width of the model")
  p.add_argument("--heads", type=int, default=4, help="attention heads")
  p.add_argument("--layers", type=int, default=2, help="transformer blocks")
  p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
  p.add_argument("--corpus-mb", type=float, default=1.5,
                 help="megabytes of standard-library source to train on")
  p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
  p.add_argument("--seed", type=int, default=0, help="seed for the init and the batch order")
  p.add_argument("--out", type=Path, default=Path("runs/tiny_lm"), help="output directory")
  p.add_argument("--compare-unfused", action="store_true",
                 help="also train with x @ w + optax's loss; measure both train steps' memory")
  p.add_argument("--devices", type=int, default=1,
                 help="also train on a (data, vocab) mesh of this many devices")
  p.add_argument("--data-parallel", type=int, default=2,
                 help="size of the mesh's data axis when --devices > 1")
  p.add_argument("--memory-tokens", type=int, default=16384,
                 help="tokens per step of the scaled-up shape (compiled, never run)")
  p.add_argument("--memory-vocabs", type=int_list, default=[8192, 16384, 32768, 65536, 131072],
                 help="vocabulary sizes of the memory sweep (compiled, never run)")
  args = p.parse_args(argv)
  for name in ("steps", "batch_size", "seq_len", "d_model", "heads", "layers", "devices",
               "data_parallel", "memory_tokens"):
    if getattr(args, name) < 1:
      fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.vocab_size < 300:
    fail(f"--vocab-size must be >= 300 (256 bytes, 2 special tokens, some merges), "
         f"got {args.vocab_size}")
  if args.d_model % args.heads:
    fail(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
  if not 0 < args.corpus_mb <= 100:
    fail(f"--corpus-mb must lie in (0, 100], got {args.corpus_mb}")
  if not 0 <= args.seed < 2**32:
    fail(f"--seed must lie in [0, 2**32), got {args.seed}")
  if any(v < 2 for v in args.memory_vocabs):
    fail(f"--memory-vocabs must all be >= 2, got {args.memory_vocabs}")
  if args.memory_tokens % args.seq_len:
    fail(f"--memory-tokens {args.memory_tokens} is not a multiple of --seq-len {args.seq_len}")
  if args.devices > 1:
    data = args.data_parallel
    if args.devices % data:
      fail(f"--devices {args.devices} does not split into a (data, vocab) mesh with "
           f"--data-parallel {data}: use a multiple of {data}, or change --data-parallel")
    vocab_shards = args.devices // data
    if args.batch_size % data:
      fail(f"--batch-size {args.batch_size} does not split over --data-parallel {data}")
    if args.vocab_size % vocab_shards:
      fail(f"--vocab-size {args.vocab_size} does not split into {vocab_shards} vocabulary "
           f"shards (--devices {args.devices} / --data-parallel {data})")
  check_writable(args.out)
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


# -------------------------------------------------------------------------- corpus


class Corpus(NamedTuple):
  train: list[str]  # file contents
  heldout: list[str]
  info: dict


def load_corpus(megabytes: float) -> Corpus:
  """The standard library's own ``*.py`` files, sorted by name: on every machine with Python.

  Every 10th file is held out, whole: no held-out line is trained on. The other files are
  taken in order until ``megabytes`` of text for training.
  """
  root = sysconfig.get_paths()["stdlib"]
  paths = sorted(glob.glob(os.path.join(root, "*.py")))
  if not paths:
    fail(f"found no *.py files in the standard library at {root}")
  train, heldout, budget = [], [], int(megabytes * 1e6)
  for i, path in enumerate(paths):
    if i % HELDOUT_EVERY == 0:
      heldout.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    elif sum(map(len, train)) < budget:
      train.append(Path(path).read_text(encoding="utf-8", errors="replace"))
  info = {"root": root, "python": sys.version.split()[0],
          "train_files": len(train), "heldout_files": len(heldout),
          "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, heldout))}
  return Corpus(train, heldout, info)


def train_tokenizer(texts: list[str], vocab_size: int):
  """A byte-level BPE tokenizer (the GPT-2 kind), trained on ``texts`` with `tokenizers`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer=trainer)
  assert tokenizer.token_to_id(PAD) == 0 and tokenizer.token_to_id(EOS) == 1
  return tokenizer


class Windows(NamedTuple):
  inputs: np.ndarray  # [n, seq_len] int32
  targets: np.ndarray  # [n, seq_len] int32: the next token, 0 (<pad>) past the end of a file
  mask: np.ndarray  # [n, seq_len] bool: False on padding, which must count for nothing


def make_windows(tokenizer, texts: list[str], seq_len: int) -> Windows:
  """Each file becomes ``<eos> tokens...``, cut into windows of ``seq_len`` next-token pairs.

  Windows never cross a file boundary, so the last one of each file is padded with <pad>;
  the mask marks the padded targets.
  """
  rows, lengths = [], []
  for enc in tokenizer.encode_batch(texts):
    ids = np.asarray([1, *enc.ids], np.int32)
    for start in range(0, len(ids) - 1, seq_len):
      chunk = ids[start:start + seq_len + 1]
      rows.append(np.pad(chunk, (0, seq_len + 1 - len(chunk))))  # pads with 0 == <pad>
      lengths.append(len(chunk))
  if not rows:
    fail("the corpus slice holds no tokens; raise --corpus-mb")
  data = np.stack(rows)
  valid = np.arange(1, seq_len + 1)[None, :] < np.asarray(lengths)[:, None]
  return Windows(data[:, :-1], data[:, 1:], valid)


def evenly_spaced(windows: Windows, count: int) -> Windows:
  """``count`` windows spread evenly over ``windows`` (all of them if there are fewer)."""
  keep = np.unique(np.linspace(0, len(windows.inputs) - 1, count).round().astype(int))
  return Windows(*(a[keep] for a in windows))


def batch_order(num_windows: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """``[steps, batch_size]`` window indices: a fresh permutation every epoch, fixed by seed."""
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_size // num_windows)
  order = np.concatenate([rng.permutation(num_windows) for _ in range(epochs)])
  return order[:steps * batch_size].reshape(steps, batch_size)


# ------------------------------------------------------------------------- reports


class Progress:
  """Prints ``step, loss, accuracy, tokens/s, elapsed`` about ten times per run."""

  def __init__(self, name: str, steps: int, clock: Clock):
    self.name, self.steps, self.clock = name, steps, clock
    self.every = max(1, steps // 10)
    self.last_time, self.tokens = time.perf_counter(), 0

  def update(self, step: int, loss, accuracy, tokens: int) -> None:
    self.tokens += tokens
    if (step + 1) % self.every and step + 1 != self.steps:
      return
    loss, accuracy = float(loss), float(accuracy)  # waits for the step to finish
    now = time.perf_counter()
    rate = self.tokens / (now - self.last_time)
    print(f"[{self.name}] step {step + 1:4d}/{self.steps}  loss {loss:.4f}  "
          f"accuracy {accuracy:.3f}  "
          f"{rate:8,.0f} tokens/s  elapsed {self.clock.elapsed():5.1f} s", flush=True)
    self.last_time, self.tokens = now, 0


class Clock:
  """Wall and CPU seconds (all threads) of each phase, for timing.json."""

  def __init__(self):
    self.wall, self.cpu, self.phases = time.perf_counter(), time.process_time(), {}
    self._last = (self.wall, self.cpu)

  def elapsed(self) -> float:
    return time.perf_counter() - self.wall

  def lap(self, phase: str) -> None:
    now = (time.perf_counter(), time.process_time())
    self.phases[phase] = {"wall_s": now[0] - self._last[0], "cpu_s": now[1] - self._last[1]}
    self._last = now

  def report(self) -> dict:
    return {"phases": self.phases, "total_wall_s": self.elapsed(),
            "total_cpu_s": time.process_time() - self.cpu}


def mib(n_bytes: int) -> str:
  return f"{n_bytes / 2**20:,.1f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:,.2f} GiB"


def rounded(tree, digits: int = 6):
  """Floats rounded for a stable, readable metrics.json."""
  if isinstance(tree, dict):
    return {k: rounded(v, digits) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [rounded(v, digits) for v in tree]
  if isinstance(tree, (float, np.floating)):
    return float(f"{float(tree):.{digits}g}")
  if isinstance(tree, np.integer):
    return int(tree)
  return tree


def write_reports(out: Path, metrics: dict, timing: dict) -> None:
  """``metrics.json`` (identical for identical flags and seed), ``timing.json`` and plots."""
  try:
    (out / "metrics.json").write_text(json.dumps(rounded(metrics), indent=2) + "\n")
    (out / "timing.json").write_text(json.dumps(rounded(timing, 4), indent=2) + "\n")
    plot_losses(metrics, out / "loss_curves.png")
    if "memory" in metrics:
      plot_memory(metrics["memory"], out / "memory_vs_vocab.png")
  except OSError as exc:
    fail(f"cannot write to {out}: {exc.strerror or exc}")


def plot_losses(metrics: dict, path: Path) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11, 4.2), layout="constrained")
  ax, diff = fig.subplots(1, 2)
  runs = metrics["runs"]
  steps = np.arange(1, len(runs["fused"]["losses"]) + 1)
  styles = {"fused": ("C0", "-", 2.5), "unfused": ("C1", "--", 1.2),
            "fused_sharded": ("C2", ":", 1.2)}
  for name, run in runs.items():
    color, style, width = styles[name]
    ax.plot(steps, run["losses"], style, color=color, lw=width, label=f"{name} (train)")
    if name != "fused":
      gap = np.abs(np.subtract(run["losses"], runs["fused"]["losses"]))
      diff.semilogy(steps, np.maximum(gap, 1e-9), style, color=color, lw=1.2, label=name)
  evals = metrics["heldout"]["curve"]
  ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="k",
          label="fused (held-out)")
  ax.set(xlabel="step", ylabel="cross-entropy (nats per token)",
         title=f"tiny LM on the standard library, V = {metrics['config']['vocab_size']}")
  ax.legend()
  diff.axhline(1e-4, color="gray", lw=0.8, ls="--")
  diff.set(xlabel="step", ylabel="|loss - fused loss|",
           title="the same steps from the same init (floor 1e-9 = equal)")
  if len(runs) > 1:
    diff.legend()
  fig.savefig(path, dpi=DPI)


def plot_memory(memory: dict, path: Path) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.5, 4.2), layout="constrained")
  ax = fig.subplots()
  sweep = memory["vocab_sweep"]
  vocabs = [row["vocab"] for row in sweep]
  for key, label, marker in (("unfused_temp_bytes", "x @ w + optax CE", "s"),
                             ("fused_temp_bytes", "jaxactv.linear_softmax_cross_entropy", "o")):
    ax.loglog(vocabs, [row[key] / 2**20 for row in sweep], marker + "-", base=2, label=label)
  ax.set(xlabel="vocabulary size V", ylabel="XLA temp memory of the train step (MiB)",
         title=f"one train step, {sweep[0]['tokens']:,} tokens, compiled only")
  ax.legend()
  ax.grid(True, which="major", alpha=0.3)
  fig.savefig(path, dpi=DPI)


def print_summary(metrics: dict, timing: dict) -> None:
  held = metrics["heldout"]
  print(f"held-out: loss {held['loss']:.4f}, perplexity {held['perplexity']:.1f}, next-token "
        f"accuracy {held['accuracy']:.3f} on {held['tokens']:,} tokens of files never trained on")
  for name, run in metrics["runs"].items():
    where = f" on mesh {run['mesh']}, per device" if "mesh" in run else ""
    line = f"{name}: train step temp memory{where} {mib(run['train_step_temp_bytes'])}"
    if name != "fused":
      line += (f"; largest per-step loss difference from fused "
               f"{run['max_abs_loss_diff_vs_fused']:.2e} over {len(run['losses'])} steps")
      if "max_abs_loss_diff_same_params" in run:
        line += (f" (at the same, trained weights: {run['max_abs_loss_diff_same_params']:.2e} "
                 "on the held-out batches)")
    print(line)
  if "memory" in metrics:
    print("XLA temp memory of one compiled train step (value_and_grad + AdamW):")
    for label, row in [("example", metrics["memory"]["example"]),
                       *[("compiled only", r) for r in metrics["memory"]["vocab_sweep"]]]:
      fused, unfused = row["fused_temp_bytes"], row["unfused_temp_bytes"]
      print(f"  {label:>13}: {row['tokens']:6,} tokens, V = {row['vocab']:7,}: fused "
            f"{mib(fused):>11}, unfused {mib(unfused):>11} ({unfused / max(fused, 1):.1f}x)")
  for sample in metrics["samples"]:
    print(f"--- greedy from {sample['prompt']!r}:\n{sample['text']}")
  print("---")
  wall = {k: round(v["wall_s"], 1) for k, v in timing["phases"].items()}
  print(f"done in {timing['total_wall_s']:.1f} s ({timing['total_cpu_s']:.1f} s of CPU time); "
        f"by phase, seconds: {wall}; wrote {metrics['config']['out']}/")
