"""The peer of `switchyard bench alltoall`: the same all-to-all-v through
mpi4py's Alltoallv, as a Python user would write it (numpy float32 buffers,
counts known, receive buffer allocated once and reused, as switchyard's
all_to_all_v_into reuses its buffer).

Run under mpirun by the benchmark: mpirun -n N python3 mpi4py_alltoallv.py SIZES_JSON
Prints one line on rank 0: SWITCHYARD_BENCH_JSON {"rows": [{"bytes":..,"seconds":..}, ...]}
"""
import json
import sys
import time

import numpy as np
from mpi4py import MPI


def main():
    plan = json.loads(sys.argv[1])
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    rows = []
    for case in plan:
        per_dst = case["bytes"] // 4 // size
        counts = np.full(size, per_dst, dtype=np.int64)
        displs = np.arange(size, dtype=np.int64) * per_dst
        send = np.arange(per_dst * size, dtype=np.float32)
        recv = np.empty(per_dst * size, dtype=np.float32)
        for _ in range(case["warmup"]):
            comm.Alltoallv([send, counts, displs, MPI.FLOAT], [recv, counts, displs, MPI.FLOAT])
        repeats = []
        for _ in range(case["repeats"]):
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(case["iters"]):
                comm.Alltoallv([send, counts, displs, MPI.FLOAT], [recv, counts, displs, MPI.FLOAT])
            elapsed = (time.perf_counter() - start) / case["iters"]
            repeats.append(comm.allreduce(elapsed, op=MPI.MAX))
        rows.append({"bytes": case["bytes"], "seconds": min(repeats)})
    if comm.Get_rank() == 0:
        print("SWITCHYARD_BENCH_JSON " + json.dumps({"rows": rows}), flush=True)


if __name__ == "__main__":
    main()
