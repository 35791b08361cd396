"""Structured inverse preconditioners, one per parameter leaf.

=============  ====================================================  ============
name           ``U`` applied to a leaf ``G`` (``fan_in × fan_out``)  learned
=============  ====================================================  ============
``scalar``     ``s · G``                                             ``s``
``diagonal``   ``D ⊙ G``                                             ``D``
``kronecker``  ``L G R``                                             ``L``, ``R``
``ekfac``      ``Q_A [(Q_Aᵀ G Q_G) ⊙ S] Q_Gᵀ``                       ``S``
``dense``      ``unvec(M vec(G))``                                   ``M``
=============  ====================================================  ============

The state of one leaf is the structure's ``NamedTuple``, so a tree of states
alone says how to apply itself: :func:`apply` needs nothing else.
"""

from llqr_optax.structures.base import Structure, matrix_shape
from llqr_optax.structures.dense import Dense, DenseState
from llqr_optax.structures.diagonal import Diagonal, DiagonalState
from llqr_optax.structures.ekfac import EigenKronecker, EigenKroneckerState
from llqr_optax.structures.kronecker import Kronecker, KroneckerState
from llqr_optax.structures.scalar import Scalar, ScalarState
from llqr_optax.structures.tree import (AUTO_DENSE_MAX, AUTO_MATRIX, STRUCTURES,
                                        StructureSpec, apply, floor, identity_like,
                                        init, is_state, leaf_names, map_states,
                                        restore_types, structure_of)

__all__ = [
    "AUTO_DENSE_MAX", "AUTO_MATRIX", "STRUCTURES", "Structure", "Scalar", "ScalarState",
    "Diagonal", "DiagonalState", "Kronecker", "KroneckerState", "EigenKronecker",
    "EigenKroneckerState", "Dense", "DenseState", "apply", "floor", "identity_like", "init",
    "is_state", "leaf_names", "restore_types",
    "map_states", "matrix_shape", "structure_of"]
