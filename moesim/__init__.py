"""moesim: simulate, plan and run Mixture-of-Experts parallelism (EP, HP, FSEP)."""

__version__ = "0.1.0"
