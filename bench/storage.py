"""Checkpoint save and restore on local disk against an S3 endpoint, side by side.

    python bench/storage.py                        # demo and 27M shapes, 3 saves per target (about 1 minute)
    python bench/storage.py --shapes demo --saves 5
    python bench/storage.py --endpoint http://127.0.0.1:9000 --bucket bench   # a real service (MinIO, ...)

Each shape's real model (the presets config/train/demo-cpu.yaml and hrm-27m.yaml, the demo tokenizer's
vocabulary) and its real optimizer state (AdamW after one step) are saved the way a training run saves them,
the targets taking turns save by save:
  local     --storage-path on this disk (or the bundle's checkpoints/): the files written and fsynced, COMPLETE
            (every file's sha256), an atomic rename into step-N, pruning to 2
  s3        --storage-path s3://...: the files written, then uploaded with their sha256 (aios.train.run_storage,
            as one rank does), COMPLETE written last, pruning to 2
Columns: MB the checkpoint's bytes; write ms the files on local disk (the same for both); publish ms from
written to published (local: hash + rename; s3: hash + upload + COMPLETE); save ms their sum, what a save
costs the training loop; restore ms finding the newest checkpoint and checking every hash (s3: downloading it
first); publish MB/s. Medians over the saves.

Without --endpoint the S3 endpoint is moto's ThreadedMotoServer on 127.0.0.1 (in memory, the test suite's
endpoint): that measures aios's client path and HTTP on this machine, not a network; pass --endpoint for a
real service (credentials from the standard AWS variables).

Then the data loader: the demo preset's prepared data is published to the endpoint and read the way a Ray
worker reads it with an s3:// --storage-path (aios.data.remote.CachedDataset: a node-local chunk cache, the
sampler's prefetch hints), drawing every row of the demo's batch each step, with --compute-ms of sleep per
step standing in for the training step (the prefetch threads download meanwhile). cold: an empty cache;
warm: the same cache again (another run, or another worker of the node). Columns: the time draws waited for a
chunk (stall) in the first step and over all --loader-steps, chunks downloaded, cache hits.
Results go to bench/results/storage.json (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aios.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "results" / "storage.json"
SHAPES = {"demo": "config/train/demo-cpu.yaml", "27M": "config/train/hrm-27m.yaml"}
TARGETS = ("local", "s3")


def _model_state(preset: str):
    """A shape's model, its AdamW state after one step, and one micro-batch of carries."""
    import torch

    from aios.config import TrainingConfig
    from aios.models.hrm_act_v1 import HRMACTv1
    from aios.tokenizers import load_tokenizer
    from aios.train.loop import model_config_for

    base = TrainingConfig.load_yaml(REPO / SHAPES["demo"])
    config = TrainingConfig.load_yaml(REPO / preset, check_paths=False).replace(
        model=str(REPO / base.model) if not Path(base.model).is_absolute() else base.model,
        dataset_file=base.dataset_file, check_paths=False)
    model = HRMACTv1(model_config_for(config, len(load_tokenizer(config.model))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    batch = {"inputs": torch.zeros(config.batch_size, config.max_seq_len, dtype=torch.long)}
    batch["labels"] = batch["inputs"].clone()
    return model, optimizer, [model.initial_carry(batch)]


def _write(staged: Path, model, optimizer, carries, step: int) -> None:
    import torch

    from aios.train import checkpoint as ckpt

    ckpt.write_checkpoint_files(staged, rank=0, model=model,
                                optimizer_state={"optimizer": optimizer.state_dict(), "scaler": None},
                                rng_state=ckpt.capture_rng_state(torch.device("cpu")), carries=carries,
                                sampler_state={"bench": True}, state={"world_size": 1, "step": step})


def _save_local(root: Path, staged: Path, step: int) -> Path:
    from aios.train import checkpoint as ckpt

    ckpt.seal_checkpoint(staged)
    return ckpt.publish_checkpoint(staged, root, step, keep=2)


def _restore_local(root: Path) -> Path:
    from aios.train import checkpoint as ckpt

    ckpt._verified.clear()  # a fresh process: every hash is checked
    newest = ckpt.newest_intact_checkpoint(root)
    assert newest is not None
    return newest


def _loader(endpoint: str, bucket: str, steps: int, compute_ms: float, tmp: Path) -> list[dict]:
    """Per-step stall of the demo's data read from S3 through a cold, then a warm, chunk cache."""
    from aios.config import TrainingConfig
    from aios.data import ChunkSampler
    from aios.data.remote import CachedDataset, publish_prepared
    from aios.tokenizers import load_tokenizer
    from aios.train.loop import prepare_training_data

    config = TrainingConfig.load_yaml(REPO / SHAPES["demo"]).replace(data_cache_dir=str(tmp / "prepared"))
    os.chdir(REPO)  # the preset's paths are relative to the repository
    train, _ = prepare_training_data(config, load_tokenizer(config.model))
    train.unigram_entropy()
    location = publish_prepared(train, f"s3://{bucket}/loader-{int(time.time())}", endpoint)
    rows = []
    for cache in ("cold", "warm"):
        dataset = CachedDataset(location, endpoint, cache_dir=tmp / "node-cache")
        sampler = ChunkSampler(dataset, seed=config.seed, micro_batch=config.batch_size,
                               grad_accum=config.gradient_accumulation_steps, rank=0, world_size=1, iterate=True)
        stalls = []
        for _ in range(steps):
            before = dataset.cache_counters()[3]
            for micro in range(config.gradient_accumulation_steps):
                sampler.draw(sampler.slots_for(micro))
            stalls.append(dataset.cache_counters()[3] - before)
            time.sleep(compute_ms / 1000)
        hits, downloads, size, _ = dataset.cache_counters()
        dataset.close()
        rows.append({"cache": cache, "chunks": dataset.num_chunks, "first_step_stall_s": stalls[0],
                     "stall_s": sum(stalls), "steps": steps, "downloads": int(downloads), "hits": int(hits),
                     "bytes": int(size)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3, help="saves per shape and target (default 3)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--endpoint", help="an S3-compatible endpoint (default: a moto server on 127.0.0.1)")
    parser.add_argument("--bucket", default="aios-bench", help="the bucket to use (made on the moto server)")
    parser.add_argument("--loader-steps", type=int, default=200, help="steps of the loader part (default 200)")
    parser.add_argument("--compute-ms", type=float, default=50.0, help="a step's compute in the loader part")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    if args.saves < 1 or any(s not in SHAPES for s in shapes):
        parser.error(f"--saves must be at least 1 and --shapes a list of {', '.join(SHAPES)}")
    import torch

    from aios.train.checkpoint import verify_checkpoint
    from aios.train.run_storage import RemoteCheckpointing, RemoteCheckpoints

    server = None
    if args.endpoint is None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        args.endpoint = f"http://{host}:{port}"
        for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            os.environ.setdefault(name, value)
    os.environ.setdefault("AIOS_STORAGE_RETRY_S", "0")
    rows = []
    try:
        if server is not None:
            import boto3

            boto3.client("s3", endpoint_url=args.endpoint).create_bucket(Bucket=args.bucket)
        with tempfile.TemporaryDirectory(prefix="aios-storage-bench-") as tmp:
            os.environ["AIOS_SCRATCH_DIR"] = tmp
            for shape in shapes:
                model, optimizer, carries = _model_state(SHAPES[shape])
                remote = RemoteCheckpoints(f"s3://{args.bucket}/bench-{int(time.time())}", shape, args.endpoint)
                session = RemoteCheckpointing(remote, rank=0, world_size=1, gather=lambda value: [value])
                local_root = Path(tmp) / "local" / shape
                for i in range(args.saves * len(TARGETS)):
                    target = TARGETS[i % 2] if (i // 2) % 2 == 0 else TARGETS[1 - i % 2]  # ABBA order
                    step = i + 1
                    staged = session.staging_dir(step) if target == "s3" else Path(tmp) / "staging" / f"step-{step}"
                    started = time.perf_counter()
                    _write(staged, model, optimizer, carries, step)
                    written = time.perf_counter()
                    if target == "local":
                        published = _save_local(local_root, staged, step)
                        size = sum(f.stat().st_size for f in published.iterdir() if f.name != "COMPLETE")
                    else:
                        files = session.upload(staged, step)
                        session.seal(step, files, keep=2)
                        size = sum(record["bytes"] for record in files.values())
                    done = time.perf_counter()
                    if target == "local":
                        _restore_local(local_root)
                    else:
                        name = remote.newest_sealed(set_aside_broken=False)
                        local = remote.download(name, Path(tmp) / "restore" / name)
                        assert verify_checkpoint(local) is None
                        shutil.rmtree(local)
                    restored = time.perf_counter()
                    rows.append({"shape": shape, "target": target, "bytes": size, "write_s": written - started,
                                 "publish_s": done - written, "save_s": done - started,
                                 "restore_s": restored - done})
                session.close()
                del model, optimizer, carries
            loader = _loader(args.endpoint, args.bucket, args.loader_steps, args.compute_ms, Path(tmp))
    finally:
        if server is not None:
            server.stop()
    summary = {}
    for shape in shapes:
        for target in TARGETS:
            mine = [r for r in rows if r["shape"] == shape and r["target"] == target]
            summary[f"{shape} {target}"] = {k: statistics.median(r[k] for r in mine)
                                            for k in ("bytes", "write_s", "publish_s", "save_s", "restore_s")}
    where = "moto on 127.0.0.1" if server is not None else args.endpoint
    table = Table(title=f"checkpoint save and restore, median of {args.saves}; s3 = {where}; "
                        f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    for column in ("shape", "target", "MB", "write ms", "publish ms", "save ms", "restore ms", "publish MB/s"):
        table.add_column(column, justify="right")
    for key, row in summary.items():
        shape, target = key.split()
        table.add_row(shape, target, f"{row['bytes'] / 1e6:.1f}", *(f"{1000 * row[k]:.0f}" for k in
                      ("write_s", "publish_s", "save_s", "restore_s")), f"{row['bytes'] / 1e6 / row['publish_s']:.0f}")
    console = Console()
    console.print(table)
    for shape in shapes:
        local, s3 = summary[f"{shape} local"], summary[f"{shape} s3"]
        console.print(f"{shape}: a save to S3 takes {s3['save_s'] / local['save_s']:.1f}x a local save, a restore "
                      f"{s3['restore_s'] / local['restore_s']:.1f}x")
    loader_table = Table(title=f"data loader from S3 through the chunk cache: demo data, {args.loader_steps} steps "
                              f"of {args.compute_ms:g} ms compute")
    for column in ("cache", "chunks", "first step stall ms", "total stall ms", "downloaded", "hits"):
        loader_table.add_column(column, justify="right")
    for row in loader:
        loader_table.add_row(row["cache"], str(row["chunks"]), f"{1000 * row['first_step_stall_s']:.1f}",
                             f"{1000 * row['stall_s']:.1f}", str(row["downloads"]), str(row["hits"]))
    console.print(loader_table)
    atomic_write_json(args.output, {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "saves": args.saves, "endpoint": where, "cpu_count": os.cpu_count(),
                                    "runs": rows, "summary": summary, "loader": loader})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
