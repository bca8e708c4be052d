"""Adaptive parallelism (`moe_infer.distributed.parallel`): real gloo jobs of 2 and 4 processes started with
`python -m torch.distributed.run` (and with the deepspeed launcher when DeepSpeed is installed),
compared with the single-process wrapped model; and the cost model on its own.

The launches are slow to start (every process imports torch and transformers), so the module starts
all of them at once and each test waits for its own; each has a hard subprocess timeout after which
its whole process group is killed, and every test checks that no worker process survives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import moe_infer
import tiny_models
from moe_infer.distributed import cost as parallel_cost

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")
LAUNCH_TIMEOUT_S = 150
FP32_TOL = 1e-5  # largest |difference| of logits / expert outputs allowed against the single-process model


class Launch:
    """One job started in its own session (so that a timeout can kill all of it)."""

    def __init__(self, out_dir, command: list[str]):
        self.out_dir = str(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=env)
        self.started = time.monotonic()
        self._result = None

    def wait(self) -> tuple[int, str, float]:
        if self._result is None:
            try:
                output, _ = self.proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                output, _ = self.proc.communicate()
                pytest.fail(f"job did not finish in {LAUNCH_TIMEOUT_S} s (killed); output tail:\n{output[-3000:]}")
            self._result = (self.proc.returncode, output, time.monotonic() - self.started)
        return self._result

    def results(self, world: int, launcher: str) -> list[dict]:
        rows = []
        for rank in range(world):
            with open(os.path.join(self.out_dir, f"rank{rank}.json")) as f:
                data = json.load(f)
            assert data["world"] == world and data["launcher"] == launcher, data
            rows += [{**row, "rank": rank} for row in data["results"]]
        return rows

    def assert_no_survivor(self) -> None:
        pids = [int(open(os.path.join(self.out_dir, name)).read()) for name in os.listdir(self.out_dir)
                if name.startswith("pid.")]
        assert pids, "no worker wrote its pid"
        deadline = time.monotonic() + 5
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _alive(pid)]
            time.sleep(0.1)
        assert not alive, f"worker processes {alive} outlived their job"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead; /proc tells
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(out_dir, nproc: int, *args: str) -> Launch:
    return Launch(out_dir, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(nproc), WORKER, "--out", str(out_dir), *args])


# the launcher installed beside this Python (a virtualenv's bin/ need not be on PATH)
DEEPSPEED = next((path for path in (os.path.join(os.path.dirname(sys.executable), "deepspeed"), shutil.which("deepspeed"))
                  if path and os.path.exists(path)), None)


def _deepspeed_ready() -> str | None:
    """Why the deepspeed launcher test cannot run here, or None."""
    if importlib.util.find_spec("deepspeed") is None or DEEPSPEED is None:
        return "deepspeed is not installed (pip install 'moe-infer[distributed]')"
    # On CPU, deepspeed.init_distributed JIT-compiles its shared-memory comm op on first use (minutes);
    # the test runs where that build is already cached (python -c "from deepspeed.comm.torch import build_shm_op;
    # build_shm_op()" does it once).
    from torch.utils.cpp_extension import _get_build_directory

    built = os.path.join(_get_build_directory("deepspeed_shm_comm", verbose=False), "deepspeed_shm_comm.so")
    if not os.path.exists(built):
        return f"deepspeed's CPU comm op is not built yet ({built} missing; building it takes minutes)"
    return None


DEEPSPEED_SKIP = _deepspeed_ready()


JOBS = {  # job name -> how to start it
    "two": lambda out: torchrun(out, 2, "--models", "deepseek_v3,gpt_oss"),  # gpt_oss: transposed, interleaved, biases
    "four": lambda out: torchrun(out, 4, "--models", "mixtral"),
    "hang": lambda out: torchrun(out, 2, "--fail", "hang", "--timeout", "3"),
    "crash": lambda out: torchrun(out, 2, "--fail", "crash", "--timeout", "3"),
    "deepspeed": lambda out: Launch(out, [
        DEEPSPEED, "--num_nodes", "1", "--num_gpus", "2", "--no_ssh_check", "--master_port", str(_free_port()),
        WORKER, "--out", str(out), "--models", "none"]),
}


def uses_job(name: str):
    """Mark a test as using JOBS[name] (a plain attribute: the fixture starts only the jobs of selected tests)."""
    def mark(test):
        test.job = name
        return test
    return mark


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """The jobs of the selected tests of this module, started together (each test waits for its own)."""
    base = tmp_path_factory.mktemp("parallel")
    wanted = {item.function.job for item in request.session.items
              if item.module is request.module and hasattr(item.function, "job")}
    if DEEPSPEED_SKIP is not None:
        wanted.discard("deepspeed")
    started = {name: JOBS[name](base / name) for name in sorted(wanted)}
    yield started
    for launch in started.values():  # a test that failed early must not leave a job running
        if launch.proc.poll() is None:
            os.killpg(launch.proc.pid, signal.SIGKILL)
            launch.proc.communicate()


def _check_matches_single_process(launch: Launch, world: int, models: list[str], launcher: str = "torchrun") -> None:
    rc, output, _ = launch.wait()
    assert rc == 0, output[-4000:]
    rows = launch.results(world, launcher)
    bad = [row for row in rows if row["err"] > FP32_TOL]
    assert not bad, bad[:10]
    rs = [0] + [r for r in range(1, world + 1) if world % r == 0]
    for model in models:
        logits_rs = {row["r"] for row in rows if row["check"] == f"{model} logits"}
        assert set(rs) <= logits_rs and {"ep", "tp", "auto"} <= logits_rs
        stats = [row["stats"] for row in rows if row["check"] == f"{model} stats"]
        assert len(stats) == world and all(s["world_size"] == world for s in stats)
        # every r ran (calls_by_r counts layer calls per r) and communication was counted
        assert {int(r) for r in stats[0]["calls_by_r"]} == set(rs)
        assert all(s["weight_bytes_sent"] > 0 and s["token_bytes_sent"] > 0 for s in stats)
    for model in models:
        # each rank stores 1/W of the expert weights; unwrap gathers them back bit-exact
        sizes = [row for row in rows if row["check"] == f"{model} expert bytes"]
        assert len(sizes) == world and all(row["bytes"] > 0 for row in sizes)
        for check in ("unwrap", "parallel=None"):
            gathered = [row for row in rows if row["check"] == f"{model} {check}"]
            assert len(gathered) == world and all(row["bytes"] == sizes[0]["bytes"] for row in gathered), check
        assert len([row for row in rows if row["check"] == f"{model} unwrapped logits"]) == world
        assert len([row for row in rows if row["check"] == f"{model} logits, MoEConfig.placement"]) == world
    for check in ("all tokens to expert 0, plan=False", "all tokens to expert 0, plan=True", "capacity factor 1.0",
                  "random, plan=True"):
        assert {row["r"] for row in rows if row["check"] == check} == set(rs), check
    assert len([row for row in rows if row["check"] == "expert 0 runs on its planned rank"]) == world
    launch.assert_no_survivor()


@uses_job("two")
def test_two_ranks_every_r_and_switching_match_the_single_process_model(jobs):
    _check_matches_single_process(jobs["two"], 2, ["deepseek_v3", "gpt_oss"])


@uses_job("four")
def test_four_ranks_every_r_and_switching_match_the_single_process_model(jobs):
    _check_matches_single_process(jobs["four"], 4, ["mixtral"])


@uses_job("hang")
def test_a_stuck_rank_makes_the_others_fail_with_a_clear_error(jobs):
    launch = jobs["hang"]
    rc, output, seconds = launch.wait()
    assert rc != 0
    with open(os.path.join(launch.out_dir, "error.0")) as f:
        message = f.read()
    assert message.startswith("rank 0/2: exchanging pair counts in MoE layer 0 failed"), message
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
    assert "ParallelError" in output
    launch.assert_no_survivor()


@uses_job("crash")
def test_a_crashed_rank_makes_the_job_fail_instead_of_hanging(jobs):
    launch = jobs["crash"]
    rc, output, seconds = launch.wait()
    assert rc != 0
    assert "injected failure on rank 1" in output
    # rank 0 either saw the broken connection itself or was stopped by the launcher; it never hangs
    error_file = os.path.join(launch.out_dir, "error.0")
    if os.path.exists(error_file):
        assert open(error_file).read().startswith("rank 0/2: exchanging pair counts in MoE layer 0 failed")
    launch.assert_no_survivor()


@uses_job("deepspeed")
@pytest.mark.skipif(DEEPSPEED_SKIP is not None, reason=str(DEEPSPEED_SKIP))
def test_deepspeed_launcher_runs_the_same_checks(jobs):
    _check_matches_single_process(jobs["deepspeed"], 2, [], launcher="deepspeed")


# -- in-process: configuration errors and the cost model ----------------------------------------

def test_parallel_without_a_launcher_is_refused_and_leaves_the_model_untouched(tiny_model, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    model = tiny_model("mixtral")
    blocks = list(model.modules())
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N"):
        moe_infer.wrap(model, parallel="auto")
    assert list(model.modules()) == blocks and not moe_infer.is_wrapped(model)


def test_set_parallelism_needs_a_parallel_model(tiny_model):
    with tiny_models.wrapped(tiny_model("mixtral")) as model:
        with pytest.raises(RuntimeError, match="MoEConfig\\(parallel="):
            moe_infer.executor(model).set_parallelism(1)


def _plan_file(tmp_path, moe_layers, num_experts, num_devices=2):
    from moe_infer.distributed.placement import PlacementPlan

    devices = np.array([[e % num_devices for e in range(num_experts)] for _ in moe_layers])
    holds = np.eye(num_devices, dtype=bool)[devices]
    path = tmp_path / "plan.safetensors"
    PlacementPlan(devices, holds, tuple(moe_layers), num_devices, capacity=num_experts).save(path)
    return path


def test_placement_file_in_one_process_is_loaded_checked_and_recorded(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(0, 1, 5)
    with torch.no_grad():
        expected = model(ids).logits
    layers = [0, 1]  # the tiny Mixtral's MoE layers
    path = _plan_file(tmp_path, layers, 8)
    with tiny_models.wrapped(model, placement=str(path)) as wrapped:
        ex = moe_infer.executor(wrapped)
        assert ex.placement.moe_layers == tuple(layers) and ex.placement.device_of(1, 3) == 1 and ex.placement.num_experts == 8
        with torch.no_grad():
            assert torch.equal(wrapped(ids).logits, expected)  # one process: the plan changes nothing
        moe_infer.wrap(wrapped, placement=None)
        assert ex.placement is None


@pytest.mark.parametrize("what, match", [
    ("other model", "this model has 8 experts on MoE layers \\[0, 1\\]"),
    ("not a plan", "not a safetensors file|truncated"),
])
def test_a_wrong_placement_file_is_refused_and_leaves_the_model_untouched(tiny_model, tmp_path, what, match):
    model = tiny_model("mixtral")
    if what == "other model":
        path = _plan_file(tmp_path, [0, 1], 4)
    else:
        path = tmp_path / "plan.safetensors"
        path.write_bytes(b"not a plan")
    blocks = list(model.modules())
    with pytest.raises(ValueError, match=match):
        moe_infer.wrap(model, placement=str(path))
    assert list(model.modules()) == blocks and not moe_infer.is_wrapped(model)


SHAPE = parallel_cost.LayerShape(num_experts=8, hidden_size=4096, intermediate_size=14336, top_k=2, elem_bytes=2)
NVLINK = parallel_cost.Links(intra_bw=450e9, inter_bw=50e9, ranks_per_node=8)
H100 = parallel_cost.Device(flops=700e12, mem_bw=3.0e12)


def test_valid_rs_are_zero_and_the_divisors_of_the_world_size():
    assert parallel_cost.valid_rs(8, 14336) == [0, 1, 2, 4, 8]
    assert parallel_cost.valid_rs(6, 32) == []  # 32 is not divisible by 6: the layout is impossible


def test_cost_model_traffic_of_each_r():
    counts = parallel_cost.balanced_counts(8, 64, 8, 2)
    by_r = {est.r: est for est in (parallel_cost.estimate(r, counts, SHAPE, NVLINK, H100) for r in (0, 1, 2, 8))}
    assert by_r[0].token_bytes == 0 and by_r[0].weight_bytes > 0  # data parallel moves weights only
    assert by_r[8].weight_bytes == 0 and by_r[8].token_bytes > 0  # tensor-sliced moves tokens only
    # expert parallel: every rank sends its slice of the 7 experts it does not compute
    assert by_r[1].weight_bytes == 7 * SHAPE.expert_bytes // 8
    # data parallel sends its slice of all 8 experts to 7 ranks
    assert by_r[0].weight_bytes == 7 * 8 * SHAPE.expert_bytes // 8


def test_cost_model_prefers_fewer_weight_moves_for_few_tokens_and_data_parallel_for_huge_batches():
    few = parallel_cost.choose(parallel_cost.balanced_counts(8, 1, 8, 2), SHAPE, NVLINK, H100)[0]
    assert few == 8  # decoding: moving 2 rows beats moving any weight
    tiny_experts = parallel_cost.LayerShape(num_experts=8, hidden_size=1024, intermediate_size=64, top_k=2,
                                            elem_bytes=2)
    huge = parallel_cost.choose(parallel_cost.balanced_counts(8, 65536, 8, 2), tiny_experts, NVLINK, H100)[0]
    assert huge == 0  # tiny experts, many tokens: gathering the weights is cheaper than moving the tokens


def test_placement_decides_the_column_of_each_expert():
    devices = np.array([7, 6, 5, 4, 3, 2, 1, 0])
    assert parallel_cost.columns_from_devices(devices, 8).tolist() == devices.tolist()  # r = 1: the planned rank
    assert parallel_cost.columns_from_devices(devices, 4).tolist() == [3, 2, 1, 0, 3, 2, 1, 0]
    assert parallel_cost.default_columns(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
