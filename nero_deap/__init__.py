"""nero-deap: evolve CNNs that are adversarially robust by design (NERO-Net on DEAP)."""

__version__ = "0.1.0"


def __getattr__(name):
    # load_model imports torch: keep `import nero_deap` cheap for SCOOP workers.
    if name == "load_model":
        from .export import load_model

        return load_model
    raise AttributeError(name)
