"""Worker functions for test_ddp.py (importable by spawned processes)."""
import os

import torch
import torch.distributed as dist


def _join(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def global_graph_loss(rank, world, port, inputs_path, out_dir):
    """Each process takes its contiguous share of the global batch; the graph's columns are gathered."""
    import mhgd_fast as mf
    from mhgd_fast.training.distributed import all_gather_columns
    _join(rank, world, port)
    data = torch.load(inputs_path)
    model = mf.MHGD(data["channels"], heads=data["heads"], student_vectors=data["student_vectors"])
    model.load_state_dict(data["state"])
    share = data["student"][0].shape[0] // world
    rows = slice(rank * share, (rank + 1) * share)
    student = [f[rows].clone().requires_grad_() for f in data["student"]]
    teacher = [f[rows].clone() for f in data["teacher"]]
    loss = model(student, teacher, gather=all_gather_columns)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [f.grad for f in student]}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def pipeline_run(rank, world, port, config, out_dir):
    """The whole pipeline as torchrun would start it (environment variables)."""
    from mhgd_fast.training import PipelineConfig, run_pipeline
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = run_pipeline(PipelineConfig(**config))
    from mhgd_fast.training import checkpoint
    # every process's copy of the final student, to check they stayed identical
    state = checkpoint.load(os.path.join(config["run_dir"], "checkpoints", "mhgd-stage2.pt"))
    torch.save({"results": out["results"], "finished_on_disk": state["finished"]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
