"""Independent analytic/spectral reference signals for the finite-element tests.

numpy/scipy only; nothing here may import ``spinverse_fem`` (independence is
the point, and tests/test_references.py checks it).

Import as ``from references.slab import ...`` from a test module in tests/:
tests/ has no ``__init__.py``, so pytest's default "prepend" import mode puts
tests/ itself on sys.path (it is the directory of tests/conftest.py and of
every test module).

Modules
-------
slab
    Impermeable slab and Neumann box: cosine-mode matrix formalism.
membrane1d
    1-D two-compartment domain with a permeable membrane, and the plane
    membrane in a box.
"""
