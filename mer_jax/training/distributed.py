"""Start-up of a job made of several processes: whether to call jax.distributed.initialize(), and with what.

`decide(mode, ...)` is a pure function of the `--distributed` switch, the explicit flags and the environment; the
entry point (launch.py) calls `initialize(decision)` before any other JAX use. The library itself never calls
either: a user's own program keeps control of its process.

What JAX 0.10.2 detects by itself when jax.distributed.initialize() gets no coordinator (jax/_src/clusters):
  - Cloud TPU VM on GCE (`gcloud ... tpu-vm create` or queued resources): the slice's workers and this worker's
    number from the GCE metadata server (GceTpuCluster); one host is a job of one process.
  - GKE TPU node pools: TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES and TPU_WORKER_ID (GkeTpuCluster); multislice
    adds MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID.
  - SLURM (`srun`): SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID (SlurmCluster).
  - Open MPI (`mpirun`): OMPI_MCA_orte_hnp_uri and OMPI_COMM_WORLD_* (OmpiCluster); other MPIs through mpi4py.
  - Kubernetes Jobs / JobSets (GPU pods): the pod's job through the API, with the `kubernetes` package (K8sCluster).
'auto' recognises each of these from environment variables and /sys alone (no network call), so a laptop or a
single-host machine starts at once as one process.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping

from mer_jax import errors

MODES = ("auto", "on", "off")
# A dead peer is noticed after this long without heartbeats (JAX's default is 100 s).
HEARTBEAT_TIMEOUT_SECONDS = 30
# How long a finishing process waits for the others at the shutdown barrier (JAX's default: 300 s).
SHUTDOWN_TIMEOUT_SECONDS = 120
# How long the processes wait for each other to connect at start (hosts of a pod start minutes apart).
INITIALIZATION_TIMEOUT_SECONDS = 300

_GOOGLE_PCI_VENDOR = "0x1ae0"
# TPU chips' PCI device ids (v3, v4, v5p, v5e, v6e, 7x), as jax/_src/hardware_utils.py lists them.
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether to call jax.distributed.initialize(), why (one line for the log), and its explicit arguments
  (empty: JAX's own cluster detection fills them)."""

  initialize: bool
  reason: str
  arguments: dict = dataclasses.field(default_factory=dict)


class LostPeerError(RuntimeError):
  """Another process of the job stopped (killed, crashed, lost its host): this one cannot go on alone."""


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env.get(name, "0"))
  except ValueError:
    return 0


def tpu_chips_on_this_host() -> int:
  """The TPU chips attached through PCI (read from /sys, as JAX's cloud_tpu_init does): > 0 on a TPU VM."""
  count = 0
  for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_path) as vendor, open(os.path.join(os.path.dirname(vendor_path), "device")) as device:
        count += vendor.read().strip() == _GOOGLE_PCI_VENDOR and device.read().strip() in _TPU_PCI_DEVICES
    except OSError:
      continue
  return count


def on_cloud_tpu_vm(env: Mapping[str, str] = os.environ) -> bool:
  """True on a Cloud TPU VM whose TPUs JAX will use: TPU chips on PCI, libtpu installed, JAX_PLATFORMS (when set)
  naming tpu. No network call."""
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  return tpu_chips_on_this_host() > 0 and importlib.util.find_spec("libtpu") is not None


def _detected_cluster(env: Mapping[str, str], cloud_tpu_vm: bool) -> str | None:
  """A line naming the multi-process environment JAX will find its settings in, or None."""
  tasks = _int(env, "SLURM_NTASKS")
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
  if tasks > 1 and all(name in env for name in slurm):
    return f"a SLURM job step of {tasks} tasks (SLURM_*)"
  ranks = _int(env, "OMPI_COMM_WORLD_SIZE")
  if ranks > 1:
    return f"Open MPI with {ranks} ranks (OMPI_COMM_WORLD_SIZE)"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "a multislice TPU job (MEGASCALE_COORDINATOR_ADDRESS)"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if "," in hosts:
    return f"a TPU slice of {hosts.count(',') + 1} hosts on GKE (TPU_WORKER_HOSTNAMES)"
  if cloud_tpu_vm and "TPU_SKIP_MDS_QUERY" not in env:
    return "a Cloud TPU VM (the slice's workers come from the GCE metadata server; one host is one process)"
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
    if importlib.util.find_spec("kubernetes") is not None:
      return "a Kubernetes indexed Job (JOB_COMPLETION_INDEX; the pods come from the Kubernetes API)"
  return None


def decide(
  mode: str,
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  env: Mapping[str, str] = os.environ,
  cloud_tpu_vm: bool = False,
) -> Decision:
  """Whether this process joins a multi-process job (`mode`: 'auto', 'on' or 'off').

  'on' always initialises: with the explicit flags when given, else with JAX's own cluster detection. 'auto'
  initialises when the explicit flags are given (a coordinator address, or more than one process) or the
  environment is one JAX detects (module docstring); `cloud_tpu_vm` is `on_cloud_tpu_vm()`, passed in so that
  this stays a pure function. 'off' never does. Raises InvalidInput for another mode.
  """
  if mode not in MODES:
    raise errors.InvalidInput(f"--distributed={mode!r}; use auto, on or off.")
  arguments = {
    key: value
    for key, value in dict(
      coordinator_address=coordinator_address or None, num_processes=num_processes, process_id=process_id
    ).items()
    if value is not None
  }
  explicit = bool(arguments.get("coordinator_address")) or (num_processes or 1) > 1
  if mode == "off":
    return Decision(False, "--distributed=off: one process")
  if explicit:
    described = ", ".join(f"{key}={value}" for key, value in arguments.items())
    return Decision(True, f"--distributed={mode} with explicit settings ({described})", arguments)
  cluster = _detected_cluster(env, cloud_tpu_vm)
  if cluster:
    return Decision(True, f"--distributed={mode}: detected {cluster}", arguments)
  if mode == "on":
    return Decision(True, "--distributed=on: JAX's own cluster detection (no known environment seen here)", arguments)
  return Decision(False, "--distributed=auto: no multi-process environment found; one process")


def initialize(
  decision: Decision,
  *,
  heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
  shutdown_timeout_seconds: int = SHUTDOWN_TIMEOUT_SECONDS,
  initialization_timeout: int = INITIALIZATION_TIMEOUT_SECONDS,
) -> None:
  """jax.distributed.initialize() as `decision` says; must run before any other JAX use. Raises InvalidInput
  (what to pass) when JAX cannot find its settings."""
  if not decision.initialize:
    return
  import jax

  # Cross-process collectives on CPU need an implementation (gloo ships with jaxlib); the setting only
  # concerns the CPU backend, so it is harmless on GPU and TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      **decision.arguments,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds,
      shutdown_timeout_seconds=shutdown_timeout_seconds,
      initialization_timeout=initialization_timeout,
    )
  except (ValueError, TypeError) as error:  # JAX found no coordinator, process count or id
    raise errors.InvalidInput(
      f"jax.distributed.initialize() ({decision.reason}) failed: {str(error).rstrip('.')}. Pass "
      "--coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process, or --distributed=off to run "
      "as one process."
    ) from error


def barrier(name: str, timeout_seconds: int) -> None:
  """Waits until every process of the job reaches `name` (unique per job), for at most `timeout_seconds`.

  The coordination service's barrier, not a collective: multihost_utils.sync_global_devices on CPU sets up gloo
  on its first use and gives up when a process comes more than 30 s after the first. No-op with one process.
  """
  import jax

  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the client, reached as orbax reaches it

  jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_seconds * 1000))


def check_one_job() -> None:
  """Raises InvalidInput when the backend sees several processes but jax.distributed was not initialised (a TPU
  slice started with --distributed=off): orbax's barriers and the preemption sync would fail later."""
  import jax

  if jax.process_count() > 1 and not jax.distributed.is_initialized():
    raise errors.InvalidInput(
      f"This job has {jax.process_count()} processes but jax.distributed was not initialised; drop "
      "--distributed=off (or pass --distributed=on) so that the processes run as one job."
    )


# Words in the runtime errors that a collective or the coordination service raise when a peer went away
# (gloo on CPU, NCCL on GPU, the coordination service's heartbeats and barriers everywhere).
_LOST_PEER_SIGNS = (
  "gloo",
  "nccl",
  "connection reset",
  "connection closed",
  "connection refused",
  "socket closed",
  "heartbeat",
  "coordination service",
  "barrier",
  "unavailable",
  "deadline_exceeded",
)


def is_lost_peer(error: BaseException) -> bool:
  """Whether a JAX runtime error of a job of several processes says that another process went away."""
  import jax

  text = str(error).lower()
  return jax.process_count() > 1 and any(sign in text for sign in _LOST_PEER_SIGNS)


def lost_peer_message(error: BaseException) -> str:
  """The line launch.py prints when a step fails because another process went away."""
  import jax

  return (
    f"Process {jax.process_index()} of {jax.process_count()}: another process of this job stopped, so this one "
    f"stops too ({type(error).__name__}: {' '.join(str(error).split())[:600]}). Restart every process with the "
    "same command: training resumes from the last checkpoint."
  )
