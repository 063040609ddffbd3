"""The package layout holds: core/ is numbers only, io/ does not depend on MPI."""
import pkgutil
import subprocess
import sys

import mpilayer.core
import mpilayer.io


def _imported_by(package) -> set:
    """Top-level modules a fresh interpreter has loaded after importing every module of ``package``."""
    names = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    assert names, f"no modules found in {package.__name__}"
    code = ("import sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_core_imports_neither_mpi_nor_hdf5():
    loaded = _imported_by(mpilayer.core)
    assert "numpy" in loaded  # the check sees real imports
    assert not loaded & {"mpi4py", "h5py"}, sorted(loaded & {"mpi4py", "h5py"})


def test_io_does_not_import_mpi():
    loaded = _imported_by(mpilayer.io)
    assert "h5py" in loaded
    assert "mpi4py" not in loaded
