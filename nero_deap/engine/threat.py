"""The threat model NERO-Net scores against: L-inf perturbations of at most 8/255 on [0,1] pixels.

A module of its own, with no torch import, because the attacks, the
fitness, and the run configuration's default all need this one number, and
the configuration must stay cheap to import (SCOOP workers import the
command line at start-up).
"""

EPS = 8 / 255  # CIFAR-10's standard L-inf budget (RobustBench, NERO-Net)
