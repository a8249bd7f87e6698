"""Headless core of the AirwaySegmentation module and the shared foundations.

Never imports ``slicer``, ``qt`` or ``ctk``: training, batch runs and tests work without Slicer.
Arrays are numpy arrays in z, y, x order (as SimpleITK's ``GetArrayFromImage`` returns them);
spacing is in millimetres and its axis order is said in the name (``spacing_zyx``).
"""

__version__ = "0.1.0"
