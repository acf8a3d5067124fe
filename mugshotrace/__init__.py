"""Build and audit face-image classifiers of sociodemographic categories: preprocessing, CNN grids, a disaggregated self-audit with uncertainty, interpretation, a confounding probe and model cards.

Modules:

- `mugshotrace.landmarks`: dlib face detection and 68-point landmarks, loaded once per process, plus the OpenFace template and the facial-region index sets that alignment, the synthetic benchmark and interpretation share."""

__version__ = "0.1.0"
