"""Internal coordinates for the Timewarp flow: bonds guessed from geometry, a Z-matrix, and the map x <-> q.

In ``coordinates="internal"`` mode the flow's position half lives on bond lengths, bond angles and
torsions of a Z-matrix instead of Cartesian displacements. Atom ``i`` (not the first three placed) is put
at distance r from its parent j, angle theta(i, j, k) and torsion phi(i, j, k, l) from previously placed
atoms. The first three placed atoms fix the pose (position of the root, direction root -> second atom,
half-plane of the third): a proposal keeps the pose of x(t) and changes the 3n - 6 internal coordinates.
On that fibre dx = J(q) dq with J(q) = r_1^2 prod_{i>=2} r_i^2 sin(theta_i) (the rotation part is the
Haar measure, which does not depend on q), so densities in Cartesian coordinates differ from those in q by
-log J(q).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ...errors import ConfSampleError

# -- bonds and the Z-matrix ------------------------------------------------------------------------

_COVALENT_RADIUS_NM = {"H": 0.031, "C": 0.076, "N": 0.071, "O": 0.066, "F": 0.057, "P": 0.107, "S": 0.105,
                       "CL": 0.102, "BR": 0.120}


def guess_bonds(atom_labels, positions_nm) -> tuple[list, list]:
    """Bonds from geometry, for internal coordinates when no Z-matrix is given.

    The element is read from the atom name (the part of 'RES:NAME' after the colon: 'CL'/'BR' if the name starts
    so, else its first letter); atoms closer than 1.25 times the sum of covalent radii (median over the given
    frames) are bonded. Returns ``(bonds, heavy)``: pairs of atom indices and a heavy-atom flag per atom.
    """
    names = [str(label).split(":")[-1].upper() for label in atom_labels]
    elements = [name[:2] if name[:2] in ("CL", "BR") else name[:1] for name in names]
    unknown = sorted({e for e in elements if e not in _COVALENT_RADIUS_NM})
    if unknown:
        raise ConfSampleError(f"cannot guess bonds for elements {unknown} from atom names; pass config.zmatrix.")
    x = np.asarray(positions_nm, dtype=np.float64).reshape(-1, len(names), 3)
    dist = np.median(np.linalg.norm(x[:, :, None] - x[:, None], axis=-1), axis=0)
    radii = np.array([_COVALENT_RADIUS_NM[e] for e in elements])
    bonded = dist < 1.25 * (radii[:, None] + radii[None])
    bonds = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names)) if bonded[i, j]]
    return bonds, [e != "H" for e in elements]


def zmatrix_for(atom_labels, positions_nm=None, topology=None) -> tuple:
    """A Z-matrix for ``coordinates='internal'``: from an OpenMM topology's bonds, else guessed from positions."""
    n_atoms = len(atom_labels)
    if topology is not None:
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
        heavy = [a.element is None or a.element.symbol != "H" for a in topology.atoms()]
    else:
        bonds, heavy = guess_bonds(atom_labels, positions_nm)
    try:
        return tuple(zmatrix_from_bonds(bonds, n_atoms, heavy))
    except ValueError as exc:
        raise ConfSampleError(f"cannot build a Z-matrix for these {n_atoms} atoms: {exc}") from None


def zmatrix_from_bonds(bonds, n_atoms: int, heavy=None) -> list:
    """Z-matrix rows ``(i, j, k, l)`` in placement order (-1 where a reference is unused), from a bond list.

    The root is the graph centre among heavy atoms; atoms are placed breadth-first, heavy atoms first. The
    torsion reference ``l`` is an already placed sibling of ``i`` on ``j`` when there is one (so methyl
    hydrogens and branches get near-rigid relative torsions) and otherwise a placed neighbour of ``k``.
    """
    heavy = [True] * n_atoms if heavy is None else [bool(h) for h in heavy]
    adj = [[] for _ in range(n_atoms)]
    for a, b in bonds:
        adj[int(a)].append(int(b))
        adj[int(b)].append(int(a))
    for a in range(n_atoms):
        adj[a].sort(key=lambda x: (not heavy[x], x))

    def eccentricity(s):
        dist = {s: 0}
        frontier = [s]
        while frontier:
            nxt = []
            for a in frontier:
                for b in adj[a]:
                    if b not in dist:
                        dist[b] = dist[a] + 1
                        nxt.append(b)
            frontier = nxt
        return max(dist.values()) if len(dist) == n_atoms else math.inf

    candidates = [a for a in range(n_atoms) if heavy[a] and len(adj[a]) >= 2] or list(range(n_atoms))
    root = min(candidates, key=lambda a: (eccentricity(a), -len(adj[a]), a))
    if not math.isfinite(eccentricity(root)):
        raise ValueError("the bond graph is not connected; internal coordinates need one molecule.")
    order, parent = [root], {root: -1}
    head = 0
    while head < len(order):
        a = order[head]
        head += 1
        for b in adj[a]:
            if b not in parent:
                parent[b] = a
                order.append(b)
    if n_atoms < 3:
        raise ValueError("internal coordinates need at least three atoms.")
    placed, rows = set(), []
    for i in order:
        j = parent[i]
        k = l = -1
        if j >= 0:
            k_options = [b for b in adj[j] if b in placed and b != i]
            if parent[j] >= 0:
                k_options = [parent[j]] + [b for b in k_options if b != parent[j]]
            k = k_options[0] if k_options else -1
            if len(placed) >= 3:
                siblings = [b for b in adj[j] if b in placed and b not in (i, k)]
                if siblings:
                    l = siblings[0]
                else:
                    l_options = [b for b in adj[k] if b in placed and b not in (i, j)]
                    if not l_options:
                        l_options = [b for b in placed if b not in (i, j, k)]
                    l = l_options[0]
        rows.append((int(i), int(j), int(k), int(l)))
        placed.add(i)
    # The third placed atom needs k: its parent's other placed neighbour.
    i, j, k, l = rows[2]
    if k < 0:
        k = rows[0][0] if j != rows[0][0] else rows[1][0]
        rows[2] = (i, j, k, -1)
    return rows


# -- the map x <-> q -------------------------------------------------------------------------------

def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def bond_angle(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Angle p0-p1-p2 in radians, (...,)."""
    a, b = p0 - p1, p2 - p1
    return torch.atan2(torch.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1))


def dihedral(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
    """IUPAC torsion p0-p1-p2-p3 in radians in (-pi, pi], (...,)."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = _unit(b1)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    x = (v * w).sum(-1)
    y = (torch.cross(b1n, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x)


class InternalCoordinates(nn.Module):
    """Cartesian <-> (r, theta, phi) per atom for a fixed Z-matrix; the pose is taken from a reference state.

    ``q`` is (B, n, 3) in topology order: column 0 bond length (nm), 1 angle (rad), 2 torsion (rad); ``mask``
    (n, 3) is 1 where the coordinate exists (3n - 6 ones) and the rest of ``q`` is 0.
    """

    def __init__(self, zmatrix):
        super().__init__()
        rows = torch.as_tensor(zmatrix, dtype=torch.long).view(-1, 4)
        n = rows.shape[0]
        if sorted(rows[:, 0].tolist()) != list(range(n)):
            raise ValueError("the Z-matrix must place every atom exactly once.")
        refs = torch.full((n, 3), -1, dtype=torch.long)
        refs[rows[:, 0]] = rows[:, 1:]
        mask = torch.zeros(n, 3)
        mask[rows[1, 0], 0] = 1.0
        mask[rows[2, 0], :2] = 1.0
        for i in rows[3:, 0]:
            mask[i] = 1.0
        self.register_buffer("rows", rows)
        self.register_buffer("refs", refs)
        self.register_buffer("mask", mask)
        # Atoms from the fourth row on are placed level by level: an atom's level is one more than the highest
        # of its three references, so every atom of a level can be placed in one batched step.
        level = {int(rows[0, 0]): 0, int(rows[1, 0]): 1, int(rows[2, 0]): 2}
        for i, j, k, m in rows[3:].tolist():
            level[i] = 1 + max(level[j], level[k], level[m])
        # Non-persistent buffers: they follow .to(device) but stay out of the state dict (checkpoints unchanged).
        self._level_names = []
        for lv in sorted({level[i] for i in rows[3:, 0].tolist()}):
            name = f"_level_{lv}"
            self.register_buffer(name, rows[3:][torch.tensor([level[i] == lv for i in rows[3:, 0].tolist()])],
                                 persistent=False)
            self._level_names.append(name)

    def to_internal(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n, 3) nm -> q (B, n, 3)."""
        # Only coordinates that exist are computed: degenerate ones would give NaN values and NaN gradients.
        rows = self.rows
        r_rows, t_rows, p_rows = rows[1:], rows[2:], rows[3:]
        r = (x[:, r_rows[:, 0]] - x[:, r_rows[:, 1]]).norm(dim=-1)
        theta = bond_angle(x[:, t_rows[:, 0]], x[:, t_rows[:, 1]], x[:, t_rows[:, 2]])
        phi = dihedral(x[:, p_rows[:, 0]], x[:, p_rows[:, 1]], x[:, p_rows[:, 2]], x[:, p_rows[:, 3]])
        zeros = x.new_zeros(x.shape[0], x.shape[1])
        return torch.stack([zeros.index_copy(1, r_rows[:, 0], r), zeros.index_copy(1, t_rows[:, 0], theta),
                            zeros.index_copy(1, p_rows[:, 0], phi)], dim=-1)

    def log_jacobian(self, q: torch.Tensor) -> torch.Tensor:
        """log J(q) = sum 2 log r + sum log sin(theta) over the coordinates that exist, (B,)."""
        m = self.mask
        safe_r = torch.where(m[:, 0] > 0, q[..., 0], torch.ones_like(q[..., 0]))
        safe_t = torch.where(m[:, 1] > 0, q[..., 1], torch.full_like(q[..., 1], math.pi / 2))
        return 2 * torch.log(safe_r).sum(-1) + torch.log(torch.sin(safe_t)).sum(-1)

    def frame(self, x_ref: torch.Tensor):
        """Origin (B, 3) and rotation (B, 3, 3) (columns e1, e2, e3) of the pose of ``x_ref``."""
        a0, a1, a2 = self.rows[0, 0], self.rows[1, 0], self.rows[2, 0]
        origin = x_ref[:, a0]
        e1 = _unit(x_ref[:, a1] - origin)
        w = x_ref[:, a2] - x_ref[:, self.rows[2, 1]]
        e2 = _unit(w - (w * e1).sum(-1, keepdim=True) * e1)
        e3 = torch.cross(e1, e2, dim=-1)
        return origin, torch.stack([e1, e2, e3], dim=-1)

    def to_cartesian(self, q: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
        """q (B, n, 3) -> x (B, n, 3) nm with the pose of x_ref (B or 1, n, 3)."""
        batch = q.shape[0]
        x_ref = x_ref.expand(batch, -1, -1)
        origin, rot = self.frame(x_ref)
        e1, e2 = rot[..., 0], rot[..., 1]
        placed = [None] * q.shape[1]
        rows = self.rows.tolist()
        i0, i1, i2 = rows[0][0], rows[1][0], rows[2][0]
        placed[i0] = origin
        placed[i1] = origin + q[:, i1, 0:1] * e1
        _, j2, k2, _ = rows[2]
        # e1 points root -> second atom; the third atom's angle is measured from its parent towards k.
        axis = _unit(placed[k2] - placed[j2])
        perp = _unit(e2 - (e2 * axis).sum(-1, keepdim=True) * axis)
        placed[i2] = placed[j2] + q[:, i2, 0:1] * (torch.cos(q[:, i2, 1:2]) * axis + torch.sin(q[:, i2, 1:2]) * perp)
        x = q.new_zeros(q.shape).index_copy(1, self.rows[:3, 0], torch.stack([placed[i0], placed[i1], placed[i2]], 1))
        for name in self._level_names:
            i, j, k, l = getattr(self, name).unbind(-1)
            c, b, a = x[:, j], x[:, k], x[:, l]
            bc = _unit(c - b)
            n = _unit(torch.cross(b - a, bc, dim=-1))
            m = torch.cross(n, bc, dim=-1)
            qi = q[:, i]
            r, theta, phi = qi[..., 0:1], qi[..., 1:2], qi[..., 2:3]
            sin_theta = torch.sin(theta)
            x = x.index_copy(1, i, c + r * (-torch.cos(theta) * bc + sin_theta * torch.cos(phi) * m
                                            + sin_theta * torch.sin(phi) * n))
        return x
