"""4D Gaussians: the dynamic model, rasterisers, initialisation, losses, fitting and file formats."""
