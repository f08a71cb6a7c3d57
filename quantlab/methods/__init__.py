"""The quantization methods: one module (or folder) each, holding the method's config class, its
runner and its command-line options.

A method holds orchestration only (which solver runs on which layer with which statistics, which
layer format the results are packed into); the math is in ``quantlab/solvers``, data and
statistics in ``quantlab/calib``, formats in ``quantlab/formats`` and layers in ``quantlab/nn``.
What methods share is in :mod:`quantlab.methods.base`; the table of methods by name is
:mod:`quantlab.methods.registry`. docs/architecture.md lists the files a new method touches.
"""
