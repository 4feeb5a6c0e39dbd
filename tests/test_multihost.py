"""Start-up of several processes, the persistent compilation cache, and what a job does when a process dies.

The decision to call jax.distributed.initialize() (mer_jax/training/distributed.py) and the refusal of a host-local
data_dir are pure functions, tested here directly. The end-to-end tests run launch.py in subprocesses: two launches
of the tiny config that share a compilation cache, and a job of 4 processes on this machine (jax.distributed on
127.0.0.1, one CPU device each, gloo collectives) that trains, loses a process to SIGKILL, is relaunched, and is
stopped with SIGTERM. The 4-process job trains the text-only tiny model: the fault handling does not depend on the
model, and its step compiles in seconds where the video model's takes minutes with 4 processes on 2 cores.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mer_jax import errors
from mer_jax.training import distributed
from mer_jax.training import host_memory
from mer_jax.training import train
from tests import test_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 4
STEPS = 16  # every 4 steps a checkpoint; the kill and the SIGTERM come after the one of step 4
CHECKPOINT_EVERY = 4
LOST_PEER_BOUND_SECONDS = 60  # the survivors must be gone this long after the kill (measured: ~3 s)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """demo_tiny, generated and prepared once for this module: 12 train, 6 dev, 2 test clips."""
  return test_train.prepare_tiny_corpus(tmp_path_factory.mktemp("multihost_corpus"))


# ----------------------------------------------------------------------------- pure decisions


SLURM_STEP = dict(
  SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0"
)


@pytest.mark.parametrize(
  "mode, flags, env, tpu_vm, initialize, reason",
  [
    ("auto", {}, {}, False, False, "one process"),
    ("auto", dict(coordinator_address="h:1", num_processes=2, process_id=1), {}, False, True, "explicit"),
    ("auto", dict(num_processes=2, process_id=0), {}, False, True, "explicit"),
    ("auto", {}, SLURM_STEP, False, True, "SLURM"),
    ("auto", {}, dict(SLURM_STEP, SLURM_NTASKS="1"), False, False, "one process"),
    ("auto", {}, dict(OMPI_COMM_WORLD_SIZE="4"), False, True, "Open MPI"),
    ("auto", {}, dict(TPU_WORKER_HOSTNAMES="t0,t1,t2,t3"), False, True, "4 hosts on GKE"),
    ("auto", {}, dict(MEGASCALE_COORDINATOR_ADDRESS="t0"), False, True, "multislice"),
    ("auto", {}, {}, True, True, "Cloud TPU VM"),  # gcloud / queued resources: no variable says so
    ("auto", {}, dict(TPU_SKIP_MDS_QUERY="1"), True, False, "one process"),
    ("auto", {}, dict(KUBERNETES_SERVICE_HOST="10.0.0.1"), False, False, "one process"),  # a pod, not a job
    ("on", {}, {}, False, True, "JAX's own cluster detection"),
    ("off", dict(coordinator_address="h:1", num_processes=2), SLURM_STEP, True, False, "off"),
  ],
)
def test_the_distributed_switch_decides_from_the_flags_and_the_environment(
  mode, flags, env, tpu_vm, initialize, reason
):
  decision = distributed.decide(mode, env=env, cloud_tpu_vm=tpu_vm, **flags)
  assert decision.initialize == initialize
  assert reason in decision.reason
  if initialize:  # explicit flags reach jax.distributed.initialize(); without them JAX's cluster detection runs
    assert decision.arguments == flags


def test_a_wrong_switch_value_is_a_user_error():
  with pytest.raises(errors.InvalidInput, match="auto, on or off"):
    distributed.decide("yes")


def test_no_tpu_here_and_none_when_jax_platforms_excludes_it():
  assert not distributed.on_cloud_tpu_vm({"JAX_PLATFORMS": "cpu"})
  assert distributed.tpu_chips_on_this_host() == 0 or distributed.on_cloud_tpu_vm({"JAX_PLATFORMS": "tpu"})


def test_distributed_on_without_settings_says_what_to_pass(tmp_path):
  """--distributed=on where JAX finds no cluster: one line naming the flags, exit status 2, before any training."""
  args = _launch_args(tmp_path / "work", tmp_path / "no_data", "", "--distributed=on")
  env = {key: value for key, value in _env().items() if not key.startswith(("JAX_COORDINATOR", "SLURM_", "OMPI_"))}
  proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == errors.USER_ERROR_EXIT_STATUS, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: jax.distributed.initialize() (--distributed=on") and "--coordinator_address" in last


def test_several_processes_refuse_a_host_local_data_dir():
  config = test_train.tiny_config("/data/tfds")
  with pytest.raises(errors.InvalidInput, match="data_dir_shared=True") as raised:
    train.check_data_dir_shared(config, "/data/tfds", 4)
  assert "/data/tfds" in str(raised.value) and "gs://" in str(raised.value)
  train.check_data_dir_shared(config, "/data/tfds", 1)  # one process: its own disk is fine
  train.check_data_dir_shared(config, "gs://bucket/tfds", 4)  # a URL is shared storage
  config.data.data_dir_shared = True  # NFS, Filestore, or every process on one machine
  train.check_data_dir_shared(config, "/data/tfds", 4)


# ----------------------------------------------------------------------------- launches


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
  return host_memory.environment(env)  # the malloc a user opts into (launch.py never restarts itself to get it)


def _launch_args(workdir, data_dir, cache_dir, *extra) -> list[str]:
  return [
    sys.executable,
    os.path.join(REPO, "launch.py"),
    "--config",
    os.path.join(REPO, "configs", "tiny.py"),
    f"--workdir={workdir}",
    "--config.data.builder_config=demo_tiny",
    f"--config.data.data_dir={data_dir}",
    f"--compilation_cache_dir={cache_dir}",
    *extra,
  ]


def _summary(log: str) -> dict:
  return json.loads(re.search(r"Run summary: (\{.*\})", log).group(1))


def _compile_line(log: str) -> str:
  return re.search(r"Compiled the train step in .*", log).group(0)


@pytest.mark.slow
def test_a_second_launch_loads_the_train_step_from_the_persistent_cache(data_dir, tmp_path):
  """Two launches of configs/tiny.py (one process, the ops form 'auto' picks: cpu_ffi where the kernels build)
  with fresh workdirs and one cache: the second compiles nothing and computes the same losses."""
  logs = []
  for name in ("first", "second"):
    args = _launch_args(
      tmp_path / name, data_dir, tmp_path / "cache", "--config.num_train_steps=2", "--distributed=off"
    )
    proc = subprocess.run(args, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs.append(proc.stderr)
  first, second = (_compile_line(log) for log in logs)
  print(f"\n{re.search(r'Ops form.*', logs[0]).group(0)}\nfirst launch:  {first}\nsecond launch: {second}")
  assert "compiled by XLA" in first
  assert "loaded from the persistent compilation cache" in second
  assert _summary(logs[0])["losses"] == _summary(logs[1])["losses"]
  assert "jax.distributed: --distributed=off" in logs[0]


class Job:
  """PROCESSES launch.py processes of one job (coordinator on 127.0.0.1), each logging to its own file."""

  def __init__(self, name, workdir, data_dir, cache_dir, log_dir):
    port = _free_port()
    self.workdir, self.logs = str(workdir), [log_dir / f"{name}_{i}.log" for i in range(PROCESSES)]
    common = _launch_args(
      workdir,
      data_dir,
      cache_dir,
      "--config.data.data_dir_shared=True",  # all 4 read this machine's disk
      '--config.model.modalities=("text",)',
      f"--config.num_train_steps={STEPS}",
      "--config.warmup_steps=2",
      f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
      "--config.eval_every_steps=1000",
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={PROCESSES}",
      "--heartbeat_timeout_seconds=10",
    )
    self.procs = []
    for i, path in enumerate(self.logs):
      with open(path, "w") as out:
        self.procs.append(
          subprocess.Popen(common + [f"--process_id={i}"], env=_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        )

  def wait_for_checkpoint(self, step: int, timeout: float = 600) -> None:
    """Until the checkpoint of `step` is complete (orbax renames its folder to the step when all have written)."""
    folder, deadline = os.path.join(self.workdir, "checkpoints", str(step)), time.monotonic() + timeout
    while not os.path.isdir(folder):
      exited = [i for i, proc in enumerate(self.procs) if proc.poll() is not None]
      assert not exited, f"processes {exited} ended before checkpoint {step}:\n{self.log(exited[0])[-3000:]}"
      assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
      time.sleep(0.05)

  def wait(self, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
      return [proc.wait(timeout=max(deadline - time.monotonic(), 0.1)) for proc in self.procs]
    finally:
      self.kill()

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  def log(self, i: int) -> str:
    return self.logs[i].read_text()


@pytest.mark.slow
def test_four_processes_survive_a_lost_process_and_sigterm(data_dir, tmp_path):
  """(a) a straight run; (b) SIGKILL to one process once the step-4 checkpoint is complete: the others stop within
  seconds with a non-zero status and an error that says a process was lost; (c) relaunched, the job resumes from
  step 4 (the step-8 checkpoint needs every process) with the straight run's losses, and (d) SIGTERM to every
  process after its step-8 checkpoint: each saves and exits 0. One compilation cache for all: process 0 loads its
  steps from it from (b) on (JAX's key of a multi-process program on CPU differs per process and only process 0
  writes, so the others compile again)."""
  cache, started = tmp_path / "cache", time.monotonic()
  straight = Job("straight", tmp_path / "straight", data_dir, cache, tmp_path)
  assert straight.wait(timeout=900) == [0] * PROCESSES, straight.log(0)[-3000:]
  reference = [_summary(straight.log(i)) for i in range(PROCESSES)]
  assert all(summary == reference[0] for summary in reference)  # one job: same losses and eval everywhere
  assert reference[0]["step"] == STEPS and len(reference[0]["losses"]) == STEPS
  for i in range(PROCESSES):
    log = straight.log(i)
    assert "--distributed=auto with explicit settings" in log and f"process {i} of {PROCESSES}" in log
    assert "Ops form (config.model.ops='auto'): xla" in log  # several devices: no FFI call (no partitioning rule)
    if host_memory.find_tcmalloc():  # the malloc the user opted into is the one that ran
      assert "Host malloc: tcmalloc" in log
  assert os.path.exists(tmp_path / "straight" / "eval" / f"step_{STEPS}.json")

  # (b) One process killed: the others must not hang.
  victim = 1
  job = Job("killed", tmp_path / "work", data_dir, cache, tmp_path)
  try:
    job.wait_for_checkpoint(CHECKPOINT_EVERY)
    job.procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    statuses = job.wait(timeout=LOST_PEER_BOUND_SECONDS)
    stopped_after = time.monotonic() - killed_at
  finally:
    job.kill()
  print(f"\nthe others stopped {stopped_after:.1f} s after the kill; exit statuses {statuses}")
  survivors = [i for i in range(PROCESSES) if i != victim]
  for i in survivors:
    assert statuses[i] != 0, job.log(i)[-3000:]
    # Ours where Python sees the failed collective; JAX's where the coordination service ends the process; gloo's
    # own abort where the process was inside a collective's C++ code when its peer's socket closed.
    stopped = r"another process of this job stopped|another task died|gloo::EnforceNotMet"
    assert re.search(stopped, job.log(i)), job.log(i)[-3000:]
  assert any("another process of this job stopped" in job.log(i) for i in survivors)  # our clear line, somewhere
  assert "loaded from the persistent compilation cache" in _compile_line(job.log(0))

  # (c) Relaunched: resumes from step 4 with the straight run's losses; (d) SIGTERM to all after checkpoint 8.
  resumed = Job("resumed", tmp_path / "work", data_dir, cache, tmp_path)
  try:
    resumed.wait_for_checkpoint(2 * CHECKPOINT_EVERY)
    for proc in resumed.procs:
      proc.send_signal(signal.SIGTERM)
    assert resumed.wait(timeout=300) == [0] * PROCESSES, resumed.log(0)[-3000:]
  finally:
    resumed.kill()
  assert f"Resumed from the checkpoint of step {CHECKPOINT_EVERY} " in resumed.log(0)
  summaries = [_summary(resumed.log(i)) for i in range(PROCESSES)]
  stop = summaries[0]["step"]
  assert all(s["preempted"] and s["step"] == stop for s in summaries) and 2 * CHECKPOINT_EVERY <= stop < STEPS
  assert os.path.isdir(tmp_path / "work" / "checkpoints" / str(stop))
  for summary in summaries:
    np.testing.assert_allclose(summary["losses"], reference[0]["losses"][CHECKPOINT_EVERY:stop], rtol=1e-6)
  print(f"4-process test: {time.monotonic() - started:.0f} s; SIGTERM stop at step {stop}")
