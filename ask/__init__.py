"""ask: adversarial soft kNN attacks and defences on deep features (Wang et al., IEEE Access 2022)."""

__version__ = "0.1.0"
