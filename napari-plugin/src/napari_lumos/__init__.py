"""napari plugin of the lumos engine.

The widgets call the engine through the ``lumos`` Python binding (``bindings/python``),
which calls ``liblumos.so``: nothing is re-implemented here. Heavy work runs in napari
thread workers; the computations are plain generators (``_compute``) that also run
synchronously in tests and scripts.
"""

__version__ = "0.1.0"
