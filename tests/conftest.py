import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import reference.py, mpirun.py

# The suite launches hundreds of Python processes (mpiexec ranks, commands). Where the
# environment forbids bytecode files (PYTHONDONTWRITEBYTECODE), each of them compiles every
# mpilayer module again (~0.1 s of CPU per process); letting them write the usual __pycache__
# (ignored by git) compiles each module once.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
