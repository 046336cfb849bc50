"""Capacity planning: analytic memory/FLOPs, compiled-HLO analysis, and dry runs on fake devices."""
