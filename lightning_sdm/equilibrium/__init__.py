"""The verdict: is each unit in equilibrium, relaxing towards it, lagging, or off its prediction.

:class:`EquilibriumDetector` takes the windows the monitor closed and keeps, per unit, a
:class:`UnitEquilibrium`; ``_trends`` holds the small-sample statistics it judges with.
"""

from lightning_sdm.equilibrium._detector import EquilibriumDetector, UnitEquilibrium

__all__ = ["EquilibriumDetector", "UnitEquilibrium"]
