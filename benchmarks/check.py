"""Issue 11's speed targets, read off one benchmark sweep: each with its ratio and ok / MISS.

Usage (from the repository root)::

  python benchmarks/check.py              # the full sweep, then the report (make bench-check)
  python benchmarks/check.py --quick      # any run.py option is passed on to the sweep
  python benchmarks/check.py --csv benchmarks/results/results.csv  # a finished sweep
  python benchmarks/check.py --csv A/results.csv --against B/results.csv  # and stability

Targets (ratio = jaxactv / peer, from the same interleaved rounds):

* every op x mode x dtype: geometric mean over the shapes <= 1.00x, and no shape above 1.10x;
* ``sigmoid_binary_cross_entropy`` forward + backward: <= 0.60x optax at every shape;
* ``linear_softmax_cross_entropy`` forward + backward: <= 1.10x the unfused ``x @ w`` +
  optax at every vocabulary, with <= 1/8 of its temp memory;
* on a GPU only: softmax and the cross-entropy losses, forward + backward at 32768
  classes or more, >= 80% of a plain copy's bandwidth;
* with ``--against`` a second run of the same command: every shape's ratio within
  +-5% of that run's.

It is a report, not a test: it prints, and exits 0 whatever it finds (1 only when
there is nothing to report on). ``make test`` does not run it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OURS, COPY, NAIVE = "jaxactv", "copy", "naive"
LINEAR_OP = "linear_softmax_cross_entropy"
BCE_OP = "sigmoid_binary_cross_entropy"
BANDWIDTH_OPS = (
    "softmax", "softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy",
)  # fmt: skip

GEOMEAN_MAX = 1.00
SHAPE_MAX = 1.10
BCE_MAX = 0.60
LINEAR_TIME_MAX = 1.10
LINEAR_TEMP_MAX = 1 / 8
COPY_FRACTION_MIN = 0.80
BANDWIDTH_MIN_CLASSES = 32768
REPEAT_TOLERANCE = 0.05


@dataclass
class Target:
  name: str
  measured: str
  ok: bool | None  # None: not applicable here (e.g. the GPU target on a CPU)

  def line(self) -> str:
    verdict = "n/a " if self.ok is None else "ok  " if self.ok else "MISS"
    return f"{verdict} {self.name}: {self.measured}"


def _num(v) -> float | None:
  if v in (None, ""):
    return None
  try:
    return float(v)
  except ValueError:
    return None


def _geomean(xs: list[float]) -> float:
  return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _cases(rows: list[dict]) -> dict[tuple, dict]:
  """``{(op, mode, dtype): {shape: {impl: row}}}`` in run order."""
  out: dict[tuple, dict] = {}
  for r in rows:
    out.setdefault((r["op"], r["mode"], r["dtype"]), {}).setdefault(r["shape"], {})[
        r["impl"]
    ] = r
  return out


def _peer(impls: dict) -> str | None:
  names = [n for n in impls if n not in (OURS, NAIVE, COPY)]
  return names[0] if names else None


def shape_ratio(impls: dict) -> float | None:
  """jaxactv / peer for one shape: the median per-round ratio (or the medians' ratio)."""
  ours, peer = impls.get(OURS), impls.get(_peer(impls))
  if ours is None:
    return None
  r = _num(ours.get("ratio"))
  if r is not None:
    return r
  a, b = _num(ours.get("median_ms")), None if peer is None else _num(peer.get("median_ms"))
  return None if a is None or not b else a / b


def _spread(impls: dict) -> str:
  ours = impls.get(OURS, {})
  lo, hi = _num(ours.get("ratio_p20")), _num(ours.get("ratio_p80"))
  return "" if lo is None or hi is None else f" [p20-p80 {lo:.2f}-{hi:.2f}]"


def _ratios(shapes: dict) -> tuple[list[tuple[str, float]], list[str]]:
  got, missing = [], []
  for shape, impls in shapes.items():
    r = shape_ratio(impls)
    if r is None or not r > 0:
      missing.append(shape)
    else:
      got.append((shape, r))
  return got, missing


def evaluate(rows: list[dict]) -> list[Target]:
  """Every target that the rows can speak to, in a fixed order."""
  cases = _cases(rows)
  targets: list[Target] = []
  backend = next((r.get("backend") for r in rows if r.get("backend")), "")

  for (op, mode, dtype), shapes in cases.items():
    got, missing = _ratios(shapes)
    name = f"{op} {mode} {dtype}: geomean <= {GEOMEAN_MAX:.2f}x, every shape <= {SHAPE_MAX:.2f}x"
    if not got:
      targets.append(Target(name, "no timing (failed: " + ", ".join(missing) + ")", False))
      continue
    g = _geomean([r for _, r in got])
    worst_shape, worst = max(got, key=lambda sr: sr[1])
    measured = f"geomean {g:.2f}x, max {worst:.2f}x at {worst_shape}" + _spread(
        shapes[worst_shape]
    )
    if missing:
      measured += "; no timing at " + ", ".join(missing)
    targets.append(Target(name, measured, g <= GEOMEAN_MAX and worst <= SHAPE_MAX and not missing))

  for (op, mode, dtype), shapes in cases.items():
    if op != BCE_OP or mode != "fwd+bwd":
      continue
    got, missing = _ratios(shapes)
    cells = [f"{r:.2f}x at {s}" for s, r in got] + [f"failed at {s}" for s in missing]
    ok = bool(got) and not missing and all(r <= BCE_MAX for _, r in got)
    targets.append(
        Target(f"{op} {mode} {dtype}: <= {BCE_MAX:.2f}x optax at every shape", ", ".join(cells), ok)
    )

  for (op, mode, dtype), shapes in cases.items():
    if op != LINEAR_OP or mode != "fwd+bwd":
      continue
    for shape, impls in shapes.items():
      r = shape_ratio(impls)
      ours, peer = impls.get(OURS, {}), impls.get(_peer(impls) or "", {})
      t_ours, t_peer = _num(ours.get("temp_bytes")), _num(peer.get("temp_bytes"))
      temp = None if t_ours is None or not t_peer else t_ours / t_peer
      name = (
          f"{op} {mode} {dtype} {shape}: <= {LINEAR_TIME_MAX:.2f}x unfused at "
          f"<= 1/{round(1 / LINEAR_TEMP_MAX)} of its temp memory"
      )
      measured = (
          f"time {'—' if r is None else f'{r:.2f}x'}{_spread(impls)}, "
          f"temp {'—' if temp is None else f'{temp:.3f}x'}"
      )
      ok = r is not None and temp is not None and r <= LINEAR_TIME_MAX and temp <= LINEAR_TEMP_MAX
      targets.append(Target(name, measured, ok))

  for (op, mode, dtype), shapes in cases.items():
    if op not in BANDWIDTH_OPS or mode != "fwd+bwd":
      continue
    big = {s: i for s, i in shapes.items() if int(s.split("x")[-1]) >= BANDWIDTH_MIN_CLASSES}
    if not big:
      continue
    name = (
        f"{op} {mode} {dtype}: >= {COPY_FRACTION_MIN:.0%} of a copy's bandwidth at "
        f">= {BANDWIDTH_MIN_CLASSES} classes (GPU)"
    )
    fracs = {s: _num(i.get(OURS, {}).get("roofline_fraction")) for s, i in big.items()}
    measured = ", ".join(
        f"{'—' if f is None else f'{f:.0%}'} at {s}" for s, f in fracs.items()
    )
    if backend != "gpu":
      targets.append(Target(name, f"not a GPU run (backend {backend}); here {measured}", None))
    else:
      ok = all(f is not None and f >= COPY_FRACTION_MIN for f in fracs.values())
      targets.append(Target(name, measured, ok))
  return targets


def stability(rows: list[dict], again: list[dict]) -> Target:
  """Every shape's ratio in ``rows`` within +-5% of the same shape's in ``again``."""
  first, second = _cases(rows), _cases(again)
  moves = []  # (|relative change|, case, ratio here, ratio there)
  missing = []  # timed in one run only: not within
  for key in dict.fromkeys([*first, *second]):
    for shape in dict.fromkeys([*first.get(key, {}), *second.get(key, {})]):
      a = shape_ratio(first.get(key, {}).get(shape, {}))
      b = shape_ratio(second.get(key, {}).get(shape, {}))
      if a and b:
        moves.append((abs(a / b - 1.0), f"{' '.join(key)} {shape}", a, b))
      else:
        missing.append(f"{' '.join(key)} {shape}")
  name = f"the same sweep twice: every shape's ratio within +-{REPEAT_TOLERANCE:.0%}"
  if not moves:
    return Target(name, "no shape timed in both runs", False)
  moves.sort()
  within = sum(m <= REPEAT_TOLERANCE for m, *_ in moves)
  median = moves[len(moves) // 2][0]
  worst, case, a, b = moves[-1]
  measured = (
      f"{within} of {len(moves) + len(missing)} shapes within; median change {median:.1%}, "
      f"90th percentile {moves[int(0.9 * (len(moves) - 1))][0]:.1%}, "
      f"largest {worst:.1%} ({case}: {a:.2f}x vs {b:.2f}x)"
  )
  if missing:
    measured += f"; timed in one run only: {', '.join(missing)}"
  return Target(name, measured, within == len(moves) and not missing)


def read_rows(path: Path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def report(rows: list[dict], out=sys.stdout, again: list[dict] | None = None) -> list[Target]:
  targets = evaluate(rows) + ([stability(rows, again)] if again else [])
  for t in targets:
    print(t.line(), file=out)
  judged = [t for t in targets if t.ok is not None]
  met = sum(bool(t.ok) for t in judged)
  print(f"{met} of {len(judged)} targets met", file=out)
  return targets


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
  p.add_argument("--csv", type=Path, help="report on this results.csv instead of running a sweep")
  p.add_argument("--against", type=Path,
                 help="a results.csv from a second run of the same command: adds the "
                 "stability target (every shape's ratio within +-5%%)")
  args, sweep_args = p.parse_known_args(argv)
  if args.csv is None:
    import run  # benchmarks/run.py, next to this file

    run_args = run.parse_args(sweep_args)
    if argv is None:  # the script itself: rerun under the sweep's allocator first
      run.use_steady_allocator(run_args.allocator)
    if run.main(sweep_args) != 0:
      return 1
    args.csv = run_args.out / "results.csv"
  elif sweep_args:
    p.error(f"with --csv no sweep runs; unexpected arguments {sweep_args}")
  rows = read_rows(args.csv)
  if not rows:
    print(f"no rows in {args.csv}")
    return 1
  again = read_rows(args.against) if args.against else None
  print(f"\nIssue 11's targets, from {args.csv}"
        + (f" (stability against {args.against})" if args.against else "") + ":")
  report(rows, again=again)
  return 0


if __name__ == "__main__":
  sys.exit(main())
