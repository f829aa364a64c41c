"""Run a torchdistill config in one process, with torchdistill's API: the training loop of
torchdistill's ``examples/torchvision/image_classification.py`` (load the YAML, import its
``dependencies``, build the models, ``get_distillation_box``, then per epoch
``pre_epoch_process`` → ``forward_process`` / ``post_forward_process`` per batch →
``post_epoch_process``), trimmed to one process, printing per epoch the mean loss and, in an
MHGD stage 2, its CE and transfer terms apart.

    python examples/torchdistill/train.py --config examples/torchdistill/synthetic_tiny.yaml --device cpu

``--record DIR`` also writes ``DIR/history.json`` (the per-epoch numbers) and ``DIR/heads.pt``
(the MHGD heads' state at the start and end of every epoch), which tests/test_torchdistill.py
reads. For multi-GPU training use torchdistill's own script with ``torchrun``.
"""
import argparse
import json
import math
import os
import time

import torch
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies, load_ckpt, save_ckpt, set_seed
from torchdistill.core.distillation import get_distillation_box
from torchdistill.datasets.util import build_data_loader
from torchdistill.models.official import get_image_classification_model
from torchdistill.models.registry import get_model


def load_model(model_config, device):
    model = get_image_classification_model(model_config, distributed=False)
    if model is None:
        model = get_model(model_config["key"], model_config.get("repo_or_dir"), **model_config["kwargs"])
    load_ckpt(model_config.get("src_ckpt"), model=model, strict=True)
    return model.to(device)


@torch.no_grad()
def evaluate(model, data_loader, device) -> float:
    was_training = model.training
    model.eval()
    correct = count = 0
    for batch in data_loader:
        x, y = batch[0].to(device), batch[1].to(device)
        correct += int((model(x).argmax(1) == y).sum())
        count += y.numel()
    model.train(was_training)
    return 100.0 * correct / count


def heads_state(box):
    """The MHGD heads' state dict (copied), when the teacher is wrapped by Teacher4MHGD."""
    mhgd = getattr(box.teacher_model, "mhgd", None)
    return None if mhgd is None else {k: v.detach().clone().cpu() for k, v in mhgd.state_dict().items()}


def train_one_epoch(box, device) -> dict:
    sums = {}
    steps = 0
    for sample_batch, targets, supp_dict in box.train_data_loader:
        sample_batch, targets = sample_batch.to(device), targets.to(device)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        values = {"loss": float(loss.detach())}
        terms = getattr(loss, "mhgd_terms", None)
        if terms is not None:
            values.update(ce=float(terms.ce.detach()), transfer=float(terms.transfer.detach()))
        box.post_forward_process(loss=loss)
        if not math.isfinite(values["loss"]):
            raise ValueError(f"the training loop was broken due to loss = {values['loss']}")
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        steps += 1
    return {key: value / steps for key, value in sums.items()}


def main(args):
    set_seed(args.seed)
    config = yaml_util.load_yaml_file(os.path.expanduser(args.config))
    import_dependencies(config.get("dependencies"))
    device = torch.device(args.device)
    dataset_dict = config["datasets"]
    models_config = config["models"]
    teacher = load_model(models_config["teacher_model"], device)
    student_config = models_config["student_model"]
    student = load_model(student_config, device)
    dst_ckpt = student_config["dst_ckpt"]

    box = get_distillation_box(teacher, student, dataset_dict, config["train"], device, None, False, 1)
    history, snapshots = [], []
    best = -1.0
    start = time.time()
    for epoch in range(box.num_epochs):
        stage = getattr(box, "stage_number", 1)
        before = heads_state(box)
        box.pre_epoch_process(epoch=epoch)
        means = train_one_epoch(box, device)
        snapshots.append({"epoch": epoch, "stage": stage, "start": before, "end": heads_state(box)})
        val_acc = evaluate(student, box.val_data_loader, device)
        row = {"epoch": epoch, "stage": stage, **means, "val_acc": val_acc,
               "lr": box.optimizer.param_groups[0]["lr"]}
        history.append(row)
        print(f"epoch {epoch} stage {stage}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "stage")), flush=True)
        if val_acc > best:  # as torchdistill's script: keep the student of the best validation accuracy
            best = val_acc
            save_ckpt(student, box.optimizer, box.lr_scheduler, best, args, dst_ckpt)
        box.post_epoch_process()
    box.clean_modules()

    test_config = config["test"]["test_data_loader"]
    test_loader = build_data_loader(dataset_dict[test_config["dataset_id"]], test_config, False)
    test_acc = evaluate(student, test_loader, device)
    print(f"student test acc (last epoch) {test_acc:.2f}; {time.time() - start:.1f} s", flush=True)
    if args.record:
        os.makedirs(args.record, exist_ok=True)
        with open(os.path.join(args.record, "history.json"), "w") as f:
            json.dump({"epochs": history, "test_acc": test_acc}, f, indent=1)
        torch.save(snapshots, os.path.join(args.record, "heads.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="torchdistill YAML config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", help="folder for history.json and heads.pt")
    main(parser.parse_args())
