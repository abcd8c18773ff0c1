"""Builds wsrelay's optional C speedups (the frame walk); everything else is declared in setup.cfg.

The extension is optional: where no C compiler is available wsrelay installs without it and uses the
pure-Python walker (same behaviour, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("wsrelay._speedups", ["wsrelay/_speedups.c"], optional=True)])
