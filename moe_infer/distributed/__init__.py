"""Running the experts across processes: who holds which expert, how tokens travel, what it costs.

- `group`: joining the job's process group (torchrun or deepspeed) and the checked collectives;
- `shard`: the sharded expert layout every sharding factor reads (a slice of each expert per rank);
- `parallel`: the Tutel-style runtime: token dispatch and combine with all-to-all, the sharding
  factor r per call, communication statistics, and entering and leaving the multi-rank path;
- `cost`: the analytic cost model that picks r under `parallel="auto"`;
- `placement`: placement plans (which device holds which expert) planned from a trace;
  `placement_solver`: the search that plans them (integer program, ascent, replicas).

Below the executor: it builds the runtime (`MoEConfig.parallel`) and loads plans
(`MoEConfig.placement`); nothing here imports the executor, the layer or the cache.
Importing this package imports none of its modules (import the one you need).
"""

__all__ = ["cost", "group", "parallel", "placement", "placement_solver", "shard"]
