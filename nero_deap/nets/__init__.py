"""Layer 2, nets: a phenotype made into a PyTorch network, and networks stored in files.

``network`` builds the model (normalisation inside it, so attacks work in
[0,1] pixels), ``layers`` and ``native`` hold the package's own layers and
C kernels, ``export`` reads and writes model files.
"""
