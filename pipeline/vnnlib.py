"""VNNLIB properties: the subset VNN-COMP benchmarks use, parsed and written.

A property states the *unsafe* case: it is satisfiable when some input in the
input set makes the outputs meet the output constraints. The parser accepts
`(declare-const X_i Real)` / `(declare-const Y_j Real)`, and `assert`s built
from `<=`/`>=` between linear terms (`+`, `-`, `*` by a constant), `and`, `or`.
Every assertion is brought to disjunctive normal form; each disjunct is a box on
X (bounds of single variables only) and a conjunction of linear rows on Y.
Malformed text raises UsageError naming the line and what was expected.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from pipeline.errors import UsageError

MAX_DISJUNCTS = 100_000
_VAR = re.compile(r"^([XY])_(\d+)$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class Token:
    text: str
    line: int


@dataclass(frozen=True)
class Atom:
    """coeffs . vars <= bound, vars all X or all Y."""
    kind: str  # "X" or "Y"
    coeffs: dict[int, float]
    bound: float


@dataclass
class Region:
    """One input box with the output disjunction that must be excluded over it.
    `rows[k]` (A, b): conjunct k holds when A @ y <= b row by row."""
    lower: np.ndarray
    upper: np.ndarray
    conjuncts: list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Property:
    num_inputs: int
    num_outputs: int
    regions: list[Region]


def _tokens(text: str, name: str) -> list[Token]:
    tokens: list[Token] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split(";", 1)[0]
        for piece in line.replace("(", " ( ").replace(")", " ) ").split():
            tokens.append(Token(piece, number))
    return tokens


class _Parser:
    def __init__(self, text: str, name: str):
        self.name, self.tokens, self.pos = name, _tokens(text, name), 0
        self.declared: dict[str, set[int]] = {"X": set(), "Y": set()}

    def fail(self, token: Token | None, expected: str):
        if token is None:
            last = self.tokens[-1].line if self.tokens else 1
            raise UsageError(f"{self.name}:{last}: expected {expected}, got end of file")
        raise UsageError(f"{self.name}:{token.line}: expected {expected}, got {token.text!r}")

    def next(self, expected: str) -> Token:
        if self.pos >= len(self.tokens):
            self.fail(None, expected)
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expect(self, text: str) -> Token:
        token = self.next(repr(text))
        if token.text != text:
            self.fail(token, repr(text))
        return token

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def commands(self) -> list[list[list[Atom]]]:
        asserts = []
        while self.peek() is not None:
            self.expect("(")
            head = self.next("'declare-const' or 'assert'")
            if head.text == "declare-const":
                name = self.next("a variable name X_i or Y_j")
                match = _VAR.match(name.text)
                if not match:
                    self.fail(name, "a variable name X_i or Y_j")
                sort = self.next("'Real'")
                if sort.text != "Real":
                    self.fail(sort, "'Real'")
                self.declared[match.group(1)].add(int(match.group(2)))
                self.expect(")")
            elif head.text == "assert":
                asserts.append(self.formula())
                self.expect(")")
            else:
                self.fail(head, "'declare-const' or 'assert'")
        return asserts

    def formula(self) -> list[list[Atom]]:
        """A formula in DNF: a list of conjunctions of atoms."""
        self.expect("(")
        head = self.next("'and', 'or', '<=' or '>='")
        if head.text in ("and", "or"):
            parts = []
            while self.peek() is not None and self.peek().text != ")":
                parts.append(self.formula())
            self.expect(")")
            if not parts:
                self.fail(head, f"at least one operand of {head.text!r}")
            if head.text == "or":
                return [conj for part in parts for conj in part]
            size = int(np.prod([len(p) for p in parts], dtype=np.float64))
            if size > MAX_DISJUNCTS:
                raise UsageError(f"{self.name}:{head.line}: the property expands to {size} disjuncts; at most {MAX_DISJUNCTS}")
            return [[atom for conj in combo for atom in conj] for combo in product(*parts)]
        if head.text not in ("<=", ">="):
            self.fail(head, "'and', 'or', '<=' or '>='")
        left, right = self.term(), self.term()
        self.expect(")")
        if head.text == ">=":
            left, right = right, left
        coeffs = dict(left[0])  # left - right <= 0
        for var, c in right[0].items():
            coeffs[var] = coeffs.get(var, 0.0) - c
        coeffs = {v: c for v, c in coeffs.items() if c != 0.0}
        kinds = {v[0] for v in coeffs}
        if len(kinds) > 1:
            raise UsageError(f"{self.name}:{head.line}: a constraint mixes X and Y variables; not supported")
        if not kinds:
            raise UsageError(f"{self.name}:{head.line}: a constraint without variables")
        kind = kinds.pop()
        return [[Atom(kind, {int(v[2:]): c for v, c in coeffs.items()}, right[1] - left[1])]]

    def term(self) -> tuple[dict[str, float], float]:
        """A linear term as (coefficients by variable name, constant)."""
        token = self.next("a number, a variable or '('")
        if token.text == "(":
            op = self.next("'+', '-' or '*'")
            args = []
            while self.peek() is not None and self.peek().text != ")":
                args.append(self.term())
            self.expect(")")
            if op.text == "+" and args:
                return _combine(args, [1.0] * len(args))
            if op.text == "-" and len(args) == 1:
                return _combine(args, [-1.0])
            if op.text == "-" and args:
                return _combine(args, [1.0] + [-1.0] * (len(args) - 1))
            if op.text == "*" and len(args) == 2:
                (ca, ka), (cb, kb) = args
                if ca and cb:
                    raise UsageError(f"{self.name}:{op.line}: a product of two variables is not linear")
                return ({v: c * kb for v, c in ca.items()} or {v: c * ka for v, c in cb.items()}, ka * kb)
            self.fail(op, "'+', '-' or '*' with linear operands")
        if _NUMBER.match(token.text):
            return {}, float(token.text)
        match = _VAR.match(token.text)
        if not match:
            self.fail(token, "a number, a variable X_i / Y_j or '('")
        if int(match.group(2)) not in self.declared[match.group(1)]:
            raise UsageError(f"{self.name}:{token.line}: {token.text} is used before its declare-const")
        return {token.text: 1.0}, 0.0


def _combine(args, signs) -> tuple[dict[str, float], float]:
    coeffs: dict[str, float] = {}
    constant = 0.0
    for (c, k), sign in zip(args, signs):
        for var, value in c.items():
            coeffs[var] = coeffs.get(var, 0.0) + sign * value
        constant += sign * k
    return coeffs, constant


def _dense_count(declared: set[int], kind: str, name: str) -> int:
    if not declared:
        raise UsageError(f"{name}: no {kind}_i variables declared")
    if declared != set(range(len(declared))):
        raise UsageError(f"{name}: {kind} variables must be {kind}_0 .. {kind}_{len(declared) - 1} without gaps")
    return len(declared)


def parse(text: str, name: str = "property") -> Property:
    """Parse VNNLIB text into input boxes, each with its output disjunction."""
    parser = _Parser(text, name)
    asserts = parser.commands()
    n_in = _dense_count(parser.declared["X"], "X", name)
    n_out = _dense_count(parser.declared["Y"], "Y", name)
    size = int(np.prod([len(a) for a in asserts], dtype=np.float64)) if asserts else 1
    if size > MAX_DISJUNCTS:
        raise UsageError(f"{name}: the property expands to {size} disjuncts; at most {MAX_DISJUNCTS}")
    groups: dict[tuple, Region] = {}
    for combo in product(*asserts):
        atoms = [atom for conj in combo for atom in conj]
        lower, upper = np.full(n_in, -np.inf), np.full(n_in, np.inf)
        rows, bounds = [], []
        for atom in atoms:
            if atom.kind == "X":
                if len(atom.coeffs) != 1:
                    raise UsageError(f"{name}: input constraints must bound one X_i by a constant (a box)")
                (index, coeff), = atom.coeffs.items()
                value = atom.bound / coeff
                if coeff > 0:
                    upper[index] = min(upper[index], value)
                else:
                    lower[index] = max(lower[index], value)
            else:
                row = np.zeros(n_out)
                for index, coeff in atom.coeffs.items():
                    row[index] = coeff
                rows.append(row)
                bounds.append(atom.bound)
        if not np.isfinite(lower).all() or not np.isfinite(upper).all():
            missing = int(np.flatnonzero(~(np.isfinite(lower) & np.isfinite(upper)))[0])
            raise UsageError(f"{name}: X_{missing} has no lower and upper bound; the input set must be a box")
        if (lower > upper).any():
            continue  # an empty box contributes nothing
        if not rows:
            raise UsageError(f"{name}: a disjunct has no output constraint (every input would be a counterexample)")
        key = (lower.tobytes(), upper.tobytes())
        region = groups.setdefault(key, Region(lower, upper, []))
        region.conjuncts.append((np.array(rows), np.array(bounds)))
    return Property(n_in, n_out, list(groups.values()))


def load(path: Path) -> Property:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such property file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read ({error})") from None
    return parse(text, str(path))


def robustness_property(x: np.ndarray, epsilon: float, lower: np.ndarray, upper: np.ndarray, label: int,
                        num_classes: int, comment: str = "") -> str:
    """The VNNLIB of "some input in the L∞ ε-box around x (within the data domain) is not classified
    as `label`": unsat exactly when the sample is robust."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    def per_input(bound):  # a scalar, or one value per input in the layout of x
        bound = np.asarray(bound, np.float64).reshape(-1)
        return np.broadcast_to(bound, flat.shape)

    lo = np.maximum(flat - epsilon, per_input(lower))
    hi = np.minimum(flat + epsilon, per_input(upper))
    lines = [f"; {line}" for line in comment.splitlines()]
    lines += [f"(declare-const X_{i} Real)" for i in range(flat.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    for i in range(flat.size):
        lines.append(f"(assert (>= X_{i} {float(lo[i])!r}))")
        lines.append(f"(assert (<= X_{i} {float(hi[i])!r}))")
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(num_classes) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"


def counterexample_text(x: np.ndarray, y: np.ndarray) -> str:
    """The VNN-COMP counterexample block that follows `sat` in a result file."""
    entries = [f"(X_{i} {float(v)!r})" for i, v in enumerate(np.asarray(x).reshape(-1))]
    entries += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(np.asarray(y).reshape(-1))]
    return "(" + "\n ".join(entries) + ")\n"
