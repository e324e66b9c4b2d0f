"""Quality metrics: exact ones for the gmm2d toy world (``gmm``)."""
