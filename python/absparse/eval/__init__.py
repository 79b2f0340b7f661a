"""The evaluation application of absparse (the ``absparse`` command), apart from the library.

- :mod:`~absparse.eval.cli`: the command (``calibrate``, ``eval``, ``run``, ``demo``);
  :mod:`~absparse.eval.arguments` its parser and the checks that run before anything loads
- :mod:`~absparse.eval.model_calibration`: AB-Sparse calibration of a model (per-head recall,
  block-size allocation, per-channel parameters)
- :mod:`~absparse.eval.evaluation`: the accuracy evaluation and its report; :mod:`~absparse.eval.tasks`
  the generated tasks; :mod:`~absparse.eval.models` model loading; :mod:`~absparse.eval.progress`
  the work-weighted progress estimate; :mod:`~absparse.eval.demo` the decode pipeline on generated
  data

The library itself (ops, layouts, :mod:`absparse.allocation`, :mod:`absparse.hf`) does not import
this package.
"""
