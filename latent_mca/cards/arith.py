"""Exact arithmetic on card-game formulas: a JAX evaluator, a Python oracle and a 24 solver.

A formula is a sequence of symbol ids into `render.SYMBOLS` ("1".."10", "+", "-", "*",
"/", "(", ")", "="), stored as int32 [L] padded to a static length with its true length
beside it. The grammar is the usual infix one and nothing more:

  expr := term (("+" | "-") term)*      term := atom (("*" | "/") atom)*
  atom := number | "(" expr ")"

so `*` and `/` bind tighter than `+` and `-`, equal precedences associate to the left,
and a formula is malformed (invalid) on two numbers in a row (no digit concatenation),
unary signs, empty or unbalanced parentheses, an operator at either end, "=" inside the
formula, or division by zero. The reference (RL4VLM `gym_cards/envs/points.py`,
`_evaluate_formula`) `eval`s the joined string in Python floats instead, which also
accepts "1" "2" as 12, "+3", and "*" "*" as a power, and misses 8/(3-8/3) = 24 by
rounding; exact rationals and a strict grammar are deliberate departures.

Values are exact rationals (numerator, denominator) in int32 with a positive
denominator, reduced once at the end (a gcd per operation would double the compile
time). A formula whose intermediate products would leave int32 is reported invalid
rather than wrapped; with at most four numbers up to 10 (the games) no unreduced
numerator, denominator or intermediate product exceeds 10^4 (checked exhaustively).

Three pieces:
- `evaluate(formula, length) -> (num, den, valid)`: jittable and vmappable, a
  shunting-yard pass as a `lax.scan` over the static length with array stacks.
  `uses_each_once` is the multiset check "the numbers used are the cards' values,
  each exactly once".
- `evaluate_symbols(symbols) -> Fraction | None`: the plain-Python recursive-descent
  evaluator of the same grammar, the oracle the tests hold the JAX one to.
- `solve(values, target)` finds a formula (as symbol strings) that uses each value once
  and equals `target`; `solvable_table()` lists the solvable sorted 4-tuples of 1..10
  for 24 and `solvable_mask()` is the same as a boolean [10, 10, 10, 10] lookup table
  for JAX deals.
"""

from __future__ import annotations

import fractions
import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_mca.cards.render import SYMBOLS

MAX_NUMBER = 10
if SYMBOLS[:MAX_NUMBER] != tuple(str(n) for n in range(1, MAX_NUMBER + 1)):
  raise ImportError(f"render.SYMBOLS must start with the numbers 1..10, got {SYMBOLS}")
# Symbol ids: a number n is id n - 1.
PLUS, MINUS, TIMES, DIVIDE, LPAREN, RPAREN, EQUALS = (
    SYMBOLS.index(s) for s in ("+", "-", "*", "/", "(", ")", "="))
OPERATORS = ("+", "-", "*", "/")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

# Products beyond this make a formula invalid (float32 estimates decide, with margin).
_LIMIT = float(2 ** 30)


def symbol_ids(symbols: Sequence[str]) -> list[int]:
  """Symbol strings -> ids into `SYMBOLS` (ValueError on an unknown symbol)."""
  return [SYMBOLS.index(s) for s in symbols]


# ----------------------------------------------------------------------------- JAX evaluator


def _rational_op(op, an, ad, bn, bd):
  """(an/ad) op (bn/bd) for an operator id; returns (num, den, ok), unreduced, den > 0."""
  f = lambda x: x.astype(jnp.float32)
  # Candidates for all four operators; `op` picks one (vmap would run all branches anyway).
  cross1, cross2, dens, nums = an * bd, bn * ad, ad * bd, an * bn
  num = jnp.select([op == PLUS, op == MINUS, op == TIMES], [cross1 + cross2, cross1 - cross2, nums],
                   cross1)
  den = jnp.select([op == DIVIDE], [ad * bn], dens)
  sizes = jnp.select(
      [op == TIMES, op == DIVIDE],
      [jnp.maximum(jnp.abs(f(an) * f(bn)), jnp.abs(f(ad) * f(bd))),
       jnp.maximum(jnp.abs(f(an) * f(bd)), jnp.abs(f(ad) * f(bn)))],
      jnp.maximum(jnp.abs(f(an) * f(bd)) + jnp.abs(f(bn) * f(ad)), jnp.abs(f(ad) * f(bd))))
  ok = (sizes < _LIMIT) & ~((op == DIVIDE) & (bn == 0))
  sign = jnp.where(den < 0, -1, 1)
  return jnp.where(ok, num * sign, 0), jnp.where(ok, den * sign, 1), ok


def _at(array, index):
  """array[index] as a one-hot sum: under vmap a gather compiles far slower."""
  return jnp.sum(jnp.where(jnp.arange(array.shape[0]) == index, array, 0))


def _put(array, index, value, when=True):
  """array with [index] = value where `when`: a select, not a scatter (compile time)."""
  return jnp.where((jnp.arange(array.shape[0]) == index) & when, value, array)


def _precedence(op):
  """2 for * and /, 1 for + and -, 0 for "(" (never popped by an operator)."""
  return jnp.where((op == TIMES) | (op == DIVIDE), 2, jnp.where((op == PLUS) | (op == MINUS), 1, 0))


def evaluate(formula, length):
  """Evaluates a formula of symbol ids exactly.

  One scan step per symbol and one more to finish. Each step checks the syntax (a
  number or "(" must come where an operand is expected, an operator, ")" or the end
  where one was just given), then applies stacked operators of at least its own
  precedence (an operator), or down to the nearest "(" (")" and the end), then pushes
  the symbol. A single `while_loop` does every reduction, which keeps the compiled
  program small.

  Args:
    formula: int32 [L] symbol ids into `SYMBOLS`; entries at and after `length` are ignored.
    length: int32 scalar, the number of symbols in use.

  Returns:
    (num, den, valid): int32 scalars with value num / den (reduced, den > 0) and a bool,
    False for a malformed formula (see the module docstring); num = 0, den = 1 then.
  """
  formula = jnp.asarray(formula, jnp.int32)
  size = formula.shape[0] + 1  # symbols, then the finishing step; also the stack capacity
  tokens = jnp.concatenate([formula, jnp.full((1,), -1, jnp.int32)])
  active = jnp.arange(size) < jnp.minimum(length, size - 1)

  def top(c):
    return _at(c["ops"], c["no"] - 1)

  def apply_top(c):
    """Pops one operator and two values, pushes the result."""
    nv = c["nv"]
    i, j = nv - 2, nv - 1
    num, den, ok = _rational_op(top(c), _at(c["num"], i), _at(c["den"], i), _at(c["num"], j),
                                _at(c["den"], j))
    return dict(c, num=_put(c["num"], i, num), den=_put(c["den"], i, den), nv=nv - 1,
                no=c["no"] - 1, valid=c["valid"] & ok & (nv >= 2))

  def scan_step(c, inputs):
    tok, on = inputs
    is_num = on & (tok >= 0) & (tok < MAX_NUMBER)
    is_op = on & ((tok == PLUS) | (tok == MINUS) | (tok == TIMES) | (tok == DIVIDE))
    is_open, is_close = on & (tok == LPAREN), on & (tok == RPAREN)
    known = ~on | is_num | is_op | is_open | is_close
    wants_operand = is_num | is_open
    c = dict(c, valid=c["valid"] & known & (c["expect_operand"] == wants_operand))
    # Reduce while the top operator's precedence reaches the threshold: an operator's own,
    # 1 for ")" and the end (everything down to "("), 3 (nothing) for a number or "(".
    threshold = jnp.where(is_op, _precedence(tok), jnp.where(wants_operand, 3, 1))
    c = jax.lax.while_loop(
        lambda c: c["valid"] & (c["no"] > 0) & (_precedence(top(c)) >= threshold), apply_top, c)
    matched = (c["no"] > 0) & (top(c) == LPAREN)
    pushes_op = is_op | is_open
    return dict(
        num=_put(c["num"], c["nv"], tok + 1, is_num),
        den=_put(c["den"], c["nv"], 1, is_num),
        nv=c["nv"] + is_num,
        ops=_put(c["ops"], c["no"], tok, pushes_op),
        no=c["no"] + pushes_op - is_close,
        expect_operand=jnp.where(on, is_op | is_open, c["expect_operand"]),
        valid=c["valid"] & (matched | ~is_close)), None

  init = dict(num=jnp.zeros(size, jnp.int32), den=jnp.ones(size, jnp.int32),
              nv=jnp.zeros((), jnp.int32), ops=jnp.zeros(size, jnp.int32),
              no=jnp.zeros((), jnp.int32), expect_operand=jnp.ones((), bool),
              valid=jnp.ones((), bool))
  c, _ = jax.lax.scan(scan_step, init, (tokens, active))
  # The finishing step emptied the stack down to any unclosed "(".
  valid = c["valid"] & (c["no"] == 0) & (c["nv"] == 1)
  num, den = jnp.where(valid, c["num"][0], 0), jnp.where(valid, c["den"][0], 1)
  g = jnp.gcd(jnp.abs(num), den)  # >= 1 as den >= 1
  return num // g, den // g, valid


def uses_each_once(formula, length, values):
  """True iff the numbers among the first `length` symbols are exactly the multiset `values`.

  Args:
    formula: int32 [L] symbol ids.
    length: int32 scalar.
    values: int32 [n] card values in 1..10.
  """
  formula = jnp.asarray(formula, jnp.int32)
  used = (jnp.arange(formula.shape[0]) < length) & (formula < MAX_NUMBER)
  used_counts = jnp.sum(jax.nn.one_hot(formula, MAX_NUMBER, dtype=jnp.int32) * used[:, None],
                        axis=0)
  card_counts = jnp.sum(jax.nn.one_hot(jnp.asarray(values) - 1, MAX_NUMBER, dtype=jnp.int32),
                        axis=0)
  return jnp.all(used_counts == card_counts)


# ----------------------------------------------------------------------------- Python oracle


def evaluate_symbols(symbols: Sequence[str]) -> fractions.Fraction | None:
  """The exact value of a formula given as symbol strings, or None if it is malformed.

  A recursive-descent parser of the grammar in the module docstring: written
  independently of `evaluate` so that each checks the other.
  """
  tokens = list(symbols)
  pos = 0

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def take():
    nonlocal pos
    pos += 1
    return tokens[pos - 1]

  def atom():
    tok = peek()
    if tok is None:
      raise ValueError("missing operand")
    if tok == "(":
      take()
      value = expr()
      if peek() != ")":
        raise ValueError("unclosed parenthesis")
      take()
      return value
    if tok in SYMBOLS[:MAX_NUMBER]:
      take()
      return fractions.Fraction(int(tok))
    raise ValueError(f"unexpected {tok!r}")

  def term():
    value = atom()
    while peek() in ("*", "/"):
      op, rhs = take(), atom()
      if op == "/" and rhs == 0:
        raise ZeroDivisionError
      value = value * rhs if op == "*" else value / rhs
    return value

  def expr():
    value = term()
    while peek() in ("+", "-"):
      op, rhs = take(), term()
      value = value + rhs if op == "+" else value - rhs
    return value

  try:
    value = expr()
  except (ValueError, ZeroDivisionError):
    return None
  return value if pos == len(tokens) else None


# ----------------------------------------------------------------------------- solver


def _symbols(tree) -> list[str]:
  """An expression tree (int leaf or (op, left, right)) -> symbols with only needed parens."""
  if isinstance(tree, int):
    return [str(tree)]
  op, left, right = tree
  left_syms, right_syms = _symbols(left), _symbols(right)
  if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
    left_syms = ["(", *left_syms, ")"]
  # a - (b + c), a / (b * c) need them; a + (b - c) = a + b - c and a * (b / c) = a * b / c.
  if not isinstance(right, int) and (_PRECEDENCE[right[0]] < _PRECEDENCE[op] or (
      _PRECEDENCE[right[0]] == _PRECEDENCE[op] and op in ("-", "/"))):
    right_syms = ["(", *right_syms, ")"]
  return [*left_syms, op, *right_syms]


def _combine(a, b, operators):
  """(value, tree) results of a op b and b op a for the allowed operators."""
  (va, ta), (vb, tb) = a, b
  out = []
  if "+" in operators:
    out.append((va + vb, ("+", ta, tb)))
  if "*" in operators:
    out.append((va * vb, ("*", ta, tb)))
  if "-" in operators:
    out += [(va - vb, ("-", ta, tb)), (vb - va, ("-", tb, ta))]
  if "/" in operators:
    out += [(va / vb, ("/", ta, tb))] if vb else []
    out += [(vb / va, ("/", tb, ta))] if va else []
  return out


def solve(values: Sequence[int], target: int, operators: str = "+-*/") -> list[str] | None:
  """A formula using each of `values` exactly once that equals `target`, or None.

  Depth-first search over pairs to combine (exact rationals), trying "+" and "*"
  first; with all four operators a branch is entered only if its numbers can still
  reach the target (`_reaches`), so an unsolvable deal is rejected at once. The
  result is a list of symbol strings with parentheses only where the precedence rules
  need them, e.g. `solve([3, 3, 8, 8], 24)` -> ["8", "/", "(", "3", "-", "8", "/", "3", ")"].

  Args:
    values: the card values (1..10), any number of them (searching grows fast beyond 4).
    target: the value to reach.
    operators: the operators allowed (EZPoints has only "+" and "*").
  """
  if not values:
    return None
  target = fractions.Fraction(int(target))  # int(): NumPy integers hash apart from Fractions
  prune = set(operators) == set(OPERATORS)
  failed = set()

  def search(items):
    if len(items) == 1:
      return items[0][1] if items[0][0] == target else None
    key = tuple(sorted(v for v, _ in items))
    if key in failed or (prune and not _reaches(key, target)):
      failed.add(key)
      return None
    for i, j in itertools.combinations(range(len(items)), 2):
      rest = [item for k, item in enumerate(items) if k not in (i, j)]
      for combined in _combine(items[i], items[j], operators):
        tree = search(rest + [combined])
        if tree is not None:
          return tree
    failed.add(key)
    return None

  tree = search([(fractions.Fraction(int(v)), int(v)) for v in values])
  return None if tree is None else _symbols(tree)


@functools.lru_cache(maxsize=1 << 16)
def _reachable(values: tuple) -> frozenset:
  """Every value a formula using each of the sorted `values` (ints or Fractions) once can
  take."""
  if len(values) == 1:
    return frozenset([fractions.Fraction(values[0])])
  out = set()
  for left, right in _splits(values):
    for a in _reachable(left):
      for b in _reachable(right):
        out.update(v for v, _ in _combine((a, None), (b, None), OPERATORS))
  return frozenset(out)


def _splits(values: tuple):
  """Distinct unordered splits of a sorted multiset into two non-empty sorted parts."""
  seen = set()
  for r in range(1, len(values) // 2 + 1):
    for idx in itertools.combinations(range(len(values)), r):
      left = tuple(values[i] for i in idx)
      right = tuple(v for i, v in enumerate(values) if i not in idx)
      if (left, right) not in seen and (right, left) not in seen:
        seen.add((left, right))
        yield left, right


def _reaches(values: tuple, target: fractions.Fraction) -> bool:
  """Whether `target` is reachable; the last operation is inverted instead of enumerated."""
  for left, right in _splits(values):
    rhs = _reachable(right)
    for a in _reachable(left):
      # a op x = target, x op a = target, solved for x.
      needed = [target - a, a - target, target + a]
      if a:  # a * x, x / a; and a / x = target needs x = a / target != 0
        needed += [target / a, a * target] + ([a / target] if target else [])
      if any(x in rhs for x in needed):
        return True
  return False


@functools.lru_cache(maxsize=None)
def solvable_table(target: int = 24) -> tuple[tuple[int, int, int, int], ...]:
  """The sorted 4-tuples of values 1..10 from which some formula reaches `target`.

  Memoised over sub-multisets (all values reachable from up to three cards), with the
  final operation solved for the missing operand; about 0.1 s, cached.
  """
  target = fractions.Fraction(target)
  return tuple(hand for hand in itertools.combinations_with_replacement(
      range(1, MAX_NUMBER + 1), 4) if _reaches(hand, target))


@functools.lru_cache(maxsize=None)
def solvable_mask(target: int = 24) -> np.ndarray:
  """bool [10, 10, 10, 10]: mask[a-1, b-1, c-1, d-1] says whether (a, b, c, d) reaches target.

  Every ordering of a solvable hand is marked, so deals need not be sorted to look up.
  """
  mask = np.zeros((MAX_NUMBER,) * 4, bool)
  for hand in solvable_table(target):
    for perm in itertools.permutations(hand):
      mask[tuple(v - 1 for v in perm)] = True
  mask.flags.writeable = False
  return mask


def draw_solvable(rng: np.random.Generator, n: int, target: int = 24) -> np.ndarray:
  """int [n, 4]: the values of n four-card deals that make `target`, drawn with NumPy as
  the environment draws them (ranks 1..13 uniformly, faces worth 10, redrawn until
  solvable): deals for experiments that train or score plans outside the environment."""
  mask = solvable_mask(target)
  deals = []
  while len(deals) < n:
    values = np.minimum(rng.integers(1, 14, 4), MAX_NUMBER)
    if mask[tuple(values - 1)]:
      deals.append(values)
  return np.stack(deals) if deals else np.zeros((0, 4), np.int64)
