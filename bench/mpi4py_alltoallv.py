"""The peer of `switchyard bench alltoall`: the same all-to-all-v through
mpi4py's Alltoallv, as a Python user would write it (numpy float32 buffers,
counts known, receive buffer allocated once and reused, as switchyard's
exchange reuses its buffer).

Run under mpirun by the benchmark: mpirun -n N python3 mpi4py_alltoallv.py SIZES_JSON
Prints one line on rank 0: SWITCHYARD_BENCH_JSON {"rows": [{"bytes":..,"seconds":..}, ...]}

With SWITCHYARD_BENCH_TURNS=PATH:SIDE it takes turns with switchyard's job,
which runs at the same time (launcher/src/bench/turns.rs): repeat k
waits until the file PATH holds 2k+SIDE, and rank 0 writes 2k+SIDE+1 after it.
"""
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

PATIENCE_S = 120.0
# Seconds between two looks at the turn file, as switchyard's side (POLL in
# launcher/src/bench/turns.rs): each look takes the cores from the job timed.
POLL_S = 0.02


class Turns:
    def __init__(self, value):
        path, side = value.rsplit(":", 1)
        self.path, self.side = path, int(side)

    def wait(self, k):
        mine, started = 2 * k + self.side, time.monotonic()
        while True:
            try:
                with open(self.path) as f:
                    if int(f.read().strip() or -1) == mine:
                        return
            except (OSError, ValueError):
                pass  # met the file between its replacement's steps
            if time.monotonic() - started > PATIENCE_S:
                sys.exit(f"waited {PATIENCE_S}s for turn {mine} in {self.path}: switchyard's job stopped taking turns")
            time.sleep(POLL_S)

    def pass_turn(self, k):
        next_path = self.path + ".peer-next"
        with open(next_path, "w") as f:
            f.write(str(2 * k + self.side + 1))
        os.replace(next_path, self.path)


def main():
    plan = json.loads(sys.argv[1])
    turns_var = os.environ.get("SWITCHYARD_BENCH_TURNS")
    turns = Turns(turns_var) if turns_var else None
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    rows = []
    turn = 0
    for case in plan:
        per_dst = case["bytes"] // 4 // size
        counts = np.full(size, per_dst, dtype=np.int64)
        displs = np.arange(size, dtype=np.int64) * per_dst
        send = np.arange(per_dst * size, dtype=np.float32)
        recv = np.empty(per_dst * size, dtype=np.float32)
        best = float("inf")
        for repeat in range(case["repeats"]):
            if turns:
                turns.wait(turn)
            # Warm up every repeat, as switchyard's ranks do: a job that slept
            # through the other's turn wakes on cold caches.
            for _ in range(case["warmup"]):
                comm.Alltoallv([send, counts, displs, MPI.FLOAT], [recv, counts, displs, MPI.FLOAT])
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(case["iters"]):
                comm.Alltoallv([send, counts, displs, MPI.FLOAT], [recv, counts, displs, MPI.FLOAT])
            elapsed = (time.perf_counter() - start) / case["iters"]
            best = min(best, comm.allreduce(elapsed, op=MPI.MAX))
            if turns and comm.Get_rank() == 0:
                turns.pass_turn(turn)
            turn += 1
        rows.append({"bytes": case["bytes"], "seconds": best})
    if comm.Get_rank() == 0:
        print("SWITCHYARD_BENCH_JSON " + json.dumps({"rows": rows}), flush=True)


if __name__ == "__main__":
    main()
