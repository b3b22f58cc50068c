"""Phantom ChestX-ray14: chest radiographs rendered from a real CT with findings inserted in 3-D, written in
the NIH layout with an exact box for every finding instance (issue 3). Entry point: `generate`."""
from pipeline.phantom.build import generate

__all__ = ["generate"]
