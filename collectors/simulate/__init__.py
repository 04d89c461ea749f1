"""Fleet simulator: scale and ground truth for the pipeline (see fleet.py for the model)."""

from laggard.collectors.simulate.fleet import FleetSimulator
from laggard.collectors.simulate.frame import Frame
from laggard.collectors.simulate.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["FleetSimulator", "Frame", "Scenario", "ScenarioError", "load_scenario"]
