"""Grid and ground-truth geometry generators, readers, and small shipped meshes."""
