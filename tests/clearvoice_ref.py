"""The ClearerVoice reference code of MossFormer2, for the equivalence tests
(tests/test_mossformer2.py) and the benchmark (bench/mossformer2.py)."""

import importlib
import importlib.util
import os
import sys


def clearvoice_reference():
    """The reference code, module ``clearvoice/models/mossformer2_ss/mossformer2.py`` of the PyPI
    package ``clearvoice`` (``MossFormer2_SS_16K(args).model`` is the network). Only that
    sub-package is imported: the package's ``__init__`` pulls in heavy dependencies the model
    does not need. Raises ImportError with the install command."""
    missing = [dep for dep in ("clearvoice", "einops", "rotary_embedding_torch", "torchinfo")
               if importlib.util.find_spec(dep) is None]
    if missing:
        raise ImportError(f"the ClearerVoice reference needs {', '.join(missing)}: "
                          "pip install --no-deps -r requirements-ref.txt")
    name = "_clearvoice_mossformer2_ss"
    if name not in sys.modules:
        root = importlib.util.find_spec("clearvoice").submodule_search_locations[0]
        folder = os.path.join(root, "models", "mossformer2_ss")
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(name + ".mossformer2")
