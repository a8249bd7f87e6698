"""Headless core of stage 2 (breakage attention, breakage connection) and centerlines.

May import :mod:`AirwaySegmentationLib`; never imports ``slicer``, ``qt`` or ``ctk``.
"""
