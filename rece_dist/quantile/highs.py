"""cvxpy's HiGHS interface, with the LP handed to HiGHS as arrays.

Why: cvxpy's ``HIGHS.solve_via_data`` fills a ``highspy.HighsLp`` field by field, and each
assignment converts a numpy array to a C++ vector one element at a time. The dual LP's
constraint matrix has rows x p non-zeros (380,000 at 19,000 rows, p = 20): ~28 ms a solve
against ~4 ms through highspy's array overload of ``Highs.passModel``, and 15-20% of the CPU
of ``rece evaluate``'s ~2,000 solves (``bench/bench_evaluate.py``). The problem cvxpy compiled,
the options and the HiGHS run are the same, so are the results (``tests/test_quantile.py``
compares both interfaces). Anything else (integer variables, a model file to write) goes to
cvxpy's own method.
"""

from __future__ import annotations

from typing import Any

import cvxpy.settings as s
import numpy as np
from cvxpy.error import SolverError
from cvxpy.reductions.solvers.conic_solvers.conic_solver import dims_to_solver_dict
from cvxpy.reductions.solvers.conic_solvers.highs_conif import HIGHS, unpack_highs_options_inplace


class ArrayHighs(HIGHS):
    """``cvxpy.HIGHS`` whose hand-over to HiGHS copies arrays in bulk; pass an instance as
    ``problem.solve(solver=...)`` (cvxpy's custom-solver route, hence its own name)."""

    def name(self) -> str:
        return "HIGHS_ARRAYS"

    def solve_via_data(self, data: dict[str, Any], warm_start: bool, verbose: bool, solver_opts: dict[str, Any],
                       solver_cache: dict | None = None) -> dict[str, Any]:
        if data[s.BOOL_IDX] or data[s.INT_IDX] or "write_model_file" in solver_opts:
            return super().solve_via_data(data, warm_start, verbose, solver_opts, solver_cache)
        import highspy as hp

        dims = dims_to_solver_dict(data[s.DIMS])
        A = data[s.A].tocsc()
        n_eq, n_leq = dims[s.EQ_DIM], dims[s.LEQ_DIM]
        upper = np.asarray(data[s.B], dtype=np.float64)
        lower = np.concatenate([upper[:n_eq], np.full(n_leq, -hp.kHighsInf)])
        data["Ax"], data["u"], data["l"] = A, upper, lower  # as cvxpy's method leaves them
        n = A.shape[1]
        lb, ub = data[s.LOWER_BOUNDS], data[s.UPPER_BOUNDS]
        col_lower = np.full(n, -hp.kHighsInf) if lb is None else np.asarray(lb, dtype=np.float64)
        col_upper = np.full(n, hp.kHighsInf) if ub is None else np.asarray(ub, dtype=np.float64)

        solver = hp.Highs()
        unpack_highs_options_inplace(solver_opts)
        solver.setOptionValue("log_to_console", verbose)
        for name, value in solver_opts.items():
            if solver.setOptionValue(name, value) == hp.HighsStatus.kError:
                raise ValueError(f"HIGHS returned status kError for option (name, value): ({name}, {value})")
        solver.passModel(n, A.shape[0], A.nnz, int(hp.MatrixFormat.kColwise), int(hp.ObjSense.kMinimize), 0.0,
                         np.asarray(data[s.C], dtype=np.float64), col_lower, col_upper, lower, upper,
                         A.indptr.astype(np.int32, copy=False), A.indices.astype(np.int32, copy=False),
                         A.data.astype(np.float64, copy=False),
                         np.zeros(n, dtype=np.int32))  # every column continuous (kContinuous = 0)
        if warm_start and solver_cache is not None and self.name() in solver_cache:
            _, _, old = solver_cache[self.name()]
            if self.STATUS_MAP.get(old["model_status"], s.SOLVER_ERROR) in s.SOLUTION_PRESENT:
                solver.setSolution(old["solution"])
        try:
            solver.run()
            results = {"solution": solver.getSolution(), "basis": solver.getBasis(), "info": solver.getInfo(),
                       "model_status": solver.getModelStatus().name, "run_time": solver.getRunTime()}
            if results["model_status"] == "kInfeasible":
                results["dual_ray"] = solver.getDualRay()
        except ValueError as exc:
            raise SolverError(exc) from exc
        if solver_cache is not None:
            solver_cache[self.name()] = (solver, data, results)
        return results
