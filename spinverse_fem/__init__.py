"""spinverse-fem: permeability-aware microstructure reconstruction from diffusion MRI.

Units throughout: lengths in um, times in ms, diffusivity in um^2/ms, permeability in um/ms,
b-values in s/mm^2 at the user boundary (converted to ms/um^2 inside: 1 s/mm^2 = 1e-3 ms/um^2).
"""

__version__ = "0.1.0"
