"""Dihedral angles and rigid torsion rotations on the covalent graph.

A torsion ``(i, j, k, l)`` is a bonded chain ``i-j``, ``j-k``, ``k-l``. Changing it means
rotating one side of the ``j-k`` bond rigidly about the ``j-k`` axis; that is only a rigid
motion when ``j-k`` is a bridge of the bond graph (not in a ring). Which side moves is a
fixed function of the topology (see :func:`moving_atoms`), so a move built on these
rotations is deterministic and invertible: rotating back by the same angle restores the
input to rounding error.

Everything here is plain numpy in nm and radians. :class:`TorsionSet` does the graph work
once in its constructor so that :meth:`TorsionSet.values` and :meth:`TorsionSet.set_values`
are cheap enough to sit inside a Monte Carlo move.

Sign convention: the same as :func:`mdtraj.compute_dihedrals` (IUPAC): looking along
``j -> k``, the angle is positive when ``l`` is turned clockwise from ``i``. Angles are
returned in ``[-pi, pi)``.
"""

import math

import numpy as np

from openmm_confsample.errors import ConfSampleError

__all__ = ["dihedral_angles", "moving_atoms", "TorsionSet"]

_TWO_PI = 2.0 * np.pi
# Up to this many torsions, one frame is measured with scalar math (numpy call overhead
# dominates for tiny arrays); beyond it the vectorized path wins.
_SCALAR_MAX_TORSIONS = 16


# --------------------------------------------------------------------------------------
# input checks (run where the input enters; the hot-path methods only check shapes)
# --------------------------------------------------------------------------------------

def _strip_unit(positions):
    """Return ``positions`` as a float64 array in nm (accepts an OpenMM ``Quantity``)."""
    if hasattr(positions, "value_in_unit"):
        from openmm import unit

        positions = positions.value_in_unit(unit.nanometer)
    return np.asarray(positions, dtype=np.float64)


def _as_batch(positions, n_atoms, copy):
    """Return ``(x, single)``: ``x`` is (B, n_atoms, 3) float64, ``single`` if input was 2-D."""
    x = _strip_unit(positions)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3 or x.shape[2] != 3 or (n_atoms is not None and x.shape[1] != n_atoms):
        expected = "(n_atoms, 3) or (B, n_atoms, 3)" if n_atoms is None else (
            f"({n_atoms}, 3) or (B, {n_atoms}, 3)")
        raise ConfSampleError(
            f"positions has shape {np.shape(positions)}, expected {expected} in nm.")
    if copy:
        x = x.copy()
    return x, single


def _check_torsions(torsions, n_atoms):
    """Return ``torsions`` as a (k, 4) int64 array with every index in ``[0, n_atoms)``."""
    t = np.asarray(torsions)
    if t.ndim == 1 and t.size == 4:
        t = t[None]
    if t.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if t.ndim != 2 or t.shape[1] != 4:
        raise ConfSampleError(f"torsions has shape {t.shape}, expected (k, 4) atom indices.")
    if not np.issubdtype(t.dtype, np.integer):
        if not np.issubdtype(t.dtype, np.floating) or not np.all(t == np.round(t)):
            raise ConfSampleError(f"torsions must hold integer atom indices, got dtype {t.dtype}.")
    t = t.astype(np.int64)
    bad = (t < 0) | (t >= n_atoms)
    if bad.any():
        row = int(np.nonzero(bad.any(axis=1))[0][0])
        raise ConfSampleError(
            f"torsion {tuple(int(a) for a in t[row])} has atom index "
            f"{int(t[row][bad[row]][0])} outside [0, {n_atoms}).")
    return t


def _check_bonds(bonds, n_atoms):
    """Return ``bonds`` as a (n_bonds, 2) int64 array of distinct in-range atom pairs."""
    n_atoms = int(n_atoms)
    if n_atoms < 1:
        raise ConfSampleError(f"n_atoms must be a positive integer, got {n_atoms}.")
    b = np.asarray(bonds)
    if b.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if b.ndim != 2 or b.shape[1] != 2 or not np.issubdtype(b.dtype, np.integer):
        raise ConfSampleError(
            f"bonds has shape {b.shape} and dtype {b.dtype}, expected (n_bonds, 2) integers.")
    b = b.astype(np.int64)
    bad = (b < 0) | (b >= n_atoms)
    if bad.any():
        row = int(np.nonzero(bad.any(axis=1))[0][0])
        raise ConfSampleError(
            f"bond {tuple(int(a) for a in b[row])} has an atom index outside [0, {n_atoms}).")
    self_bonded = b[:, 0] == b[:, 1]
    if self_bonded.any():
        a = int(b[self_bonded][0, 0])
        raise ConfSampleError(f"bond ({a}, {a}) joins atom {a} to itself.")
    return b


def _adjacency(bonds, n_atoms):
    adj = [[] for _ in range(n_atoms)]
    for a, b in bonds.tolist():
        adj[a].append(b)
        adj[b].append(a)
    return [set(neigh) for neigh in adj]


def _side(adj, start, across):
    """Atoms reachable from ``start`` without crossing the bond ``start-across``."""
    seen = {start}
    stack = [start]
    while stack:
        u = stack.pop()
        for v in adj[u]:
            if u == start and v == across:
                continue
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


def _moving_side(adj, torsion):
    """Return ``(moving, moves_i_side)`` for a torsion; raise if it cannot be rotated."""
    i, j, k, l = (int(a) for a in torsion)
    name = f"({i}, {j}, {k}, {l})"
    if len({i, j, k, l}) != 4:
        raise ConfSampleError(f"torsion {name} repeats an atom; it needs four distinct atoms.")
    for a, b in ((i, j), (j, k), (k, l)):
        if b not in adj[a]:
            raise ConfSampleError(
                f"torsion {name} is not a bonded chain: atoms {a} and {b} are not bonded.")
    k_side = _side(adj, k, j)
    if j in k_side:
        raise ConfSampleError(
            f"torsion {name} turns about ring bond {j}-{k}: atoms {j} and {k} stay connected "
            f"without it, so no rigid rotation changes this torsion.")
    j_side = _side(adj, j, k)
    # Smaller side moves (fewer coordinates touched); ties go to the k/l side.
    moves_i_side = len(j_side) < len(k_side)
    side = j_side - {j} if moves_i_side else k_side - {k}
    return np.array(sorted(side), dtype=np.int64), moves_i_side


# --------------------------------------------------------------------------------------
# dihedral and rotation kernels (shared by the scalar one-frame path and the batch path)
# --------------------------------------------------------------------------------------

def _dihedral_yx(p0, p1, p2, p3):
    """``(y, x)`` with ``atan2(y, x)`` the dihedral, mdtraj/IUPAC sign.

    Each point is a triple of coordinates, floats or equally shaped arrays: written out by
    components because np.cross costs ~20 us per call on tiny arrays and strided (..., 3)
    slices are slow for big batches.
    """
    b1x, b1y, b1z = p1[0] - p0[0], p1[1] - p0[1], p1[2] - p0[2]
    b2x, b2y, b2z = p2[0] - p1[0], p2[1] - p1[1], p2[2] - p1[2]
    b3x, b3y, b3z = p3[0] - p2[0], p3[1] - p2[1], p3[2] - p2[2]
    c1x, c1y, c1z = b2y * b3z - b2z * b3y, b2z * b3x - b2x * b3z, b2x * b3y - b2y * b3x
    c2x, c2y, c2z = b1y * b2z - b1z * b2y, b1z * b2x - b1x * b2z, b1x * b2y - b1y * b2x
    y = (b1x * c1x + b1y * c1y + b1z * c1z) * (b2x * b2x + b2y * b2y + b2z * b2z) ** 0.5
    return y, c1x * c2x + c1y * c2y + c1z * c2z


def _torsion_columns(torsions):
    """(k, 12) columns of the 4 atoms' x, y, z in positions reshaped to (B, 3 n_atoms)."""
    return (3 * np.asarray(torsions)[:, :, None] + np.arange(3)).reshape(-1, 12)


def _dihedral_array(x, columns):
    """Dihedrals (B, k) in ``[-pi, pi)`` of ``x`` (B, n_atoms, 3) at ``columns`` (k, 12)."""
    # Gather as (12, B, k) so every component is a contiguous array.
    q = np.ascontiguousarray(np.moveaxis(x.reshape(x.shape[0], -1)[:, columns], -1, 0))
    angle = np.arctan2(*_dihedral_yx(q[0:3], q[3:6], q[6:9], q[9:12]))
    return np.where(angle >= np.pi, angle - _TWO_PI, angle)


def _dihedral_scalar(p0, p1, p2, p3):
    """Dihedral of four 3-sequences of Python floats in ``[-pi, pi)``."""
    angle = math.atan2(*_dihedral_yx(p0, p1, p2, p3))
    return angle - _TWO_PI if angle >= math.pi else angle


def _rotation_t(ax, ay, az, c, s):
    """Entries of R^T, row-major, for the turn by (cos, sin) = (c, s) about unit axis a.

    Rodrigues: R = c I + s [a]_x + (1 - c) a a^T. Positions are rows, so they are turned
    by multiplying R^T on the right. Works on floats or on equally shaped arrays.
    """
    v = 1.0 - c
    xy, xz, yz = ax * ay * v, ax * az * v, ay * az * v
    sx, sy, sz = s * ax, s * ay, s * az
    return (c + ax * ax * v, xy + sz, xz - sy,
            xy - sz, c + ay * ay * v, yz + sx,
            xz + sy, yz - sx, c + az * az * v)


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------

def dihedral_angles(positions, torsions):
    """Dihedral angles, with the sign convention of :func:`mdtraj.compute_dihedrals`.

    Parameters
    ----------
    positions : (n_atoms, 3) or (B, n_atoms, 3) float, nm (or an OpenMM ``Quantity``)
    torsions : (k, 4) int
        Atom indices ``(i, j, k, l)``; they need not be bonded.

    Returns
    -------
    angles : (k,) or (B, k) float, radians in ``[-pi, pi)``

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]])
    >>> float(np.degrees(dihedral_angles(x, [[0, 1, 2, 3]]))[0])
    -90.0
    """
    x, single = _as_batch(positions, None, copy=False)
    t = _check_torsions(torsions, x.shape[1])
    angles = _dihedral_array(x, _torsion_columns(t))
    return angles[0] if single else angles


def moving_atoms(bonds, n_atoms, torsion):
    """Atoms carried rigidly when the ``j-k`` bond of ``torsion`` rotates.

    Removing the ``j-k`` bond splits the molecule into the ``j`` side (holding ``i``) and
    the ``k`` side (holding ``l``). The side with fewer atoms moves; on a tie the ``k``/``l``
    side moves. The axis atom of the moving side (``j`` or ``k``) lies on the rotation axis
    and is not returned. Atoms of other molecules are on neither side.

    Parameters
    ----------
    bonds : (n_bonds, 2) int
        Covalent bonds of the whole system (order and duplicates do not matter).
    n_atoms : int
    torsion : (4,) int
        ``(i, j, k, l)``; ``i-j``, ``j-k`` and ``k-l`` must be bonds and ``j-k`` must not be
        in a ring.

    Returns
    -------
    moving : (m,) int64, sorted atom indices (contains ``i`` or ``l``).

    Raises
    ------
    ConfSampleError
        If an index is out of range, the atoms are not a bonded chain, or ``j-k`` is a ring bond.

    Examples
    --------
    >>> moving_atoms([[0, 1], [1, 2], [2, 3], [3, 4]], 5, (0, 1, 2, 3))
    array([0])
    """
    bonds = _check_bonds(bonds, n_atoms)
    torsion = _check_torsions(torsion, int(n_atoms))
    if len(torsion) != 1:
        raise ConfSampleError(f"torsion must be four atom indices, got {len(torsion)} torsions.")
    moving, _ = _moving_side(_adjacency(bonds, int(n_atoms)), torsion[0])
    return moving


def _topology_bonds(topology):
    """``(bonds, n_atoms)`` of an OpenMM Topology, an mdtraj Topology or an RDKit Mol."""
    if hasattr(topology, "getNumAtoms") and hasattr(topology, "bonds") and callable(
            getattr(topology, "atoms", None)):  # openmm.app.Topology
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
        n_atoms = topology.getNumAtoms()
    elif hasattr(topology, "n_atoms") and hasattr(topology, "bonds"):  # mdtraj.Topology
        bonds = [(b[0].index, b[1].index) for b in topology.bonds]
        n_atoms = topology.n_atoms
    elif hasattr(topology, "GetBonds"):  # rdkit.Chem.Mol
        bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in topology.GetBonds()]
        n_atoms = topology.GetNumAtoms()
    else:
        raise ConfSampleError(
            f"topology is a {type(topology).__name__}; expected an openmm.app.Topology, an "
            f"mdtraj.Topology or an RDKit Mol.")
    return np.array(bonds, dtype=np.int64).reshape(-1, 2), n_atoms


def _split_named(torsions, names):
    """Accept ``[(name, (i, j, k, l)), ...]`` (as from rotatable detection) or plain indices."""
    seq = list(torsions) if not isinstance(torsions, np.ndarray) else None
    if seq and all(len(e) == 2 and isinstance(e[0], str) for e in seq):
        if names is None:
            names = [e[0] for e in seq]
        torsions = [tuple(e[1]) for e in seq]
    return torsions, names


# --------------------------------------------------------------------------------------
# TorsionSet
# --------------------------------------------------------------------------------------

class TorsionSet:
    """A fixed list of rotatable torsions with precomputed moving atoms.

    For each torsion the constructor finds the atoms that rotate with it (the smaller side
    of the ``j-k`` bond, see :func:`moving_atoms`); :meth:`set_values` then sets each
    torsion by a rigid rotation of those atoms about the ``j-k`` axis. Bond lengths, bond
    angles and every atom outside the moving side are left unchanged.

    Parameters
    ----------
    bonds : (n_bonds, 2) int
        Covalent bonds of the whole system.
    n_atoms : int
    torsions : (k, 4) int, or a list of ``(name, (i, j, k, l))``
        As returned by :func:`~openmm_confsample.geometry.detect_rotatable_torsions`. At
        most one torsion per central bond; central bonds must not be in rings.
    names : list of str, optional
        One unique name per torsion; default ``"i-j-k-l"``.

    Attributes
    ----------
    torsions : (k, 4) int64
    names : list of str
    n_atoms : int
    bonds : (n_bonds, 2) int64, the validated bonds
    moving_indices : list of (m_t,) int64 arrays, the atoms each torsion moves
    moving_mask : (k, n_atoms) bool
    moves_i_side : (k,) bool, True where the ``i`` side moves (else the ``l`` side)

    Examples
    --------
    Butane carbons only (C0-C1-C2-C3), set to +60 degrees:

    >>> import numpy as np
    >>> ts = TorsionSet([[0, 1], [1, 2], [2, 3]], 4, [[0, 1, 2, 3]], names=["C-C-C-C"])
    >>> x = np.array([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]])
    >>> y = ts.set_values(x, [np.pi / 3])
    >>> bool(np.allclose(ts.values(y), np.pi / 3))
    True
    """

    def __init__(self, bonds, n_atoms, torsions, names=None):
        torsions, names = _split_named(torsions, names)
        self.n_atoms = int(n_atoms)
        bonds = _check_bonds(bonds, self.n_atoms)
        self.bonds = bonds
        self.torsions = _check_torsions(torsions, self.n_atoms)
        k = len(self.torsions)
        if names is None:
            names = ["-".join(str(int(a)) for a in t) for t in self.torsions]
        names = [str(n) for n in names]
        if len(names) != k:
            raise ConfSampleError(f"names has {len(names)} entries but there are {k} torsions.")
        if len(set(names)) != k:
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfSampleError(f"names must be unique; {dup!r} appears more than once.")
        self.names = names

        adj = _adjacency(bonds, self.n_atoms)
        sides = [_moving_side(adj, t) for t in self.torsions]
        # Two torsions about one bond are one degree of freedom: setting both is contradictory.
        seen = {}
        for t, (i, j, k, l) in enumerate(self.torsions.tolist()):
            axis = (min(j, k), max(j, k))
            if axis in seen:
                raise ConfSampleError(
                    f"torsions {seen[axis]} and {tuple(self.torsions[t].tolist())} both turn "
                    f"bond {j}-{k}; keep one torsion per rotatable bond.")
            seen[axis] = tuple(self.torsions[t].tolist())
        self.moving_indices = [s[0] for s in sides]
        self.moves_i_side = np.array([s[1] for s in sides], dtype=bool)
        self.moving_mask = np.zeros((k, self.n_atoms), dtype=bool)
        for t, idx in enumerate(self.moving_indices):
            self.moving_mask[t, idx] = True
        # Turning the moving side by +delta about j->k raises the torsion by delta when it
        # is the l side and lowers it when it is the i side.
        self._signs = np.where(self.moves_i_side, -1.0, 1.0)
        self._sign_list = self._signs.tolist()
        self._quads = [tuple(int(a) for a in t) for t in self.torsions]
        self._columns = _torsion_columns(self.torsions)
        self._flat_quads = self.torsions.ravel()
        # A contiguous run of moving atoms is indexed by a slice: a view, not a gather.
        self._moving_slices = [
            slice(int(idx[0]), int(idx[-1]) + 1) if idx[-1] - idx[0] + 1 == len(idx) else idx
            for idx in self.moving_indices]

    @classmethod
    def from_topology(cls, topology, torsions, names=None):
        """Build from an ``openmm.app.Topology``, an ``mdtraj.Topology`` or an RDKit ``Mol``.

        ``torsions`` may be (k, 4) indices or the ``[(name, (i, j, k, l)), ...]`` list that
        :func:`~openmm_confsample.geometry.detect_rotatable_torsions` returns.
        """
        bonds, n_atoms = _topology_bonds(topology)
        return cls(bonds, n_atoms, torsions, names=names)

    def __len__(self):
        return len(self.torsions)

    def __repr__(self):
        return f"TorsionSet({len(self)} torsions: {', '.join(self.names)}; n_atoms={self.n_atoms})"

    # ---- hot path -------------------------------------------------------------------

    def values(self, positions):
        """Current torsion angles.

        Parameters
        ----------
        positions : (n_atoms, 3) or (B, n_atoms, 3) float, nm

        Returns
        -------
        (k,) or (B, k) float, radians in ``[-pi, pi)``
        """
        x, single = _as_batch(positions, self.n_atoms, copy=False)
        if single and len(self._quads) <= _SCALAR_MAX_TORSIONS:
            pts = x[0][self._flat_quads].tolist()
            return np.array([_dihedral_scalar(*pts[a:a + 4]) for a in range(0, len(pts), 4)])
        angles = _dihedral_array(x, self._columns)
        return angles[0] if single else angles

    def set_values(self, positions, targets):
        """Copy of ``positions`` with every torsion rotated rigidly to its target.

        Torsions are applied in order, each measured right before its rotation. Every
        torsion turns a different bridge bond, and a rigid turn about one bridge moves the
        four atoms of any other torsion rigidly (or not at all), so coupled torsions such as
        phi and psi (sharing CA) all end at their targets.

        Parameters
        ----------
        positions : (n_atoms, 3) or (B, n_atoms, 3) float, nm
            Not modified.
        targets : (k,) or (B, k) float, radians (any range)

        Returns
        -------
        new_positions : float64 array of the shape of ``positions``, nm
        """
        return self._apply(positions, targets, absolute=True)

    def rotate_by(self, positions, deltas):
        """Copy of ``positions`` with each torsion increased by ``deltas`` (radians).

        Shapes as in :meth:`set_values`; ``deltas`` is (k,) or (B, k).
        """
        return self._apply(positions, deltas, absolute=False)

    def _apply(self, positions, angles, absolute):
        x, single = _as_batch(positions, self.n_atoms, copy=True)
        n_batch = x.shape[0]
        k = len(self.torsions)
        angles = np.asarray(angles, dtype=np.float64)
        if angles.shape not in ((k,), (n_batch, k)) and not (single and angles.shape == (1, k)):
            what = "targets" if absolute else "deltas"
            raise ConfSampleError(
                f"{what} has shape {angles.shape}, expected ({k},) or ({n_batch}, {k}).")
        if n_batch == 1:
            self._apply_single(x[0], angles.reshape(k), absolute)
        else:
            angles = np.broadcast_to(angles, (n_batch, k))
            for t in range(k):
                self._apply_batch(x, t, angles[:, t], absolute)
        return x[0] if single else x

    def _apply_single(self, x, angles, absolute):
        # One frame: scalar math on the 4 torsion atoms beats ~40 numpy calls on tiny arrays.
        angles = angles.tolist()
        for t, quad in enumerate(self.torsions):
            p0, p1, p2, p3 = x[quad].tolist()
            delta = angles[t] - _dihedral_scalar(p0, p1, p2, p3) if absolute else angles[t]
            theta = self._sign_list[t] * delta
            ax, ay, az = p2[0] - p1[0], p2[1] - p1[1], p2[2] - p1[2]
            norm = math.sqrt(ax * ax + ay * ay + az * az)
            rt = _rotation_t(ax / norm, ay / norm, az / norm, math.cos(theta), math.sin(theta))
            ox, oy, oz = p1
            # x -> R (x - o) + o = R x + (o - R o): one affine map, no recentring pass.
            affine = np.array(rt + (ox - (rt[0] * ox + rt[3] * oy + rt[6] * oz),
                                    oy - (rt[1] * ox + rt[4] * oy + rt[7] * oz),
                                    oz - (rt[2] * ox + rt[5] * oy + rt[8] * oz))).reshape(4, 3)
            moving = self._moving_slices[t]
            x[moving] = x[moving] @ affine[:3] + affine[3]

    def _apply_batch(self, x, t, angles, absolute):
        n_batch = x.shape[0]
        # Gather the 4 torsion atoms as (12, B): every component below is a contiguous (B,)
        # array (a (B, 4, 3) gather with strided components is ~5x slower).
        q = np.ascontiguousarray(x.reshape(n_batch, -1)[:, self._columns[t]].T)
        p0, p1, p2, p3 = q[0:3], q[3:6], q[6:9], q[9:12]
        if absolute:
            current = np.arctan2(*_dihedral_yx(p0, p1, p2, p3))
            theta = self._signs[t] * (angles - current)
        else:
            theta = self._signs[t] * angles
        axis = p2 - p1
        axis /= np.sqrt((axis * axis).sum(axis=0))
        rt = _rotation_t(axis[0], axis[1], axis[2], np.cos(theta), np.sin(theta))
        ox, oy, oz = p1
        # x -> R (x - o) + o = R x + (o - R o), saving a full pass over the moving atoms.
        shift = np.stack((ox - (rt[0] * ox + rt[3] * oy + rt[6] * oz),
                          oy - (rt[1] * ox + rt[4] * oy + rt[7] * oz),
                          oz - (rt[2] * ox + rt[5] * oy + rt[8] * oz)), axis=-1)
        rot_t = np.stack(rt, axis=-1).reshape(n_batch, 3, 3)
        moving = self._moving_slices[t]
        moved = np.matmul(x[:, moving], rot_t)
        moved += shift[:, None, :]
        x[:, moving] = moved
