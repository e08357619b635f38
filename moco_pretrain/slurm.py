"""Run pretraining on a SLURM cluster with submitit: N nodes x G GPUs, requeued on preemption.

Each SLURM task is one process (one GPU). It receives torchrun's environment variables, so the
training code is the same as under ``torchrun``; a requeued job auto-resumes from the last
checkpoint in ``OUTPUT_DIR`` (``TRAIN.AUTO_RESUME``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def torchrun_environment(
    *, global_rank: int, local_rank: int, world_size: int, master_addr: str, master_port: int
) -> dict[str, str]:
    """The ``env://`` variables that :func:`moco_pretrain.distributed.init_distributed` reads."""
    return {
        "RANK": str(global_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def master_port_for(job_id: str) -> int:
    """A port derived from the job id, so that jobs sharing a node do not collide."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + int(digits[-4:]) % 20000


class PretrainJob:
    """A submitit callable: the pretraining task of ``config_file`` + ``opts`` in every SLURM
    task; requeues itself on preemption.

    Args:
        config_file: a recipe path or name under ``configs/``.
        opts: ``KEY VALUE`` overrides.
        resume: a checkpoint to resume the first submission from (None: auto-resume).
    """

    def __init__(self, config_file: str, opts: Sequence[str], resume: str | None = None) -> None:
        self.config_file, self.opts, self.resume = config_file, list(opts), resume

    def __call__(self) -> None:
        import submitit

        from .config import setup_cfg
        from .pretrain import run_pretraining

        env = submitit.JobEnvironment()
        os.environ.update(
            torchrun_environment(
                global_rank=env.global_rank,
                local_rank=env.local_rank,
                world_size=env.num_tasks,
                master_addr=env.hostnames[0],
                master_port=master_port_for(str(env.job_id)),
            )
        )
        # run_pretraining validates the config for pretraining (moco-submit did for the job, too)
        run_pretraining(setup_cfg(self.config_file, self.opts), resume=self.resume)

    def checkpoint(self) -> Any:
        """Called by submitit on preemption or timeout: resubmit. The requeued job auto-resumes
        from the newest checkpoint of ``OUTPUT_DIR``, or, before the first one is written, from
        the ``resume`` it was given."""
        import submitit

        from .checkpoint import Checkpointer
        from .config import setup_cfg

        written = Checkpointer(setup_cfg(self.config_file, self.opts).OUTPUT_DIR).last_checkpoint()
        resume = None if written else self.resume
        return submitit.helpers.DelayedSubmission(PretrainJob(self.config_file, self.opts, resume))


def submit(
    config_file: str,
    opts: Sequence[str],
    *,
    resume: str | None = None,
    job_dir: str,
    nodes: int,
    gpus_per_node: int,
    timeout_min: int,
    partition: str = "",
    cpus_per_task: int = 10,
    slurm_options: dict[str, Any] | None = None,
    cluster: str | None = None,
) -> Any:
    """Submit the pretraining of ``config_file`` + ``opts`` as one SLURM job; returns the job.

    ``cluster="debug"`` runs the job in this process (submitit's debug executor), for trials.
    """
    import submitit

    executor = submitit.AutoExecutor(folder=job_dir, cluster=cluster, slurm_max_num_timeout=100)
    executor.update_parameters(
        name="moco-pretrain",
        nodes=nodes,
        tasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        timeout_min=timeout_min,
        **({"slurm_partition": partition} if partition else {}),
        slurm_signal_delay_s=120,
        slurm_additional_parameters=slurm_options or {},
    )
    return executor.submit(PretrainJob(config_file, opts, resume))
