# The @triton.jit code lives in the top-level kernels/ folder of the repository but is
# installed as `fusedpref.kernels` (never as a bare `kernels` package: one exists on PyPI and
# transformers probes for it).
from setuptools import setup

setup(
    packages=["fusedpref", "fusedpref.bench", "fusedpref.integrations", "fusedpref.kernels"],
    package_dir={"fusedpref": "fusedpref", "fusedpref.kernels": "kernels"},
)
