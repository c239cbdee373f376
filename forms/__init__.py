"""UFL variational forms of the Bloch-Torrey operator on the discontinuous P1 face space."""
