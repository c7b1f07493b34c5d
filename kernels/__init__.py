"""CUDA C++ sources of mla_cupy's kernels, shipped inside the package and read with importlib.resources."""
