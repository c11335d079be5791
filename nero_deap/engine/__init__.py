"""Layer 3, engine: data, training and attacks, for one network at a time.

``sources`` and ``datasets`` load raw images (``datasets`` is the registry of
``--data`` specs), ``data`` splits and batches them on the device,
``train`` trains (normally or adversarially), ``attacks`` measures FGSM, PGD
and AutoAttack accuracy under the ``threat`` model, ``memory`` returns freed
memory to the system.
"""
