"""The benchmarks measure what rwkvkit's own commands get: ``rwkvkit`` imported before torch, so
its OpenMP wait policy (:mod:`rwkvkit.omp_wait`: decode on the kernels' own pool) is in force; a
benchmark module importing torch first would otherwise run decode on libgomp's spinning regions."""

import rwkvkit  # noqa: F401
