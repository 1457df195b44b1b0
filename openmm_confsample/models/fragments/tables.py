"""Exact, cheap fragment densities: piecewise-constant tables on a grid of the torus.

A :class:`FragmentTable` holds one fragment's density as three two-dimensional tables of cell
probabilities, one per pair of torsion kinds (:data:`~.context.BLOCKS`: (phi, psi), (chi1, chi2),
(chi3, chi4)), on an ``n_grid x n_grid`` grid of equal cells of [-pi, pi)^2. The density of a point is its
cell's probability divided by the cell's area, so sampling (pick a cell, then a uniform point in it) and
evaluation (look the cell up) are both exact and cost a few array look-ups: the learned model is evaluated
once per fragment, when the move is built, never inside a Monte Carlo step.

A move resamples some of a fragment's torsions (the *moved* kinds) while others stay as they are (*fixed*,
e.g. phi and psi during a side-chain move) and some do not exist (*absent*: proline's phi, a C-terminal
residue's psi). :class:`FragmentConditional` is the density of the moved torsions given the fixed ones:
per block, the joint table (both moved), a row or column renormalised (one moved, one fixed: conditioned on
the fixed value's cell) or a marginal (one moved, one absent). It is a proper density of the moved torsions
for every value of the fixed ones, and the fixed ones are the same before and after the move, so the ratio
q(old | fixed) / q(new | fixed) is the whole Hastings term of an independence move on the moved torsions.

:func:`crankshaft_fiber` is the density of a concerted psi_i / phi_{i+1} move on the line
psi_i + phi_{i+1} = const (module :mod:`openmm_confsample.moves.fragment` says why it is exact).
"""

from __future__ import annotations

import math

import numpy as np

from ...checks import as_generator
from ...errors import ConfSampleError
from .context import BLOCKS, KINDS

__all__ = ["FragmentTable", "FragmentConditional", "crankshaft_fiber", "cells", "sample_cells"]

_TWO_PI = 2.0 * math.pi


def cells(angles, n_grid: int) -> np.ndarray:
    """Cell indices (int, same shape) of angles (radians, any range) on ``n_grid`` equal cells of [-pi, pi)."""
    wrapped = np.mod(np.asarray(angles, dtype=float) + math.pi, _TWO_PI)
    return np.minimum((wrapped * (n_grid / _TWO_PI)).astype(np.int64), n_grid - 1)


def _cell(angle: float, n_grid: int) -> int:
    """:func:`cells` of one angle (a Python float) in scalar arithmetic (same result: both wrap by floor modulo)."""
    return min(int(((angle + math.pi) % _TWO_PI) * (n_grid / _TWO_PI)), n_grid - 1)


def sample_cells(probabilities: np.ndarray, n: int, rng: np.random.Generator, cdf=None) -> np.ndarray:
    """``n`` cell indices drawn from (m,) probabilities (inverse CDF, ``cdf`` its cumulative sum if known)."""
    cdf = np.cumsum(probabilities) if cdf is None else cdf
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(probabilities) - 1)


class FragmentTable:
    """One fragment's density as cell probabilities of three (n_grid, n_grid) blocks.

    Parameters
    ----------
    probabilities : (3, n_grid, n_grid) float
        Non-negative; each block is normalised here. Block b's axes are ``BLOCKS[b]``.
    uniform_weight : float in [0, 1)
        Mixed in as ``(1 - w) P + w / n_grid^2`` per block: a floor under the density, so that the ratio of
        target to proposal stays bounded and no state is unreachable.
    label : str
        Where the table came from (for messages), e.g. ``"model: VAL, zero-shot"``.
    """

    def __init__(self, probabilities, uniform_weight: float = 0.0, label: str = ""):
        p = np.asarray(probabilities, dtype=float)
        if p.ndim != 3 or p.shape[0] != len(BLOCKS) or p.shape[1] != p.shape[2] or p.shape[1] < 2:
            raise ConfSampleError(f"fragment table probabilities must have shape (3, n_grid, n_grid), got {p.shape}.")
        if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p.sum(axis=(1, 2)) <= 0):
            raise ConfSampleError(f"fragment table {label!r} has negative, non-finite or all-zero probabilities.")
        if not 0.0 <= float(uniform_weight) < 1.0:
            raise ConfSampleError(f"uniform_weight must lie in [0, 1), got {uniform_weight!r}.")
        p = p / p.sum(axis=(1, 2), keepdims=True)
        self.n_grid = p.shape[1]
        self.uniform_weight = float(uniform_weight)
        self.probabilities = (1.0 - self.uniform_weight) * p + self.uniform_weight / self.n_grid**2
        self.width = _TWO_PI / self.n_grid
        self.label = label

    @classmethod
    def uniform(cls, n_grid: int, label: str = "uniform") -> "FragmentTable":
        return cls(np.ones((len(BLOCKS), n_grid, n_grid)), 0.0, label)

    def axis_probabilities(self, kind: str, other: str, other_value=None) -> np.ndarray:
        """(n_grid,) probabilities of ``kind``'s cells: given ``other``'s value (its cell), or marginal if None.

        ``kind`` and ``other`` are the two kinds of one block.
        """
        block = next(b for b, axes in enumerate(BLOCKS) if kind in axes)
        table = self.probabilities[block] if BLOCKS[block][0] == kind else self.probabilities[block].T
        if other_value is None:
            row = table.sum(axis=1)
        else:
            row = table[:, int(cells(other_value, self.n_grid))]
        return row / row.sum()


class FragmentConditional:
    """Density of a fragment's moved torsions given its fixed ones (the ConditionalDensity protocol).

    Parameters
    ----------
    table : FragmentTable
    moved : sequence of kinds
        The torsions the move draws, e.g. ``("phi", "psi", "chi1")``; samples are (n, len(moved)) in this order.
    present : sequence of kinds
        Every torsion the fragment has; ``present - moved`` are fixed (the condition, in :data:`KINDS` order),
        the rest absent (marginalised).

    ``sample(condition, n, generator)``, ``log_prob(condition, y)`` and ``sample_and_log_prob`` take the
    fixed kinds' current values as ``condition`` ((n_fixed,) radians). Log-densities are natural logs with
    respect to d(moved torsions), radians.
    """

    def __init__(self, table: FragmentTable, moved, present):
        self.table = table
        self.moved = tuple(moved)
        present = set(present)
        unknown = [k for k in self.moved if k not in KINDS or k not in present]
        if unknown or not self.moved:
            raise ConfSampleError(f"moved kinds {list(self.moved)} must be non-empty and among the present kinds "
                                  f"{sorted(present)}.")
        self.fixed = tuple(k for k in KINDS if k in present and k not in self.moved)
        self._column = {k: i for i, k in enumerate(self.moved)}
        self._log_cell_volume = -len(self.moved) * math.log(table.width)
        # Per block that has a moved kind: (columns of its moved kinds, index of its fixed kind in the condition
        # or None, probabilities, their CDF and logs), each with one row per cell of the fixed kind (a row of
        # the block renormalised: the conditional) or a single row (both moved, or the other absent: marginal).
        # Computed once here, so a draw or an evaluation is a few look-ups (the move's hot path).
        self._blocks = []
        for axes in BLOCKS:
            roles = tuple("moved" if a in self.moved else "fixed" if a in self.fixed else "absent" for a in axes)
            if "moved" not in roles:
                continue
            if roles == ("moved", "moved"):
                rows = table.probabilities[BLOCKS.index(axes)].reshape(1, -1)
            else:  # the table's own conditional at each cell of the fixed kind (its centre), or its marginal
                kind, other = (axes if roles[0] == "moved" else axes[::-1])
                centres = -math.pi + (np.arange(table.n_grid) + 0.5) * table.width
                rows = np.stack([table.axis_probabilities(kind, other, c) for c in centres] if "fixed" in roles
                                else [table.axis_probabilities(kind, other)])
            columns = tuple(self._column[a] for a, r in zip(axes, roles) if r == "moved")
            fixed = next((self.fixed.index(a) for a, r in zip(axes, roles) if r == "fixed"), None)
            self._blocks.append((columns, fixed, rows, np.cumsum(rows, axis=1), np.log(rows)))

    @property
    def n_torsions(self) -> int:
        return len(self.moved)

    def _fixed_cells(self, condition) -> list:
        condition = np.asarray(condition, dtype=float).reshape(-1)
        if len(condition) != len(self.fixed):
            raise ConfSampleError(f"condition has {len(condition)} values, expected {len(self.fixed)} "
                                  f"(the fixed kinds {list(self.fixed)}).")
        return [_cell(angle, self.table.n_grid) for angle in condition.tolist()]

    def sample_and_log_prob(self, condition, n: int, generator=None):
        rng = as_generator(generator, "generator")
        n = int(n)
        fixed_cells = self._fixed_cells(condition)
        out = np.empty((n, len(self.moved)))
        log_q = np.full(n, self._log_cell_volume)
        g = self.table.n_grid
        for columns, fixed, rows, cdfs, log_rows in self._blocks:
            row = 0 if fixed is None else fixed_cells[fixed]
            index = sample_cells(rows[row], n, rng, cdfs[row])
            log_q += log_rows[row, index]
            for column, cell in zip(columns, [index // g, index % g] if len(columns) == 2 else [index]):
                out[:, column] = -math.pi + (cell + rng.random(n)) * self.table.width
        return out, log_q

    def sample_one(self, condition, rng: np.random.Generator):
        """One draw and its log-density: ``sample_and_log_prob(condition, 1, rng)`` (the same random numbers and
        values) in scalar arithmetic, ~10x faster for the one-candidate moves that dominate a run."""
        fixed_cells = self._fixed_cells(condition)
        out = [0.0] * len(self.moved)
        log_q = self._log_cell_volume
        g, width = self.table.n_grid, self.table.width
        for columns, fixed, rows, cdfs, log_rows in self._blocks:
            row = 0 if fixed is None else fixed_cells[fixed]
            cdf = cdfs[row]
            index = min(int(cdf.searchsorted(rng.random() * cdf[-1], side="right")), len(cdf) - 1)
            log_q += float(log_rows[row, index])
            for column, cell in zip(columns, divmod(index, g) if len(columns) == 2 else (index,)):
                out[column] = -math.pi + (cell + rng.random()) * width
        return np.array(out), log_q

    def log_prob_one(self, condition, y) -> float:
        """``log_prob(condition, y)[0]`` for one point ``y`` ((n_moved,) radians), in scalar arithmetic."""
        fixed_cells = self._fixed_cells(condition)
        y = np.asarray(y, dtype=float).reshape(-1).tolist()
        g = self.table.n_grid
        log_q = self._log_cell_volume
        for columns, fixed, _, _, log_rows in self._blocks:
            index = _cell(y[columns[0]], g)
            if len(columns) == 2:
                index = index * g + _cell(y[columns[1]], g)
            log_q += float(log_rows[0 if fixed is None else fixed_cells[fixed], index])
        return log_q

    def sample(self, condition, n: int, generator=None) -> np.ndarray:
        return self.sample_and_log_prob(condition, n, generator)[0]

    def log_prob(self, condition, y) -> np.ndarray:
        y = np.asarray(y, dtype=float).reshape(-1, len(self.moved))
        fixed_cells = self._fixed_cells(condition)
        g = self.table.n_grid
        log_q = np.full(len(y), self._log_cell_volume)
        for columns, fixed, _, _, log_rows in self._blocks:
            index = cells(y[:, columns[0]], g)
            if len(columns) == 2:
                index = index * g + cells(y[:, columns[1]], g)
            log_q += log_rows[0 if fixed is None else fixed_cells[fixed], index]
        return log_q


def crankshaft_fiber(table_i: FragmentTable, phi_i, table_j: FragmentTable, psi_j, total: float) -> np.ndarray:
    """(n_grid,) probabilities of psi_i's cells on the line psi_i + phi_j = ``total`` (j = i + 1).

    r(psi) is proportional to q_i(psi | phi_i) q_j(phi = total - psi | psi_j), both evaluated at the centre of
    psi's cell (piecewise constant in psi, so exactly normalisable); ``phi_i`` / ``psi_j`` None where that
    torsion is absent (marginal instead of conditional). Both tables must share the grid.
    """
    if table_i.n_grid != table_j.n_grid:
        raise ConfSampleError(f"crankshaft tables must share a grid, got {table_i.n_grid} and {table_j.n_grid} cells.")
    q_psi = table_i.axis_probabilities("psi", "phi", phi_i)
    q_phi = table_j.axis_probabilities("phi", "psi", psi_j)
    centres = -math.pi + (np.arange(table_i.n_grid) + 0.5) * table_i.width
    weights = q_psi * q_phi[cells(total - centres, table_j.n_grid)]
    return weights / weights.sum()
