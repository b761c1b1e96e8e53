"""The driver side of the Ray Train job, and the function every worker runs.

Storage: `RunConfig(storage_path=<bundle>, name="checkpoints")`, so Ray's run directory is the bundle's
checkpoints/ folder and its checkpoints are the `step-N` directories `LocalSession` writes, published by
aios (see RaySession.report). A rerun with --resume continues from the newest intact one on disk; Ray's own
run snapshot there is removed at each start (aios prunes and sets aside checkpoints, so it goes stale).

Cluster: `--ray-address` (or $RAY_ADDRESS) attaches to a running cluster; without either, an embedded local
cluster is started for the run and shut down after it. A process that has already called `ray.init` (a
test, a notebook) keeps its connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

import ray
import torch
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

from aios.bundle import BrainBundle
from aios.cluster import faults
from aios.cluster.session import JobChannel, RaySession
from aios.config import TrainingConfig
from aios.errors import AiosError, Terminated
from aios.storage import is_remote
from aios.train.loop import Trainer, TrainResult
from aios.train.remote import RETRY_ENV, training_bundle
from aios.train.run_storage import RemoteCheckpoints, checkpoints_location
from aios.train.session import consume_stop_file, new_staging_root

log = logging.getLogger(__name__)

RUN_NAME = "checkpoints"  # the Ray run's directory under the bundle: <bundle>/checkpoints
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray's record of a run's checkpoints, in that directory
NODE_ID_LABEL = "ray.io/node-id"  # the label every Ray node carries with its node id
# How often Ray looks for room to grow an elastic job, in seconds (Ray's default); AIOS_ELASTIC_RESIZE_INTERVAL_S
# overrides it (the tests use a few seconds).
ELASTIC_RESIZE_INTERVAL_S = 60.0


def run_on_ray(config: TrainingConfig, bundle: BrainBundle, *, require_checkpoint: bool) -> TrainResult:
    """Train `config` as a Ray Train job (TorchTrainer, config.world_size workers); returns rank 0's result.

    Called with the bundle locked. A refusal by a worker (an AiosError) comes back through the JobChannel and
    is raised here as it is, not retried by Ray; other worker failures are Ray's to retry (--max-failures)."""
    address, flag = _address(config)
    if address and not ray.is_initialized():
        _check_reachable(address, flag)  # first: it costs nothing, preparing the data may take a while
    data = _prepare_data(config)
    checkpoints = checkpoints_location(config, bundle.checkpoints_dir)
    _forget_ray_snapshot(checkpoints)
    was_connected = ray.is_initialized()
    channel: list = []  # the JobChannel, once the cluster is up
    # Shared by the workers (all on this node); on remote storage every worker stages on its own node.
    staging_root = None if isinstance(checkpoints, RemoteCheckpoints) else new_staging_root(checkpoints)
    try:
        with _stop_on_signals(channel):  # while the cluster starts: a signal stops the setup
            _connect(config)
            channel.append(JobChannel.remote())
            trainer = _torch_trainer(config, checkpoints, channel[0], require_checkpoint=require_checkpoint,
                                     staging_root=staging_root, data=data)
        with _stop_on_signals(channel):  # again: ray.init installs handlers of its own (SIGTERM: exit at once)
            error = _fit_off_the_main_thread(trainer)
        refusal = ray.get(channel[0].get_error.remote())
        if refusal is not None:
            raise AiosError(refusal)
        if error is not None:
            raise error
        data = ray.get(channel[0].get_result.remote())
    finally:
        if not was_connected and ray.is_initialized():
            ray.shutdown()
        if staging_root is not None:
            shutil.rmtree(staging_root, ignore_errors=True)
        consume_stop_file(config.stop_file)  # one that appeared during the run (the launcher checked)
    if data is None:
        raise AiosError("the Ray job ended without a result from its workers; see the log above")
    return TrainResult(step=data["step"], reason=data["reason"], final_eval=data["final_eval"],
                       bundle=Path(data["bundle"]), unigram_entropy=data["unigram_entropy"],
                       trained_steps=data["trained_steps"], plot=Path(data["plot"]) if data["plot"] else None)


class _Trainer(TorchTrainer):
    """TorchTrainer without the Ray Data callback when no Ray Dataset is given (aios reads its own prepared
    chunks): that callback starts a DatasetManager actor, and Ray Data an autoscaling coordinator, at every
    start of the worker group: two more processes importing Ray Data, for nothing."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if self.datasets or not isinstance(c, DatasetsCallback)]


def _torch_trainer(config: TrainingConfig, checkpoints: Path | RemoteCheckpoints, channel, *,
                   require_checkpoint: bool, staging_root: Path | None, data: dict | None = None) -> TorchTrainer:
    workers = config.max_workers
    node_id, node_cpus = _driver_node()
    anywhere = anywhere_problem(config) is None
    cpus = config.cpus_per_worker or max(1, node_cpus // workers)
    if anywhere and config.cpus_per_worker is None:  # the workers' nodes, not the driver's (a head of 0 CPUs)
        needed = config.min_workers if config.elastic else workers  # an elastic job starts with what fits
        cpus = cpus_for_workers(ray.nodes(), needed, gpus=_use_gpu(config))
        log.info("--cpus-per-worker %d: the most with which %d workers fit on this cluster's nodes now", cpus, needed)
    if anywhere:
        # Checkpoints, prepared data and bundle in remote storage: the workers need no disk of this node
        scaling = dict(num_workers=(config.min_workers, workers) if config.elastic else workers,
                       resources_per_worker={"CPU": cpus})
        if config.elastic:
            scaling["elastic_resize_monitor_interval_s"] = float(
                os.environ.get("AIOS_ELASTIC_RESIZE_INTERVAL_S", ELASTIC_RESIZE_INTERVAL_S))
        _check_elastic_cluster(config, cpus, anywhere=True)
    elif config.elastic:
        # Ray places the workers on any node with room (it resizes the job as nodes come and go), so every node
        # must see the bundle and the prepared data: nodes of this machine only (see anywhere_problem).
        scaling = dict(num_workers=(config.min_workers, workers), resources_per_worker={"CPU": cpus},
                       elastic_resize_monitor_interval_s=float(
                           os.environ.get("AIOS_ELASTIC_RESIZE_INTERVAL_S", ELASTIC_RESIZE_INTERVAL_S)))
        _check_elastic_cluster(config, cpus)
    else:
        if cpus * workers > node_cpus:  # Ray would wait for them forever
            raise AiosError(f"{workers} workers x {cpus} CPUs need {cpus * workers} CPUs on this node, which has "
                            f"{node_cpus}: lower --cpus-per-worker or --world-size")
        # On the driver's node: the bundle, checkpoints or prepared data are on its disk (see anywhere_problem).
        scaling = dict(num_workers=workers, resources_per_worker={"CPU": cpus}, label_selector={NODE_ID_LABEL: node_id})
    return _Trainer(
        _train_worker,
        train_loop_config={
            "config": config.to_dict(), "cwd": os.getcwd(), "threads": cpus, "channel": channel,
            "require_checkpoint": require_checkpoint, "log_level": logging.getLogger().getEffectiveLevel(),
            "staging_root": str(staging_root.resolve()) if staging_root is not None else None,
            "data": data,
        },
        scaling_config=ScalingConfig(**scaling, use_gpu=_use_gpu(config)),
        run_config=RunConfig(
            name=RUN_NAME, **_ray_storage(checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
            worker_runtime_env={"env_vars": {**faults.forwarded_env(), **_forwarded_storage_env()}},
            logging_config=LoggingConfig(log_level="WARNING"),  # not every report's metrics
        ),
    )


def _ray_storage(checkpoints: Path | RemoteCheckpoints) -> dict:
    """RunConfig's storage: the folder that holds the checkpoints folder (it is the run's directory, RUN_NAME),
    with its filesystem when remote, so that the endpoint reaches Ray's controller too."""
    if isinstance(checkpoints, RemoteCheckpoints):
        path, filesystem = checkpoints.ray_storage()
        return {"storage_path": path, "storage_filesystem": filesystem}
    return {"storage_path": str(checkpoints.parent.resolve())}


def _forwarded_storage_env() -> dict[str, str]:
    """The storage settings the workers read from their environment: the S3 endpoint and the push retry time
    (never a credential: an attached cluster's nodes have their own, an embedded one inherits this process's)."""
    return {name: os.environ[name] for name in ("AWS_ENDPOINT_URL", RETRY_ENV) if name in os.environ}


def anywhere_problem(config: TrainingConfig) -> str | None:
    """Why this run's workers must stay where the driver's disk is (None: they may run on any node). They need
    no disk of the driver's once the checkpoints and prepared data are in remote run storage (an s3://
    --storage-path), the bundle is remote too (rank 0 writes it, wherever it runs), and no other local path
    is given (--log-file, --stop-file: read and written by the workers)."""
    if not (config.storage_path and is_remote(config.storage_path)):
        return "the checkpoints and prepared data are on this machine's disk (pass an s3:// --storage-path)"
    if not is_remote(config.bundle_dir):
        return "the bundle is on this machine's disk (pass an s3:// --bundle-dir)"
    for flag, value in (("--log-file", config.log_file), ("--stop-file", config.stop_file)):
        if value:
            return f"{flag} {value} is a path on this machine's disk"
    return None


def cpus_for_workers(nodes: list[dict], workers: int, *, gpus: bool = False) -> int:
    """The most CPUs per worker with which `workers` workers fit on the alive `nodes` (as ray.nodes() lists them;
    with `gpus`, also one GPU each), for workers that may run on any node; 1 when they do not fit even so (the
    cluster check that follows then refuses the run in one line, unless an elastic job's minimum fits). Sized
    by the nodes' total CPUs: a second run on the same cluster waits for the first (--cpus-per-worker shares)."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    most = max((int(resources.get("CPU", 0)) for resources in alive), default=0)
    for cpus in range(most, 0, -1):
        fit = sum(min(int(r.get("CPU", 0)) // cpus, int(r.get("GPU", 0))) if gpus else int(r.get("CPU", 0)) // cpus
                  for r in alive)
        if fit >= workers:
            return cpus
    return 1


def _check_elastic_cluster(config: TrainingConfig, cpus: int, *, anywhere: bool = False) -> None:
    node_id = ray.get_runtime_context().get_node_id()
    nodes = ray.nodes()
    here = next(node["NodeManagerAddress"] for node in nodes if node.get("NodeID") == node_id)
    problem = elastic_cluster_problem(config, cpus, nodes, here, gpus=_use_gpu(config), anywhere=anywhere)
    if problem:
        raise AiosError(problem)


def elastic_cluster_problem(config: TrainingConfig, cpus: int, nodes: list[dict], here: str, *,
                            gpus: bool = False, anywhere: bool = False) -> str | None:
    """Why an elastic job (or, with `anywhere`, any job whose workers may run on every node) cannot run on this
    cluster (`nodes` as ray.nodes() lists them; `here`: the driver's machine), or None. Unless `anywhere`, a
    node on another machine (whose disk does not hold the bundle) is refused; so is a cluster that cannot start
    even MIN workers (Ray would wait forever)."""
    alive = [node for node in nodes if node.get("Alive")]
    elsewhere = sorted({node.get("NodeManagerAddress") for node in alive} - {here})
    if elsewhere and not anywhere:
        return (f"--world-size {config.world_size}: an elastic job runs on every node, and this cluster has nodes "
                f"on other machines ({', '.join(elsewhere[:3])}) that do not see this machine's disk ("
                f"{anywhere_problem(config)}): use a fixed --world-size N (its workers stay on this node), or keep "
                f"checkpoints, data and bundle in remote storage")
    def fits(resources: dict) -> int:  # workers of `cpus` CPUs (and one GPU each when they use GPUs) on a node
        workers = int(resources.get("CPU", 0)) // cpus
        return min(workers, int(resources.get("GPU", 0))) if gpus else workers

    room = sum(fits(node.get("Resources", {})) for node in alive)
    if room < config.min_workers:
        return (f"--world-size {config.world_size}: the cluster has room for {room} workers of {cpus} CPUs"
                f"{' and a GPU' if gpus else ''}, fewer than the {config.min_workers} the job needs to start; lower "
                f"--cpus-per-worker or the minimum")
    return None


def _forget_ray_snapshot(checkpoints: Path | RemoteCheckpoints) -> None:
    """Remove Ray's record of the previous job's checkpoints. aios resumes from what is stored (the newest
    intact step-N), and prunes and sets aside checkpoints itself, so the record goes stale; a Ray controller
    that finds a listed checkpoint missing refuses to start."""
    if isinstance(checkpoints, RemoteCheckpoints):
        checkpoints.forget_ray_snapshot(RAY_SNAPSHOT)
    else:
        (checkpoints / RAY_SNAPSHOT).unlink(missing_ok=True)


def _driver_node() -> tuple[str, int]:
    """The Ray node this process runs on, and its CPUs."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return node_id, int(node.get("Resources", {}).get("CPU", 1))
    raise AiosError("this process is not on a node of the Ray cluster it attached to (a Ray Client connection?): "
                    "run aios on a node of the cluster, e.g. the head, until remote storage lands")


def _prepare_data(config: TrainingConfig) -> dict | None:
    """Tokenize the data once, here, before any cluster starts: bad data is refused in one line at once, and
    the workers open the prepared chunks from the cache (its unigram entropy computed and stored in it).
    With an s3:// --storage-path the prepared data is published there once (aios.data.remote) and the workers
    read it through their node's chunk cache: returns its locations {"train": ..., "eval": ...}."""
    from aios.tokenizers import load_tokenizer
    from aios.train.loop import prepare_training_data

    train, evaluation = prepare_training_data(config, load_tokenizer(config.model), progress=config.progress)
    train.unigram_entropy()
    if not (config.storage_path and is_remote(config.storage_path)):
        return None
    from aios.data.remote import publish_prepared

    located = {"train": publish_prepared(train, config.storage_path, config.s3_endpoint_url)}
    located["eval"] = (located["train"] if evaluation is train
                       else publish_prepared(evaluation, config.storage_path, config.s3_endpoint_url))
    return located


def _fit_off_the_main_thread(trainer: TorchTrainer) -> BaseException | None:
    """`trainer.fit()` in a thread, returning what it raised. Off the main thread Ray does not install its own
    SIGINT handler (which aborts the run without a checkpoint), so Ctrl-C stops the run as SIGTERM does; the
    main thread waits in short joins, so that it runs the signal handlers at once."""
    raised: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            raised.append(exc)

    thread = threading.Thread(target=fit, name="aios-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    return raised[0] if raised else None


def _connect(config: TrainingConfig) -> None:
    """Attach to the configured cluster or start an embedded one (a process already connected stays so)."""
    address, flag = _address(config)
    if config.cuda_ids is not None and (address or ray.is_initialized()):  # an attached cluster's GPUs are its own
        raise AiosError(f"--cuda-ids chooses the GPUs of the embedded local Ray cluster, and this run attaches to "
                        f"{'the cluster of ' + flag if address else 'the cluster this process is connected to'}: "
                        f"drop --cuda-ids (set CUDA_VISIBLE_DEVICES where that cluster's nodes start)")
    if ray.is_initialized():
        return
    if address:
        try:
            context = ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise AiosError(f"{flag} {address}: cannot connect to a Ray cluster there ({exc}); start one "
                            f"(ray start --head) or drop {flag} for an embedded local cluster") from None
        log.info("attached to the Ray cluster at %s", address)
        _log_dashboard(context)
        return
    # The dashboard listens on 127.0.0.1 only: an embedded cluster is this machine's business.
    gpus = {}
    if config.cuda_ids is not None:  # the cluster's GPUs: Ray hands each worker one of these
        gpus = {"num_gpus": len(config.cuda_ids.split(","))}
    with _visible_devices(config.cuda_ids), _controller_poll():  # the cluster's processes inherit both
        context = ray.init(num_cpus=os.cpu_count() or 1, dashboard_host="127.0.0.1", log_to_driver=True,
                           logging_level=logging.WARNING, **gpus)
    log.info("started an embedded local Ray cluster (%s CPUs%s)", os.cpu_count(),
             f", GPUs {config.cuda_ids}" if config.cuda_ids is not None else "")
    _log_dashboard(context)


# How often Ray Train's controller collects the workers' reports and notices that they finished, in an
# embedded cluster (Ray's default is 2 s). It holds one report per worker at a time, so a checkpoint reported
# sooner than this after the previous one waits for the collection, and so does the end of every job.
CONTROLLER_POLL_S = "0.5"


def _controller_poll():
    """RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the embedded cluster's processes, unless the user set one."""
    if "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in os.environ:
        return contextlib.nullcontext()
    return _environment("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)


def _visible_devices(cuda_ids: str | None):
    """CUDA_VISIBLE_DEVICES=cuda_ids while the embedded cluster starts (unchanged without --cuda-ids)."""
    if cuda_ids is None:
        return contextlib.nullcontext()
    # The ids count the GPUs this process sees, as torch numbers them: within an existing restriction, its i-th.
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = seen.split(",") if seen else None
    return _environment("CUDA_VISIBLE_DEVICES", ",".join(seen[int(i)] if seen else i for i in cuda_ids.split(",")))


@contextlib.contextmanager
def _environment(name: str, value: str):
    """os.environ[name] = value inside the block, then as it was."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _log_dashboard(context) -> None:
    url = getattr(context, "dashboard_url", None)
    if url:
        log.info("Ray dashboard: http://%s", url)  # a line of its own: a wrapped URL cannot be clicked
    else:
        log.info("no Ray dashboard on this cluster (it needs ray[default])")


def _address(config: TrainingConfig) -> tuple[str | None, str]:
    """The cluster to attach to (None: start an embedded one), and where the address came from."""
    if config.ray_address:
        return config.ray_address, "--ray-address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def _check_reachable(address: str, flag: str, timeout_s: float = 5.0) -> None:
    """Refuse at once an address where nothing listens (ray.init would retry it for minutes)."""
    if address == "auto" or address.startswith("local"):
        return
    host_port = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise AiosError(f"{flag} {address}: expected HOST:PORT (the head's GCS port, e.g. 10.0.0.5:6379) or "
                        f"ray://HOST:PORT (Ray Client, e.g. ray://10.0.0.5:10001)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise AiosError(f"{flag} {address}: nothing answers there ({exc.strerror or exc}); start the cluster "
                        f"(ray start --head) or fix the address") from None


def _use_gpu(config: TrainingConfig) -> bool:
    """--device cuda, or auto on a cluster that has GPUs: one GPU per worker."""
    return config.device == "cuda" or (config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


@contextlib.contextmanager
def _stop_on_signals(channel: list):
    """SIGTERM/SIGINT: before the job's channel exists (the cluster is starting), the setup stops at once
    (Terminated / KeyboardInterrupt, as in-process); after, the workers stop after their current step,
    checkpoint and end (the first signal), and a second one acts as usual."""
    previous = {}

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if not channel:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(name)
        log.warning("%s received: the workers finish their current step, checkpoint and stop (send it again "
                    "to stop at once)", name)
        channel[0].request_stop.remote(name)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------
# The worker


def _train_worker(loop_config: dict) -> None:
    """What each TorchTrainer worker runs: the Trainer with a RaySession; rank 0 hands back the result."""
    if os.path.isdir(loop_config["cwd"]):  # the driver's relative paths mean the same here (same machine)
        os.chdir(loop_config["cwd"])
    level = loop_config["log_level"] if ray.train.get_context().get_world_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)  # rank 0 speaks for all
    _quiet_ray_train_reports()
    torch.set_num_threads(loop_config["threads"])
    config = TrainingConfig.from_dict(loop_config["config"], check_paths=False)
    bundle = training_bundle(config)
    if loop_config.get("data") and ray.train.get_context().get_world_rank() == 0:
        from aios.train.remote import RemoteBrain

        # Rank 0 writes the bundle, on whichever node it runs: its local copy there must hold the remote's
        # version first (the driver brought its own up to date; on the driver's node this changes nothing).
        remote = RemoteBrain.of(config)
        if remote is not None:
            remote.bring_up_to_date()
    channel = loop_config["channel"]
    if ray.get(channel.get_error.remote()) is not None:
        return  # a worker group restarted after a refusal: the driver raises it, nothing is retried
    checkpoints = checkpoints_location(config, bundle.checkpoints_dir)
    remote = checkpoints if isinstance(checkpoints, RemoteCheckpoints) else None
    session = RaySession(bundle.checkpoints_dir if remote else checkpoints, device=_worker_device(config),
                         keep_checkpoints=config.keep_checkpoints, stop_file=config.stop_file, channel=channel,
                         require_checkpoint=loop_config["require_checkpoint"],
                         staging_root=loop_config["staging_root"], remote=remote,
                         zero_stage=None if config.zero_stage == "none" else config.zero_stage)
    datasets = None
    try:
        if loop_config.get("data"):  # in run storage: read through this node's chunk cache
            from aios.data.remote import open_cached

            train = open_cached(loop_config["data"]["train"], config.s3_endpoint_url)
            same = loop_config["data"]["eval"] == loop_config["data"]["train"]
            datasets = (train, train if same else open_cached(loop_config["data"]["eval"], config.s3_endpoint_url))
        result = Trainer(config, session, faults.callbacks_from_env(), datasets=datasets).run()
    except AiosError as exc:  # a refusal: the same on every retry, so the driver raises it instead
        ray.get(channel.set_error.remote(str(exc)))
        if session.world_size == 1:
            return
        # The other ranks may wait in a collective for this one: failing makes Ray stop the whole group (and a
        # restarted group returns at once, above).
        raise RuntimeError(f"rank {session.rank} refused to continue: {exc}") from None
    finally:
        session.close()
        for dataset in set(datasets or ()):
            dataset.close()
    if session.rank == 0:
        ray.get(channel.set_result.remote({
            "step": result.step, "reason": result.reason, "final_eval": result.final_eval,
            "bundle": str(result.bundle), "unigram_entropy": result.unigram_entropy,
            "trained_steps": result.trained_steps, "plot": str(result.plot) if result.plot else None,
        }))


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every ray.train.report at INFO on a logger named by its file's path (not "ray...");
    the checkpoint lines are in metrics.jsonl already."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _worker_device(config: TrainingConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")
