"""A Gaussian-moment engine: exact expectations of matrix polynomials in the inner data of a
task, its label noise and its head (Isserlis' theorem, summed over sample coincidences).

**The random objects.** One task of the linear problem draws ``m`` inner samples
``(x_j, eps_j)``, ``x_j ~ N(0, I_d)``, ``eps_j ~ N(0, sigma^2)``, and a head
``w_star ~ N(0, Sigma_star)``, ``theta = B_star w_star``. Write the augmented samples
``a_j = (x_j, eps_j / sigma) ~ N(0, I_{d+1})`` and ``W = (1/m) sum_j a_j a_j^T``; then the
inner gradient of the loss with respect to the prediction ``B w`` is
``X^T (X B w - y) / m = P W (B w + n - t)`` with ``P`` the projector onto the input
coordinates, ``n = (0, -sigma)`` and ``t = (theta, 0)``. Every quantity an inner loop computes
is a polynomial in ``W`` and ``t`` with fixed matrices between them, built here as a
:class:`Poly` (a sum of terms, each a product of a *chain*, the matrix, and scalar chains).

**The expectation** of a term with ``D`` factors ``W`` and ``T`` vectors ``t``: each ``W``
is ``(1/m) sum_s a_s a_s^T``, so it contributes two Gaussian *half-edges* sharing a sample
index; each ``t`` contributes one. By Isserlis' theorem the expectation is the sum over the
perfect matchings of the data half-edges (``(2D - 1)!!`` of them) and of the ``t`` half-edges
(``(T - 1)!!``): a matched pair of data half-edges is contracted with ``E[a a^T] = I`` and
forces equal sample indices, so summing the indices gives ``m^c`` with ``c`` the number of
connected components of the factors joined by the matching (the weight of the matching is
``m^(c - D)``); a matched pair of ``t`` is contracted with ``Theta = E[t t^T]``. After the
contraction every factor is a fixed matrix with at most two indices, so the network is a set
of paths (matrix products) and cycles (traces): a :class:`Monomial` of named *words*.

**Coordinates.** The fixed letters live in the coordinates of :mod:`metarep.core.infinite`:
the inputs' span ``[B_star, Q_perp]`` (dimension ``q``) plus the noise coordinate (``n_aug =
q + 1``), and the complement of dimension ``d - q`` on which every letter is 0 except ``P``
and the identity, which are 1 there. A cycle through them picks up ``d - q``: the only place
``d`` enters, so the cost is independent of ``d``. Letters (:data:`LETTERS`): ``B`` (n_aug, p)
the body with a zero noise row, ``w`` (p, 1) the head, ``n`` (n_aug, 1), ``P``, ``I``,
``T`` = ``Theta`` (n_aug, n_aug); ``X'`` is the transpose of letter ``X``.

Tested against Monte Carlo (z-tests) and against closed forms (``E[W A W] = A + (A^T +
tr(A) I) / m`` and the exact FO-ANIL step of :mod:`metarep.core.infinite`).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

Chain = tuple[str, ...]
"""A product of items, left to right: fixed letters, ``W`` and ``t`` / ``t'``."""

LETTERS = ("B", "w", "n", "P", "I", "T")
"""The fixed letters (see the module docstring); ``P``, ``I``, ``T`` are symmetric."""

SYMMETRIC = frozenset({"P", "I", "T", "W"})


@cache
def transposed(item: str) -> str:
    """The transpose of one item: ``X`` <-> ``X'`` (symmetric items are themselves)."""
    if item in SYMMETRIC:
        return item
    return item[:-1] if item.endswith("'") else item + "'"


@cache
def reverse(chain: Chain) -> Chain:
    """The transpose of a product: reversed, each item transposed."""
    return tuple(transposed(item) for item in reversed(chain))


@dataclass(frozen=True)
class Term:
    """``coef * alpha^alpha_power * chain * prod(scalars)``: ``chain`` the matrix factor, each
    of ``scalars`` a chain whose product is 1 x 1 (kept sorted: a product of scalars)."""

    alpha_power: int
    chain: Chain
    scalars: tuple[Chain, ...]


class Poly:
    """A sum of :class:`Term` s with float coefficients: a random matrix (or vector, or
    scalar) polynomial in ``W`` and ``t``. Supports ``+``, ``-``, ``@`` (matrix product),
    ``scale``, ``T`` (transpose) and ``dot`` (the scalar ``self^T other`` of two vectors).
    Equal terms are merged as they are made, so the sums stay as small as the algebra allows."""

    def __init__(self, terms: dict[Term, float] | None = None):
        self.terms: dict[Term, float] = {t: c for t, c in (terms or {}).items() if c != 0.0}

    @staticmethod
    def of(*items: str) -> Poly:
        """The product of ``items`` (fixed letters, ``W``, ``t``, ``t'``) as a one-term sum."""
        return Poly({Term(0, tuple(items), ()): 1.0})

    def __add__(self, other: Poly) -> Poly:
        terms = defaultdict(float, self.terms)
        for term, coef in other.terms.items():
            terms[term] += coef
        return Poly(terms)

    def __neg__(self) -> Poly:
        return self.scale(-1.0)

    def __sub__(self, other: Poly) -> Poly:
        return self + (-other)

    def scale(self, factor: float, alpha_power: int = 0) -> Poly:
        """``factor * alpha^alpha_power * self``."""
        return Poly({Term(t.alpha_power + alpha_power, t.chain, t.scalars): c * factor
                     for t, c in self.terms.items()})

    def __matmul__(self, other: Poly) -> Poly:
        terms: dict[Term, float] = defaultdict(float)
        for (a, ca), (b, cb) in itertools.product(self.terms.items(), other.terms.items()):
            scalars = tuple(sorted(a.scalars + b.scalars))
            terms[Term(a.alpha_power + b.alpha_power, a.chain + b.chain, scalars)] += ca * cb
        return Poly(terms)

    @property
    def T(self) -> Poly:
        return Poly({Term(t.alpha_power, reverse(t.chain), t.scalars): c
                     for t, c in self.terms.items()})

    def dot(self, other: Poly) -> Poly:
        """The scalar ``self^T other`` (both column vectors), as scalar factors."""
        terms: dict[Term, float] = defaultdict(float)
        for (a, ca), (b, cb) in itertools.product(self.terms.items(), other.terms.items()):
            product = reverse(a.chain) + b.chain
            scalars = tuple(sorted(a.scalars + b.scalars + (_scalar_key(product),)))
            terms[Term(a.alpha_power + b.alpha_power, (), scalars)] += ca * cb
        return Poly(terms)


@cache
def _scalar_key(chain: Chain) -> Chain:
    """A scalar chain and its transpose are the same number: the smaller of the two."""
    return min(chain, reverse(chain))


# ----------------------------------------------------------------------------- contraction


@dataclass(frozen=True)
class Monomial:
    """A contracted term: the matrix ``left @ right`` (``right`` is ``None`` when the output
    is one path ``left``; else ``left`` (rows, 1) and ``right`` (1, cols) are two paths and
    the output their outer product), times the scalars of ``paths`` (products of words,
    1 x 1) and the traces of ``cycles``. Words are canonical (:func:`_canonical_cycle`)."""

    left: Chain
    right: Chain | None
    paths: tuple[Chain, ...]
    cycles: tuple[Chain, ...]


ZERO_PAIRS = frozenset({("P", "n"), ("n'", "P"), ("T", "n"), ("n'", "T"), ("B'", "n"),
                        ("n'", "B")})
"""Adjacent letters whose product is zero: ``P``, ``Theta`` and ``B`` have no noise part."""
ABSORBS_P = frozenset({"B", "T"})  # P B = B, P T = T (and transposed: B' P = B', T P = T)


@cache
def _simplify(word: Chain, cyclic: bool) -> Chain | None:
    """``word`` with identities dropped and ``P`` absorbed where the product allows (``P B =
    B``, ``P P = P``, ...); ``None`` when the product is zero (``P n = 0``, ...). ``cyclic``:
    the word is a cycle (its last letter is next to its first)."""
    letters = [x for x in word if x != "I"] or (["I"] if word else [])
    changed = True
    while changed:
        changed = False
        size = len(letters)
        pairs = range(size if cyclic and size > 1 else size - 1)
        for i in pairs:
            a, b = letters[i], letters[(i + 1) % size]
            if (a, b) in ZERO_PAIRS:
                return None
            if a == "P" and (b in ABSORBS_P or b == "P") and size > 1:
                del letters[i]
                changed = True
                break
            if b == "P" and (a.rstrip("'") in ABSORBS_P) and size > 1:
                del letters[(i + 1) % size]
                changed = True
                break
    return tuple(letters)


@cache
def _canonical_cycle(word: Chain) -> Chain:
    """A cycle's trace is unchanged by rotation and by transposition: the smallest of its
    rotations and those of its transpose."""
    candidates = []
    for w in (word, reverse(word)):
        candidates.extend(w[i:] + w[:i] for i in range(len(w)))
    return min(candidates)


@cache
def perfect_matchings(size: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """All perfect matchings of ``0 .. size-1`` (``(size - 1)!!`` of them; none for odd)."""
    if size % 2:
        return ()
    if size == 0:
        return ((),)

    def build(items: tuple[int, ...]) -> Iterator[tuple[tuple[int, int], ...]]:
        if not items:
            yield ()
            return
        first, rest = items[0], items[1:]
        for i, partner in enumerate(rest):
            for others in build(rest[:i] + rest[i + 1:]):
                yield ((first, partner), *others)

    return tuple(build(tuple(range(size))))


@dataclass
class _Network:
    """The segments of a term: maximal runs of fixed letters between random items.

    ``segments[i] = (left_node, right_node, letters)``; nodes are half-edges (``0 ..``) or
    terminals: ``"L"``, ``"R"`` (the output's ends) and trivial ends ``("x", j)``.
    ``data`` lists the data half-edges and ``factor`` their ``W`` factor; ``theta`` lists the
    ``t`` half-edges."""

    segments: list[tuple[object, object, Chain]]
    data: list[int]
    factor: dict[int, int]
    theta: list[int]


def _network(term: Term) -> _Network:
    segments: list[tuple[object, object, Chain]] = []
    data: list[int] = []
    theta: list[int] = []
    factor: dict[int, int] = {}
    counter = itertools.count()
    trivial = itertools.count()
    strands = [(term.chain, True)] + [(chain, False) for chain in term.scalars]
    for chain, is_output in strands:
        left: object = "L" if is_output else ("x", next(trivial))
        letters: list[str] = []
        for item in chain:
            if item == "W":
                head, tail = next(counter), next(counter)
                data += [head, tail]
                factor[head] = factor[tail] = len(data) // 2 - 1
                segments.append((left, head, tuple(letters)))
                left, letters = tail, []
            elif item == "t":
                node = next(counter)
                theta.append(node)
                segments.append((left, node, tuple(letters)))
                left, letters = ("x", next(trivial)), []
            elif item == "t'":
                node = next(counter)
                theta.append(node)
                segments.append((left, ("x", next(trivial)), tuple(letters)))
                left, letters = node, []
            else:
                letters.append(item)
        right: object = "R" if is_output else ("x", next(trivial))
        segments.append((left, right, tuple(letters)))
    # A segment with no letters is the identity where a half-edge ends it, else the number 1
    # (dropped between two trivial ends).
    kept = []
    for left, right, letters in segments:
        if not letters and (isinstance(left, int) or isinstance(right, int)):
            letters = ("I",)
        if letters or not (isinstance(left, tuple) and isinstance(right, tuple)):
            kept.append((left, right, letters))
    return _Network(kept, data, factor, theta)


def _components(network: _Network, matching: Sequence[tuple[int, int]]) -> int:
    """The number of connected components of the ``W`` factors joined by ``matching``."""
    parent = list(range(len(network.data) // 2))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in matching:
        parent[find(network.factor[a])] = find(network.factor[b])
    return sum(1 for i in range(len(parent)) if find(i) == i)


def _contract(network: _Network, partner: dict[int, int], theta: frozenset[int]
              ) -> Monomial | None:
    """Walk the paths and cycles of the network with half-edges joined by ``partner``
    (``Theta`` inserted across a ``t`` pair); ``None`` when a word is zero."""
    ends: dict[object, tuple[int, bool]] = {}
    for index, (left, right, _) in enumerate(network.segments):
        ends[left] = (index, True)     # entered at its left end: read forwards
        ends[right] = (index, False)
    seen = [False] * len(network.segments)

    def walk(node: object) -> tuple[Chain, object]:
        word: list[str] = []
        while True:
            index, forwards = ends[node]
            seen[index] = True
            left, right, letters = network.segments[index]
            word.extend(letters if forwards else reverse(letters))
            node = right if forwards else left
            if not isinstance(node, int):
                return tuple(word), node
            if node in theta:
                word.append("T")
            node = partner[node]
            if node == start_of_cycle:
                return tuple(word), node

    start_of_cycle: object = None
    left_word, end = walk("L")
    right_word: Chain | None = None
    if end != "R":
        right_word, _ = walk("R")
        right_word = reverse(right_word)
    paths, cycles = [], []
    for index, (left, right, _) in enumerate(network.segments):
        if seen[index]:
            continue
        if not isinstance(left, int):
            paths.append(walk(left)[0])
        elif not isinstance(right, int):
            paths.append(walk(right)[0])
    for index, (left, _, _) in enumerate(network.segments):
        if not seen[index]:
            start_of_cycle = left
            cycles.append(walk(left)[0])
    return _monomial(left_word, right_word, paths, cycles)


def _monomial(left: Chain, right: Chain | None, paths: list[Chain], cycles: list[Chain]
              ) -> Monomial | None:
    simple_left = _simplify(left, cyclic=False)
    simple_right = None if right is None else _simplify(right, cyclic=False)
    if simple_left is None or (right is not None and simple_right is None):
        return None
    simple_paths = []
    for path in paths:
        word = _simplify(path, cyclic=False)
        if word is None:
            return None
        if word:
            simple_paths.append(_scalar_key(word))
    simple_cycles = []
    for cycle in cycles:
        word = _simplify(cycle, cyclic=True)
        if word is None:
            return None
        simple_cycles.append(_canonical_cycle(word))
    return Monomial(simple_left, simple_right, tuple(sorted(simple_paths)),
                    tuple(sorted(simple_cycles)))


Expectation = dict[Monomial, dict[tuple[int, int], float]]
"""``E[poly]`` as ``{monomial: {(alpha_power, m_power): coefficient}}``: the sum of
``coefficient * alpha^alpha_power * m^m_power * value(monomial)`` (``m_power <= 0``)."""


def expectation(poly: Poly) -> Expectation:
    """The exact expectation of ``poly`` over ``W`` and ``t`` (module docstring), collected
    by monomial. Terms with an odd number of ``t`` vanish."""
    result: Expectation = defaultdict(lambda: defaultdict(float))
    for term, coef in poly.terms.items():
        network = _network(term)
        if len(network.theta) % 2:
            continue
        theta = frozenset(network.theta)
        depth = len(network.data) // 2
        for data_matching in perfect_matchings(len(network.data)):
            pairs = [(network.data[a], network.data[b]) for a, b in data_matching]
            m_power = _components(network, pairs) - depth
            for theta_matching in perfect_matchings(len(network.theta)):
                partner: dict[int, int] = {}
                for a, b in itertools.chain(
                        pairs, ((network.theta[i], network.theta[j]) for i, j in theta_matching)):
                    partner[a], partner[b] = b, a
                monomial = _contract(network, partner, theta)
                if monomial is not None:
                    result[monomial][(term.alpha_power, m_power)] += coef
    return {mono: {key: c for key, c in coefs.items() if c != 0.0}
            for mono, coefs in result.items() if any(c != 0.0 for c in coefs.values())}


def words(expect: Expectation) -> Iterable[Chain]:
    """Every word the monomials of ``expect`` evaluate."""
    for mono in expect:
        yield mono.left
        if mono.right is not None:
            yield mono.right
        yield from mono.paths
        yield from mono.cycles


# ----------------------------------------------------------------------------- evaluation


def coefficients(coefs: dict[tuple[int, int], float], alpha: np.ndarray,
                 m: np.ndarray) -> np.ndarray:
    """``sum c alpha^a m^e`` per configuration, (b,); ``m = inf`` keeps only ``e = 0``."""
    total = np.zeros_like(alpha)
    finite_m = np.where(np.isinf(m), 1.0, m)
    for (a_power, m_power), coef in coefs.items():
        scale = np.where(np.isinf(m), float(m_power == 0), finite_m ** float(m_power))
        total = total + coef * alpha**a_power * scale
    return total


class Words:
    """The values of words in given letters for ``b`` configurations, memoised by prefix.

    ``letters``: every letter of :data:`LETTERS` and its transpose (``"B'"``, ...) as a numpy
    array (b, rows, cols), in the coordinates of the module docstring; ``d`` the input
    dimension (the trace of ``P``; ``I`` has trace ``d + 1``)."""

    def __init__(self, letters: dict[str, np.ndarray], d: int):
        self.letters, self.d = letters, d
        self.memo: dict[Chain, np.ndarray] = {}
        first = letters["B"]
        self.one = np.ones((first.shape[0], 1, 1), dtype=first.dtype)

    def product(self, word: Chain) -> np.ndarray:
        """The matrix product of ``word``, (b, rows, cols); 1 for the empty word."""
        if not word:
            return self.one
        value = self.memo.get(word)
        if value is None:
            last = self.letters[word[-1]]
            value = last if len(word) == 1 else self.product(word[:-1]) @ last
            self.memo[word] = value
        return value

    def scalar(self, word: Chain) -> np.ndarray:
        """A path between two vector ends, (b,)."""
        return self.product(word)[:, 0, 0]

    def trace(self, word: Chain) -> np.ndarray:
        """A cycle's trace over R^{d+1}: ``tr P = d``, ``tr I = d + 1``; every other letter
        is zero on the complement, so the trace is that of the coordinates' product."""
        if set(word) <= {"P", "I"}:
            return self.one[:, 0, 0] * float(self.d + ("P" not in word))
        return np.einsum("bii->b", self.product(word))


class Program:
    """An :data:`Expectation` ready to evaluate for ``b`` configurations with inner step
    sizes ``alpha`` (b,) and sample counts ``m`` (b,) (``inf`` allowed).

    The monomials' scalar factors (paths and traces) are numbered once; a call evaluates each
    distinct word once (:class:`Words`), multiplies each monomial's factors and coefficient
    as one array operation, sums them per output word pair (``add.reduceat``), and adds up
    ``weight * (left @ right)`` over the pairs."""

    def __init__(self, expect: Expectation, alpha: np.ndarray, m: np.ndarray,
                 dtype: np.dtype | str = np.float64):
        outputs: dict[tuple[Chain, Chain | None], int] = {}
        factors: dict[tuple[str, Chain], int] = {}
        rows, coefs, groups = [], [], []
        for mono, terms in expect.items():
            # Every monomial is kept, also where its coefficient is 0 for every configuration
            # (m = inf): the sums then run over the same terms for any batch.
            vector = coefficients(terms, np.asarray(alpha, np.float64), np.asarray(m, np.float64))
            groups.append(outputs.setdefault((mono.left, mono.right), len(outputs)))
            rows.append([factors.setdefault(("path", w), len(factors) + 1) for w in mono.paths]
                        + [factors.setdefault(("cycle", w), len(factors) + 1)
                           for w in mono.cycles])
            coefs.append(vector)
        if not rows:
            raise ValueError("Program: the expectation has no terms")
        order = np.argsort(groups, kind="stable")  # monomials by output pair
        width = max(1, max(len(row) for row in rows))
        padded = np.array([row + [0] * (width - len(row)) for row in rows])  # 0: the number 1
        self.index = padded[order]                                          # (monomials, L)
        self.coefs = np.ascontiguousarray(np.array(coefs, dtype=dtype)[order].T)  # (b, monos)
        self.starts = np.searchsorted(np.asarray(groups)[order], np.arange(len(outputs)))
        self.outputs = list(outputs)
        self.factors = list(factors)

    def __call__(self, words: Words) -> np.ndarray:
        """``sum coef * prod(paths) * prod(traces) * (left @ right)``, (b, rows, cols)."""
        values = np.stack([words.one[:, 0, 0]] + [
            words.scalar(word) if kind == "path" else words.trace(word)
            for kind, word in self.factors], axis=1)                           # (b, factors)
        # Per configuration, the same operations in the same order whatever b is (a batched
        # run gives each configuration the numbers it gets alone).
        terms = self.coefs * values[:, self.index].prod(axis=2)                # (b, monos)
        weights = np.add.reduceat(terms, self.starts, axis=1)                   # (b, groups)
        total = None
        for (left, right), weight in zip(self.outputs, weights.T, strict=True):
            value = words.product(left)
            if right is not None:
                value = value @ words.product(right)
            term = weight[:, None, None] * value
            total = term if total is None else total + term
        return total
