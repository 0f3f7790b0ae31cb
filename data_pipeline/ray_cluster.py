"""One way to reach Ray for every catneuron command: `--address`, a running
`catneuron cluster up` head, or a one-shot local cluster.

`catneuron shard`, the evals' `--num-workers` extraction and the neuron reductions all
call `ray_session`. Without an address it starts a local cluster sized to the work and
stops it on exit; with one it checks that the address answers, joins that cluster and
leaves it running.

A local cluster is made to be harmless and cheap:
- Loopback only. Ray resolves a node IP of 127.0.0.1 to the machine's outward address
  unless its "no cluster" switch (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the default on
  macOS/Windows) is set; with it set, the GCS, the raylet, the workers and both agents
  bind 127.0.0.1 (tests/test_shard_balance.py checks every listening socket). Ray has no
  authentication beyond its token (ShadowRay), so nothing listens outward.
- Quiet. Token authentication stays on (Ray's default for a new local cluster); the
  driver's Ray log records, its warning about that default among them, go to a file,
  and one line on stderr says where Ray's logs are.
- Not outliving its driver. Every process of the cluster inherits a marker variable;
  a tiny watchdog process (stdlib only) waits on a pipe from the driver and, when the
  driver is gone (normal exit, exception, or `kill -9`), ends every process that carries
  the marker and every descendant of one (the raylet starts its dashboard and runtime-env
  agents without the marker). Ray's own fate-sharing kills the GCS and raylet with the
  driver, but its agents used to linger for 20 s and more.
- Whole: a one-shot cluster keeps Ray's API server (dashboard on 127.0.0.1, a free
  port), so `ray job submit` and the state API work on it. That costs about 2.3 s of
  start on the 2-core VM (one tiny clip: 9.5 s against 7.3 s at load 1);
  CATNEURON_RAY_LEAN=1 skips the API server, log monitor and autoscaler monitor as
  before (`_lean_head`). Cheaper still is not starting at all: `catneuron cluster up`
  keeps a head running, and every command joins it (`resolve_address`): the same tiny
  clip then takes 2.0 s.
- Fast to stop: `ray.shutdown()` ends the processes one after the other, each given a
  second to exit; here they all get SIGTERM at once and are waited for together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

MARKER = "CATNEURON_RAY_SESSION"
_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP stays 127.0.0.1; servers bind it
    "RAY_USAGE_STATS_ENABLED": "0",
}

# The watchdog: until the driver's end of the pipe closes, notes every second the
# processes whose initial environment holds the marker and all their descendants
# (Ray's agents are children of the raylet but do not inherit the marker); then ends
# those still running (same start time, so never a reused pid) and every marked one.
_WATCHDOG = r"""
import os, select, signal, sys, time
tag = ("%s=" % sys.argv[1]).encode() + sys.argv[2].encode() + b"\0"
driver = int(sys.argv[3])
skip = {os.getpid(), driver}
def table():
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if fields[0] not in (b"Z", b"X"):  # a zombie is already dead
                    procs[int(name)] = (int(fields[1]), fields[19])
            except (OSError, IndexError, ValueError):
                pass
    return procs
def descendants(procs, roots):
    found, frontier = {p: procs[p][1] for p in roots if p in procs}, set(roots)
    while frontier:
        frontier = {p for p, (ppid, _) in procs.items() if ppid in frontier and p not in found}
        found.update({p: procs[p][1] for p in frontier})
    return found
def marked():
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in skip:
            try:
                with open("/proc/%s/environ" % name, "rb") as f:
                    if tag in f.read() + b"\0":
                        found.add(int(name))
            except OSError:
                pass
    return found
known = {}
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 1.0)
    if ready and not os.read(sys.stdin.fileno(), 4096):
        break
    known.update(descendants(table(), marked()))
def targets():
    procs = table()
    same = {p for p, start in known.items() if p in procs and procs[p][1] == start}
    return (same | marked()) - skip
for sig, pause in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.0)):
    pids = targets()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + pause
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = targets()
"""


CLUSTER_ENV = "CATNEURON_RAY_ADDRESS"
"""A Ray address every catneuron command joins when given no `--address`."""
STATE_ENV = "CATNEURON_CLUSTER_FILE"
"""Where `catneuron cluster up` records its cluster (default ~/.catneuron/cluster.json)."""
LEAN_ENV = "CATNEURON_RAY_LEAN"
"""Set to 1: a one-shot local cluster starts without its API server (no job API)."""


def state_file() -> str:
    return os.environ.get(STATE_ENV) or os.path.join(
        os.path.expanduser("~"), ".catneuron", "cluster.json"
    )


def read_state() -> dict | None:
    """The record `catneuron cluster up` wrote, or None (no file, or not readable)."""
    import json

    try:
        with open(state_file()) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "gcs_address" in state else None


def _answers(address: str, timeout: float = 1.0) -> bool:
    try:
        check_address(address, timeout)
    except RayAddressError:
        return False
    return True


def running_cluster() -> dict | None:
    """The `catneuron cluster up` record when its head still answers, else None."""
    state = read_state()
    return state if state and _answers(state["gcs_address"]) else None


def resolve_address(address: str | None) -> str | None:
    """The cluster a command joins: `--address`, else $CATNEURON_RAY_ADDRESS, else the
    cluster `catneuron cluster up` started (if it answers), else None (a one-shot cluster).

    `auto` also looks at the `cluster up` record first, then is left to Ray's discovery.
    """
    if address and address != "auto":
        return address
    if os.environ.get(CLUSTER_ENV):
        return os.environ[CLUSTER_ENV]
    state = running_cluster()
    if state:
        return state["gcs_address"]
    return address


def is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rstrip("/").rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def loopback_client_env() -> None:
    """Before `import ray`, for a driver that joins a head on 127.0.0.1: it must see itself
    at 127.0.0.1 too (Ray otherwise takes the machine's outward address and finds no
    raylet there), and send the token when `catneuron cluster up` turned tokens on. Ray
    reads both variables when it is imported, so they stay set for this process."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    state = read_state()
    if state and state.get("auth") == "token":
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if "ray._private.ray_constants" in sys.modules:  # imported already: patch it where it lives
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


class RayAddressError(ConnectionError):
    """`--address` names a cluster that does not answer; the message is one line."""


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast, with a one-line reason, when `address` does not accept a connection.

    `ray.init(address=...)` against a dead address retries for about a minute and then
    raises a multi-line error; a TCP connect says the same in `timeout` seconds.
    `auto` (Ray's own discovery of a running cluster) is left to Ray.
    """
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"--address {address}: expected HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayAddressError(f"--address {address}: no Ray cluster answers ({reason})") from None


@contextlib.contextmanager
def _local_environment() -> Iterator[str]:
    """The variables a local cluster's processes must start with; restored afterwards.

    The processes inherit them at start, so they hold for the whole session even though
    the driver's own environment is put back as soon as `ray.init` returns.
    """
    token = uuid.uuid4().hex
    wanted = {**_LOCAL_ENV, MARKER: token}
    saved = {name: os.environ.get(name) for name in wanted}
    for name, value in wanted.items():
        os.environ[name] = value
    import ray._private.ray_constants as constants  # read at import: patch it where it lives

    cluster_switch = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield token
    finally:
        constants.ENABLE_RAY_CLUSTER = cluster_switch
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_watchdog(token: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    return subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, MARKER, token, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # a Ctrl-C to the driver's group must not stop it first
    )


def _end_processes_together(token: str, grace: float = 1.0) -> None:
    """SIGTERM every process of the session at once, wait for them together, then SIGKILL."""
    import psutil

    marked = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.environ().get(MARKER) == token:
                marked.append(process)
    for process in marked:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)

    def running(process: psutil.Process) -> bool:  # a zombie has exited; its parent reaps it
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    alive, deadline = marked, time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [process for process in alive if running(process)]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


@contextlib.contextmanager
def _ray_logs_to_file(path: str) -> Iterator[None]:
    """The driver's `ray` log records go to `path` instead of the console."""
    logger = logging.getLogger("ray")
    saved = logger.handlers[:], logger.propagate
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], logger.propagate = saved
        handler.close()


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Ray initialized for the block; yields True when this call started (and will stop) it.

    Raises `RayAddressError` (a ConnectionError with a one-line message) before anything
    starts when `address` does not answer. Without `address`, a cluster named by
    $CATNEURON_RAY_ADDRESS or started by `catneuron cluster up` is joined (`resolve_address`).
    """
    address = resolve_address(address)
    if address:
        check_address(address)
        if is_loopback(address):
            loopback_client_env()
    import ray

    if ray.is_initialized():
        yield False
        return
    log_path = os.path.join(tempfile.gettempdir(), f"catneuron-ray-driver-{os.getpid()}.log")
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    with _ray_logs_to_file(log_path):
        if address:
            extra = {"_node_ip_address": "127.0.0.1"} if is_loopback(address) else {}
            ray.init(address=address, **quiet, **extra)
            print(f"ray: joined the cluster at {address}", file=sys.stderr)
            try:
                yield True
            finally:
                ray.shutdown()
            return
        with _local_environment() as token:
            watchdog = _start_watchdog(token)
            try:
                context = _start_local(ray, token, num_cpus or os.cpu_count() or 1, **quiet)
            except BaseException:
                watchdog.stdin.close()
                raise
        session_dir = context.address_info.get("session_dir", "")
        print(
            f"ray: local cluster on 127.0.0.1; logs in {session_dir}/logs and {log_path}",
            file=sys.stderr,
        )
        try:
            yield True
        finally:
            started = time.perf_counter()
            try:
                _disconnect_then_end(ray, token)
            finally:
                watchdog.stdin.close()  # anything still marked ends now, without us waiting
            logging.getLogger(__name__).debug(
                "ray stopped in %.2f s", time.perf_counter() - started
            )


@contextlib.contextmanager
def _lean_head() -> Iterator[None]:
    """Ray's head node without its API server, log monitor and autoscaler monitor."""
    from ray._private import node as node_module

    skipped = ("start_api_server", "start_log_monitor", "start_monitor")
    cls = node_module.Node
    saved = {name: getattr(cls, name) for name in skipped if hasattr(cls, name)}
    if len(saved) != len(skipped):
        yield  # not the Ray these names were read from: start it as it is
        return

    def no_api_server(self, *args, **kwargs) -> None:
        self._webui_url = ""

    cls.start_api_server = no_api_server
    cls.start_log_monitor = cls.start_monitor = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(cls, name, method)


def _start_local(ray, token: str, num_cpus: int, attempts: int = 2, **quiet) -> object:
    """`ray.init` of a local cluster, tried again once when its start times out.

    Ray gives its raylet a fixed 30 s to register with the GCS; on a machine shared by
    many busy processes that is sometimes not enough, and a second start usually is.
    """
    lean = os.environ.get(LEAN_ENV) == "1"
    if not lean:  # the full Ray: its API server, so `ray job submit` and the state API work
        quiet = {**quiet, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
        quiet.setdefault("dashboard_port", _free_port())
    for attempt in range(attempts):
        try:
            with _lean_head() if lean else contextlib.nullcontext():
                return ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    object_store_memory=200 * 2**20,
                    _node_ip_address="127.0.0.1",
                    **quiet,
                )
        except Exception as error:
            if attempt + 1 == attempts or "timed out during startup" not in str(error):
                raise
            _disconnect_then_end(ray, token)
    raise AssertionError("unreachable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disconnect_then_end(ray, token: str) -> None:
    """`ray.shutdown()`, with the cluster's processes ended together rather than in turn."""
    node = ray._private.worker._global_node
    if node is None:
        ray.shutdown()
        return
    kill_in_turn = node.kill_all_processes

    def kill_together(check_alive: bool = True, allow_graceful: bool = False, wait: bool = False):
        _end_processes_together(token)
        kill_in_turn(check_alive=False, allow_graceful=False, wait=wait)  # reaps what is left

    node.kill_all_processes = kill_together
    try:
        ray.shutdown()
    finally:
        node.kill_all_processes = kill_in_turn
