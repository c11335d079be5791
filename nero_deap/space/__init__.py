"""Layer 1, space: the search space, from a DSGE grammar file to a phenotype, with no torch.

``grammar`` reads Fast-DENSER grammar files, ``dialect`` names what their
layer and learning keys mean, ``structure`` holds the network outline
(modules, depth, skips), ``genotype`` derives and decodes genotypes,
``phenotype`` is the decoded text form, ``operators`` the grammar-aware
mutation and crossover DEAP calls.
"""
