"""Paper-style figures and tables from moesim result files (simulated and measured).

The Agg backend is selected here, before any submodule imports pyplot: figures are rendered on
machines with no display (CI, GPU nodes), and a GUI backend would fail or pop up windows.
"""

import matplotlib

matplotlib.use("Agg")
