"""Put this folder on PYTHONPATH and a Python process believes its CPU has AVX512-BF16 from bitsandbytes' first
import on, so bitsandbytes takes the import-time paths it takes on such a CPU (the hub kernel lookup among them)
whatever CPU runs the tests. tests/conftest.py does the same for 4-bit layers, but only after the import."""

import importlib.util
import sys


class _PatchFunctional:
    """Meta path finder that lets bitsandbytes.functional load, then replaces its CPU feature check."""

    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.has_avx512bf16 = lambda: True  # read by the CPU backend and nn.modules as they import

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchFunctional())
